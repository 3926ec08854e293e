"""Attention over packed rows: ``varlen_attention``, a transformers attention function that runs causal attention
per packed sequence (registered as ``tunelab_varlen`` by ``use_varlen_attention``), ``packed_mask``, the
block-diagonal 4D mask of the ``mask`` path as the model's layers need it, ``flex_attention_fn`` (``tunelab_flex``):
torch's flex attention over one packed row with a document block mask (``FlexMasks``), and ``resolve_attention``,
which picks one of them for a device (``train.attention``).

Every path keeps what a family's attention does beyond plain causal attention: a sliding window (Gemma 2/3, and
Mistral or Qwen configs that set one: a token attends to the ``sliding_window`` tokens up to itself) and Gemma 2's
soft-capped attention scores (``softcap * tanh(scores / softcap)``). Without them training computed another
function than the model computes at inference (tests/train/test_train_families.py).

A packed row may end in padding (``train.compile`` rounds row lengths up to a multiple, so that a compiled layer
sees few shapes): varlen gives those positions zeros, flex gives them a document of their own; no target reads them.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


VARLEN = "tunelab_varlen"
FLEX = "tunelab_flex"


class Segments:
    """The sequence boundaries of one packed row, ``[0, l1, l1+l2, ...]``, handed to ``varlen_attention`` through
    the layers. A plain object rather than a list: a compiled decoder layer (``train.compile``) then passes it on to
    the attention (which runs outside the compiled graph) without guarding on its values, so a new packing does not
    recompile the layer."""

    __slots__ = ("bounds",)

    def __init__(self, bounds: list[int]):
        self.bounds = list(bounds)


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: with ``tunelab_segments`` (boundaries in a single packed row) each
    sequence attends causally to itself only; without them (inference, probes) plain SDPA, or the same causal
    attention per row where the layer has a sliding window or soft-capping and transformers gave no mask (it
    builds none for a custom attention function), or the model's eager attention for soft-capping with a mask.

    query (1, H, T, D), key/value (1, Hkv, T, D) -> (1, T, H, D)
    """
    segments = kwargs.pop("tunelab_segments", None)
    if isinstance(segments, Segments):
        segments = segments.bounds
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    p = dropout if module.training else 0.0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if segments is None:
        square = query.shape[2] == key.shape[2]
        if (window or softcap is not None) and square and attention_mask is None:
            # transformers builds no mask for a custom attention function: each row is one whole sequence.
            out = torch.stack([_causal_attention(query[b], key[b], value[b], scale, p, window, softcap)
                               for b in range(query.shape[0])])                          # (B, H, T, D)
            return out.transpose(1, 2).contiguous(), None
        if softcap is not None:  # SDPA has no soft-capping: the model's own eager attention
            import sys

            eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
            if attention_mask is not None and attention_mask.dtype == torch.bool:  # eager adds it to the scores
                attention_mask = torch.zeros(attention_mask.shape, device=query.device).masked_fill(
                    ~attention_mask, torch.finfo(torch.float32).min)
            return eager(module, query, key, value, attention_mask, dropout=p, scaling=scaling, **kwargs)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    outs = [_causal_attention(query[0, :, s:e], key[0, :, s:e], value[0, :, s:e], scale, p, window, softcap)
            for s, e in zip(segments[:-1], segments[1:])]
    if segments[-1] < query.shape[2]:  # padding after the last sequence (train.compile's row buckets): zeros
        outs.append(query.new_zeros(query.shape[1], query.shape[2] - segments[-1], query.shape[3]))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)           # (H, T, D)
    return out.transpose(0, 1).unsqueeze(0).contiguous(), None


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, p: float,
                      window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention of one sequence as two batched matmuls: q (H, L, D), k/v (Hkv, L, D) -> (H, L, D).
    ``window``: each query sees the last ``window`` keys up to itself only; ``softcap``: scores soft-capped.

    The query heads that share a key/value head are stacked along the rows, so grouped-query attention needs
    no repeated keys. On the CPU this is ~1.8x faster (forward + backward, bf16) than SDPA's flash kernel
    called per sequence, whose backward dominated the step for ~100-token reviews.
    """
    heads, n, d = q.shape
    kv_heads = k.shape[0]
    g = heads // kv_heads
    scores = torch.matmul(q.reshape(kv_heads, g * n, d), k.transpose(-1, -2)) * scale   # (Hkv, g*L, L)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    if window:
        future |= torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-window)
    probs = scores.view(kv_heads, g, n, n).masked_fill(future, float("-inf")).softmax(-1, dtype=torch.float32)
    probs = probs.to(v.dtype)
    if p > 0:
        probs = F.dropout(probs, p)
    return torch.matmul(probs.view(kv_heads, g * n, n), v).view(heads, n, d)


# Registered with torch.compiler.disable: inside a compiled decoder layer (train.compile) the per-sequence loop runs
# eagerly between two compiled graphs instead of being unrolled into a graph (and recompiled) for every packing.
_varlen_registered = torch.compiler.disable(varlen_attention, recursive=True)


def use_varlen_attention(model: torch.nn.Module) -> bool:
    """Switch a transformers model to ``varlen_attention``; False if it does not take pluggable attention."""
    return _use_attention(model, VARLEN, _varlen_registered)


def _use_attention(model: torch.nn.Module, name: str, fn) -> bool:
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)
    try:
        model.set_attn_implementation(name)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return getattr(model.config, "_attn_implementation", None) == name


class FlexMasks:
    """The flex attention block masks of one packed row: causal within each document (``doc_ids (T,)``: the
    sequence of each token; padding is a document of its own), one mask per sliding window the model's layers use
    (None: no window). Built once per micro-batch, outside the layers."""

    def __init__(self, doc_ids: torch.Tensor, windows: list[int | None]):
        self.doc_ids = doc_ids
        self.masks = {w: self._block_mask(w) for w in dict.fromkeys([None, *windows])}

    def _block_mask(self, window: int | None):
        from torch.nn.attention.flex_attention import create_block_mask

        doc = self.doc_ids

        def causal_doc(b, h, q, k):
            return (doc[q] == doc[k]) & (q >= k)

        def sliding_doc(b, h, q, k):  # within a document, column distance is position distance
            return (doc[q] == doc[k]) & (q >= k) & (q - k < window)

        n = doc.shape[0]
        return create_block_mask(causal_doc if window is None else sliding_doc, None, None, n, n,
                                 device=doc.device)

    def get(self, window: int | None):
        if window not in self.masks:  # a layer's window the model config did not name
            self.masks[window] = self._block_mask(window)
        return self.masks[window]

    @classmethod
    def from_segments(cls, segments: list[int], length: int, windows: list[int | None],
                      device: torch.device) -> "FlexMasks":
        lengths = torch.tensor([e - s for s, e in zip(segments[:-1], segments[1:])] + [length - segments[-1]],
                               device=device)
        return cls(torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths), windows)


def flex_attention_fn(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function over one packed row with torch's flex attention: the ``tunelab_flex``
    ``FlexMasks`` give the document block mask (the layer's sliding window included), soft-capping is a score_mod.
    Without it (inference, probes) the same as ``varlen_attention`` without segments.

    query (1, H, T, D), key/value (1, Hkv, T, D) -> (1, T, H, D)
    """
    masks = kwargs.pop("tunelab_flex", None)
    if masks is None:
        return varlen_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                **kwargs)
    if dropout and module.training:
        raise ValueError("train.attention flex has no attention dropout")
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q, k):
            return torch.tanh(score / softcap) * softcap
    run = _flex_kernel(query)
    with warnings.catch_warnings():  # eager (CPU, no grad): "called without torch.compile", the unfused reference
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = run(query, key, value, score_mod=score_mod, block_mask=masks.get(window or None),
                  scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _flex_kernel(query: torch.Tensor):
    """flex_attention as it is (inside a compiled layer, or eager on the CPU), or compiled on its own where it would
    otherwise run the unfused reference on a GPU."""
    from torch.nn.attention.flex_attention import flex_attention

    if query.device.type == "cpu" or torch.compiler.is_compiling():
        return flex_attention
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


_compiled_flex = None


def use_flex_attention(model: torch.nn.Module) -> bool:
    """Switch a transformers model to ``flex_attention_fn``; False if it does not take pluggable attention."""
    return _use_attention(model, FLEX, flex_attention_fn)


def flex_available() -> str | None:
    """Why flex attention cannot train here (None: it can): torch without it, or CUDA without triton."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    from torch.utils._triton import has_triton

    if torch.cuda.is_available() and not has_triton():
        return "flex attention on CUDA is compiled by triton, which is not installed"
    return None


def packed_mask(model: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """The block-diagonal causal bool mask ``(B, 1, T, T)`` of packed rows as ``model``'s layers take it (a
    sliding window, eager attention: ``tunelab.models.masks.layer_masks``). Within a sequence, column distance is
    position distance; across sequences the mask is already False."""
    from tunelab.models.masks import layer_masks

    cols = torch.arange(mask.shape[-1], device=mask.device)[None]
    return layer_masks(model.config, mask, cols, cols)


def resolve_attention(attention: str, device: torch.device) -> str:
    """``train.attention`` for this device. varlen runs ~8 small ops per sequence and layer: on a CPU that beats
    one masked kernel over the whole row, on CUDA each is a kernel launch, and the step is launch-bound. There
    auto is flex (one fused kernel per layer that skips the blocks across documents) where torch has it with
    triton, else the 4D mask."""
    if attention != "auto":
        return attention
    if device.type != "cuda":
        return "varlen"
    return "flex" if flex_available() is None else "mask"
