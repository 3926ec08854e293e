"""Fast log-likelihood scoring of candidate completions (label tasks).

Three tricks make label scoring an order of magnitude cheaper than generating per item:

1. The token prefix shared by every prompt (system prompt, instruction, few-shot examples) is run once;
   its KV cache is expanded over each batch, so a few-shot prompt costs little more than zero-shot.
2. All candidates ride in one row per item: ``[item suffix | choice 1 | choice 2 | ...]`` with a 4D
   attention mask in which each choice sees the prefix, the item suffix and its own earlier tokens
   only (a small tree), and position ids that restart each choice right after the suffix.
3. The output projection (49k x 576 for SmolLM2, ~1/5 of the FLOPs) is applied only at the
   positions that predict a choice token, not at every position.

4. On a CPU, the grouped key/value heads go to SDPA as they are (``enable_gqa``), not copied once per query head.

The tree mask goes to the model as its layers take it (a sliding window by position, eager attention, a final
logit soft-capping: ``tunelab.models.masks``), and the prefix's KV cache keeps every key, also in a model's
sliding layers (the tree's rows attend to the prefix by the mask, not by what a sliding cache kept).

The result equals scoring each (prompt + choice) separately with a plain forward pass (tested).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from tunelab.models.masks import layer_masks, softcap_logits


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token sequences."""
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        lim = min(n, len(s))
        while i < lim and s[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 matmul (AVX512-BF16 or AMX), where bf16 autocast is ~2x faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_autocast(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a setting ``auto | bfloat16 | float32`` means on ``device``: auto is bf16 on CUDA where
    supported and on CPUs with native bf16, else None (fp32)."""
    if dtype == "float32":
        return None
    if dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def autocast_context(device_type: str, dtype: torch.dtype | None):
    """torch.autocast to ``dtype`` on ``device_type``; disabled (fp32) when ``dtype`` is None."""
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache`` on some versions; use what forward takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


@contextlib.contextmanager
def sdpa_gqa_with_mask(device: torch.device):
    """On a CPU, let transformers' SDPA attention pass ``enable_gqa=True`` with our tree mask instead of copying every
    key/value head ``num_attention_heads / num_key_value_heads`` times (``repeat_kv``; it does so whenever a mask is
    given, because CUDA's fused kernels would then fall back to the math one). torch's CPU flash kernel takes grouped
    heads with a mask: the scores are bit-identical and an 8-shot eval, whose rows all attend to the long shared
    prefix, is ~20% faster on the bundled model (3 key/value heads for 9 query heads; benchmarks/eval_speed.py).
    transformers reads the switch, ``TRANSFORMERS_SDPA_FORCE_GQA``, at every attention call; it is set only around
    the scorer's own forward passes and only on a CPU."""
    if device.type != "cpu" or os.environ.get(_FORCE_GQA) is not None:
        yield
        return
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        os.environ.pop(_FORCE_GQA, None)


_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


@dataclass
class ScoreBatchResult:
    logprobs: list[list[float]]  # [item][choice]


class PrefixScorer:
    """Scores ``choices`` after each prompt, sharing the KV cache of the common prompt prefix."""

    def __init__(self, model: torch.nn.Module, *, autocast_dtype: torch.dtype | None = None,
                 max_batch_tokens: int = 4096, max_batch_size: int = 32):
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.head = model.get_output_embeddings()
        self._cache_kw = _cache_kwarg(self.body)

    def _autocast(self):
        return autocast_context(next(self.model.parameters()).device.type, self.autocast_dtype)

    @torch.inference_mode()
    def score(self, prompts: list[list[int]], choices: list[list[int]],
              on_items: Callable[[int], None] | None = None) -> list[list[float]]:
        if not prompts:
            return []
        if any(len(c) == 0 for c in choices):
            raise ValueError("every choice needs at least one token")
        device = next(self.model.parameters()).device
        # The last prompt token must stay in each item's own part: it predicts the first choice token.
        P = min(common_prefix_len(prompts), min(len(p) for p in prompts) - 1)
        with self._autocast():
            if P > 0:
                from transformers import DynamicCache

                prefix = torch.tensor([prompts[0][:P]], device=device)
                # A cache of full layers: one built from the config would keep only a window in sliding layers.
                out = self.body(input_ids=prefix, use_cache=True, **{self._cache_kw: DynamicCache()})
                cache = out.cache if "cache" in out else out.past_key_values
                prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
            else:
                prefix_kv = None
            choice_len = sum(len(c) for c in choices)
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            results: list[list[float]] = [[] for _ in prompts]
            start = 0
            while start < len(order):
                # Grow the batch while the padded token count fits the budget.
                end = start + 1
                while end < len(order) and end - start < self.max_batch_size:
                    longest = len(prompts[order[end]]) - P + choice_len
                    if (end - start + 1) * longest > self.max_batch_tokens:
                        break
                    end += 1
                idx = order[start:end]
                scores = self._score_batch([prompts[i][P:] for i in idx], choices, P, prefix_kv, device)
                for i, s in zip(idx, scores):
                    results[i] = s
                if on_items:
                    on_items(len(idx))
                start = end
        return results

    def _score_batch(self, suffixes: list[list[int]], choices: list[list[int]], P: int,
                     prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
                     device: torch.device) -> list[list[float]]:
        B = len(suffixes)
        choice_len = sum(len(c) for c in choices)
        Q = max(len(s) for s in suffixes) + choice_len
        ids = torch.zeros(B, Q, dtype=torch.long)
        pos = torch.zeros(B, Q, dtype=torch.long)
        # mask[b, q, k]: may query q attend to key k (keys = prefix + this row).  (B, Q, P+Q)
        mask = torch.zeros(B, Q, P + Q, dtype=torch.bool)
        mask[:, :, :P] = True
        causal = torch.ones(Q, Q, dtype=torch.bool).tril()
        gather_b, gather_q, target = [], [], []
        for b, suf in enumerate(suffixes):
            n = len(suf)
            ids[b, :n] = torch.tensor(suf)
            pos[b, :n] = torch.arange(P, P + n)
            mask[b, :, P:] = causal  # suffix rows: causal; rows past the suffix are fixed below
            col = n
            for c in choices:
                L = len(c)
                ids[b, col:col + L] = torch.tensor(c)
                pos[b, col:col + L] = torch.arange(P + n, P + n + L)
                mask[b, col:col + L, P + n:] = False          # not the suffix-part causal tail...
                mask[b, col:col + L, P + col:P + col + L] = causal[:L, :L]  # ...but its own tokens
                # logits at the token before each choice token
                prev = [n - 1] + list(range(col, col + L - 1))
                gather_b += [b] * L
                gather_q += prev
                target += c
                col += L
            if col < Q:  # right padding: give pad rows a harmless causal view
                pos[b, col:] = torch.arange(P + col, P + Q)
        cache = None
        if prefix_kv is not None:
            from transformers import DynamicCache

            cache = DynamicCache()
            for li, (k, v) in enumerate(prefix_kv):
                cache.update(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), li)
        kwargs = {self._cache_kw: cache} if cache is not None else {}
        k_pos = torch.cat([torch.arange(P).expand(B, -1), pos], dim=1)  # (B, P+Q)
        masks = layer_masks(self.model.config, mask[:, None], pos, k_pos)
        masks = {k: m.to(device) for k, m in masks.items()} if isinstance(masks, dict) else masks.to(device)
        with sdpa_gqa_with_mask(device):
            h = self.body(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=masks,
                          use_cache=cache is not None, **kwargs).last_hidden_state
        gb = torch.tensor(gather_b, device=device)
        gq = torch.tensor(gather_q, device=device)
        # (T, V): only the positions that predict a choice token
        logits = softcap_logits(self.model.config, self.head(h[gb, gq]).float())
        lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(target, device=device)[:, None])[:, 0]
        per_row = lp.view(B, choice_len).cpu()
        out: list[list[float]] = []
        for b in range(B):
            row, col = [], 0
            for c in choices:
                row.append(float(per_row[b, col:col + len(c)].sum()))
                col += len(c)
            out.append(row)
        return out
