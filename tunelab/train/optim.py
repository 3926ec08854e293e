"""The optimizer: AdamW over the trainable parameters, split into groups by ``optim.param_groups`` (each with its
own lr multiplier and weight decay) and by shape (no weight decay on 1-D tensors).
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
    """AdamW over the trainable parameters: weight decay on matrices only; ``optim.param_groups`` give the
    parameters they match (first match wins) their own lr multiplier (``lr_scale``, read by the schedule)."""
    return torch.optim.AdamW(param_groups(run.cfg.optim, named), lr=run.cfg.optim.lr, betas=run.cfg.optim.betas,
                             eps=run.cfg.optim.eps)


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
