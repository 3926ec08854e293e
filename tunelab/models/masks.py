"""The attention masks tunelab builds itself (packed training rows, the label scorer's tree of choices), as a
model's layers take them (``layer_masks``).

transformers uses a 4D mask as given, in every layer. A family's attention may need more than the bool mask:

- a sliding window (Gemma 2/3, and Mistral, Qwen or Phi-3 configs that set one): a query attends only to the keys
  less than ``sliding_window`` positions before it. Models that mix full and sliding layers (``layer_types``) take
  a mapping ``{"full_attention": mask, "sliding_attention": mask}``; in a model whose every layer slides, the one
  mask carries the window;
- the eager attention (Gemma 2's default, as SDPA has no soft-capping) adds the mask to the scores: it gets
  0 / -inf, not a bool (True would add 1).

A model's final logit soft-capping (Gemma 2: ``cap * tanh(logits / cap)``), applied by its forward, is here too
(``softcap_logits``) for the code that applies the output projection itself.
"""

from __future__ import annotations

import torch


def sliding_window(config) -> int | None:
    """The window of the model's sliding layers; None where no layer slides."""
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or ())
    if not window or (types and "sliding_attention" not in types):
        return None
    return int(window)


def layer_masks(config, mask: torch.Tensor, q_pos: torch.Tensor,
                k_pos: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """``mask (B, 1, Q, K)`` bool (may query q attend to key k) for a model of ``config``, with the queries' and
    the keys' position ids ``q_pos (B|1, Q)`` and ``k_pos (B|1, K)`` (for the sliding window)."""
    eager = getattr(config, "_attn_implementation", None) == "eager"

    def prepared(m: torch.Tensor) -> torch.Tensor:
        if not eager:
            return m
        return torch.zeros(m.shape, device=m.device).masked_fill(~m, torch.finfo(torch.float32).min)

    window = sliding_window(config)
    if window is None:
        return prepared(mask)
    near = ((q_pos[:, :, None] - k_pos[:, None, :]) < window)[:, None]   # (B|1, 1, Q, K)
    if "sliding_attention" in set(getattr(config, "layer_types", None) or ()):
        return {"full_attention": prepared(mask), "sliding_attention": prepared(mask & near)}
    return prepared(mask & near)


def softcap_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` with the model's final soft-capping, as its forward applies it (unchanged without one)."""
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap
