"""Attention over packed rows: ``varlen_attention``, a transformers attention function that runs causal attention
per packed sequence (registered as ``tunelab_varlen`` by ``use_varlen_attention``), ``packed_mask``, the
block-diagonal 4D mask of the ``mask`` path as the model's layers need it, and ``resolve_attention``, which picks
one of the two for a device (``train.attention``).

Both paths keep what a family's attention does beyond plain causal attention: a sliding window (Gemma 2/3, and
Mistral or Qwen configs that set one: a token attends to the ``sliding_window`` tokens up to itself) and Gemma 2's
soft-capped attention scores (``softcap * tanh(scores / softcap)``). Without them training computed another
function than the model computes at inference (tests/train/test_train_families.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


VARLEN = "tunelab_varlen"


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: with ``tunelab_segments`` (boundaries in a single packed row) each
    sequence attends causally to itself only; without them (inference, probes) plain SDPA, or the same causal
    attention per row where the layer has a sliding window or soft-capping and transformers gave no mask (it
    builds none for a custom attention function), or the model's eager attention for soft-capping with a mask.

    query (1, H, T, D), key/value (1, Hkv, T, D) -> (1, T, H, D)
    """
    segments = kwargs.pop("tunelab_segments", None)
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


def use_varlen_attention(model: torch.nn.Module) -> bool:
    """Switch a transformers model to ``varlen_attention``; False if it does not take pluggable attention."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    try:
        model.set_attn_implementation(VARLEN)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return getattr(model.config, "_attn_implementation", None) == VARLEN


def packed_mask(model: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """The block-diagonal causal bool mask ``(B, 1, T, T)`` of packed rows as ``model``'s layers take it (a
    sliding window, eager attention: ``tunelab.models.masks.layer_masks``). Within a sequence, column distance is
    position distance; across sequences the mask is already False."""
    from tunelab.models.masks import layer_masks

    cols = torch.arange(mask.shape[-1], device=mask.device)[None]
    return layer_masks(model.config, mask, cols, cols)


def resolve_attention(attention: str, device: torch.device) -> str:
    """``train.attention`` for this device. varlen runs ~8 small ops per sequence and layer: on a CPU that beats
    one masked kernel over the whole row, on CUDA each is a kernel launch, and the step is launch-bound."""
    if attention != "auto":
        return attention
    return "mask" if device.type == "cuda" else "varlen"
