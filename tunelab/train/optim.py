"""The optimizer: AdamW over the trainable parameters, split into groups by ``optim.param_groups`` (each with its
own lr multiplier and weight decay) and by shape (no weight decay on 1-D tensors).

``optim.optimizer``: ``adamw`` (torch; ``optim.fused``: its fused kernel, by default on CUDA) or ``adamw8bit``
(bitsandbytes' AdamW8bit: block-wise 8-bit moments, on CUDA and on bitsandbytes' CPU backend). ``optim.offload``
(full fine-tuning on CUDA): :class:`OffloadedAdamW` keeps the state and an fp32 copy of the weights on the CPU.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from tunelab.errors import ConfigError
from tunelab.train.config import OptimConfig

if TYPE_CHECKING:
    from tunelab.train.session import TrainSession


def build_optimizer(run: TrainSession, named: dict[str, torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (or AdamW8bit) over the trainable parameters: weight decay on matrices only; ``optim.param_groups``
    give the parameters they match (first match wins) their own lr multiplier (``lr_scale``, read by the
    schedule)."""
    o = run.cfg.optim
    groups = param_groups(o, named)
    if o.optimizer == "adamw8bit":
        bnb = require_bitsandbytes_optim()
        return bnb.optim.AdamW8bit(groups, lr=o.lr, betas=o.betas, eps=o.eps)
    fused = use_fused(o.fused, run.device)
    if o.offload:
        if run.device.type != "cuda":
            run.log("note: optim.offload keeps the optimizer state in CPU memory; this run is on the CPU, where "
                    "it is already: no-op")
        else:
            return OffloadedAdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, **({"fused": True} if fused else {}))


def use_fused(fused: bool | str, device: torch.device) -> bool:
    """``optim.fused``: auto is on CUDA only (on a CPU torch's default foreach step is as fast)."""
    return device.type == "cuda" if fused == "auto" else bool(fused)


def require_bitsandbytes_optim():
    """The bitsandbytes module for ``optim.optimizer: adamw8bit``, or one error line saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ConfigError(f"optim.optimizer adamw8bit needs bitsandbytes (pip install 'bitsandbytes>=0.49'): {e}",
                          where="optim.optimizer") from None
    return bitsandbytes


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (moments, quantisation maps and scales), wherever they are."""
    def walk(v) -> int:
        if torch.is_tensor(v):
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        return 0
    return sum(walk(st) for st in optimizer.state.values())


class OffloadedAdamW(torch.optim.AdamW):
    """AdamW whose state lives in CPU memory: it steps fp32 CPU copies of the (device) parameters it is given.

    ``step`` copies each gradient to its CPU copy, runs AdamW there and copies the updated weights back;
    ``zero_grad`` clears the device gradients too. ``param_groups`` and ``state_dict`` are AdamW's own over the
    CPU copies, in the parameters' order, so the schedule, checkpoints and --resume see a plain AdamW."""

    def __init__(self, groups: list[dict[str, Any]], **kw: Any):
        self.device_params: list[torch.nn.Parameter] = [p for g in groups for p in g["params"]]
        cpu_groups = []
        for g in groups:
            copies = [torch.nn.Parameter(p.detach().to("cpu", torch.float32, copy=True)) for p in g["params"]]
            cpu_groups.append({**g, "params": copies})
        super().__init__(cpu_groups, foreach=True, **kw)
        self.cpu_params = [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for dev, cpu in zip(self.device_params, self.cpu_params):
            cpu.grad = None if dev.grad is None else dev.grad.detach().to("cpu", torch.float32)
        loss = super().step(closure)
        for dev, cpu in zip(self.device_params, self.cpu_params):
            if cpu.grad is not None:
                dev.copy_(cpu, non_blocking=False)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        super().zero_grad(set_to_none)
        for p in self.device_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def sync_from_device(self) -> None:
        """Copy the device weights into the CPU copies (after they were loaded from a checkpoint)."""
        with torch.no_grad():
            for dev, cpu in zip(self.device_params, self.cpu_params):
                cpu.copy_(dev.detach().to("cpu", torch.float32))


def param_groups(o: OptimConfig, named: dict[str, torch.nn.Parameter]) -> list[dict[str, Any]]:
    buckets: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for n, p in named.items():
        k = next((i for i, g in enumerate(o.param_groups) if re.search(g.match, n)), -1)
        buckets.setdefault((k, p.ndim >= 2), []).append(p)
    for i, g in enumerate(o.param_groups):
        if not any(k == i for k, _ in buckets):
            example = next(iter(named), "")
            raise ConfigError(f"optim.param_groups[{i}].match {g.match!r} matches no trainable parameter "
                              f"(names look like {example!r})", where="optim.param_groups")
    groups = []
    for (k, matrix), params in sorted(buckets.items(), key=lambda kv: (kv[0][0], not kv[0][1])):
        spec = o.param_groups[k] if k >= 0 else None
        wd = spec.weight_decay if spec is not None and spec.weight_decay is not None else o.weight_decay
        groups.append({"params": params, "weight_decay": wd if matrix else 0.0,
                       "lr_scale": spec.lr_scale if spec is not None else 1.0})
    return groups
