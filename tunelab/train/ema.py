"""The weight average of ``train.ema_decay``: ``WeightEMA`` (updated after every optimizer step, checkpointed with
the weights) and the helpers that copy weights in and out of a model (``swapped_weights``: a model with other
weights for the duration of a block).
"""

from __future__ import annotations

import contextlib

import torch

from tunelab.train.modeling import trainable_named
from tunelab.train.sharding import shard_like


class WeightEMA:
    """An exponential moving average of the trained weights (Polyak averaging), updated after every optimizer step:
    ``avg = d * avg + (1 - d) * w`` with ``d = min(decay, (1 + n) / (10 + n))`` after the n-th update, so that the
    first steps do not keep the average near the initial weights for long. Kept in fp32 beside the parameters;
    checkpointed with them (as ``ema::NAME`` tensors), so a resumed run averages exactly as an uninterrupted one.
    Hand-written rather than ``torch.optim.swa_utils.AveragedModel``: that one deep-copies the whole module, the
    frozen base of a LoRA run included (a second model in memory for an average of 20% of its size)."""

    PREFIX = "ema::"

    def __init__(self, named: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.updates = 0
        self.named = named
        self.avg = {n: p.detach().float().clone() for n, p in named.items()}

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.avg.values()), [p.detach().float() for p in self.named.values()], 1 - d)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {self.PREFIX + n: t for n, t in self.avg.items()}

    def load(self, tensors: dict[str, torch.Tensor], updates: int) -> bool:
        """Restore from a checkpoint's tensors; False (left as is) when the checkpoint has no average."""
        if not all(self.PREFIX + n in tensors for n in self.avg):
            return False
        load_weights(self.avg, {n: tensors[self.PREFIX + n] for n in self.avg})
        self.updates = updates
        return True

    @torch.no_grad()
    def swap_in(self) -> dict[str, torch.Tensor]:
        """Put the average into the parameters; returns the last weights (CPU copies)."""
        last = cpu_copy(self.named)
        load_weights(self.named, self.avg)
        return last


def cpu_copy(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in named.items()}


@torch.no_grad()
def load_weights(named: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights[name]`` into each tensor of ``named`` (its device and dtype kept; a full tensor into a DTensor:
    this process's shard of it)."""
    for n, p in named.items():
        p.copy_(shard_like(weights[n], p).to(p.device, p.dtype))


@contextlib.contextmanager
def swapped_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]):
    """Run the body with ``weights`` (by trainable parameter name) in ``model``; the current ones come back after."""
    named = trainable_named(model)
    keep = cpu_copy(named)
    load_weights(named, weights)
    try:
        yield model
    finally:
        load_weights(named, keep)
