"""What each optimizer step trains on and at which learning rate.

One optimizer step takes ``batch_size`` examples (over all processes) in a fixed, seeded order (``Plan``), split
into micro-batches of at most ``micro_batch_size`` examples and ``micro_batch_tokens`` tokens per process, or with
``micro_batch_size: auto`` into the fewest micro-batches of at most ``micro_batch_tokens`` tokens
(``micro_batches``); the learning rate warms up linearly, then decays by cosine or linearly, or stays constant
(``lr_factor``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tunelab.train.config import TrainConfig
from tunelab.train.data import Example


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine/linear decay towards ``min_ratio`` (or constant). ``step`` is 0-based."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


@dataclass
class Plan:
    n_examples: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    seed: int
    warmup: int

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_examples, generator=g).tolist()

    def step_examples(self, step: int) -> list[int]:
        """Global example indices of optimizer step ``step`` (0-based): a fixed function of seed and step."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

    def key(self) -> dict[str, int]:
        """What a checkpoint must agree on to be resumed by this plan."""
        return {"n_examples": self.n_examples, "batch_size": self.batch_size, "total_steps": self.total_steps,
                "seed": self.seed}


def make_plan(cfg: TrainConfig, n_examples: int) -> Plan:
    t, o = cfg.train, cfg.optim
    spe = n_examples // t.batch_size
    total = t.max_steps or max(1, math.ceil(t.epochs * spe))
    warmup = o.warmup_steps if o.warmup_steps is not None else int(round(o.warmup_ratio * total))
    return Plan(n_examples, t.batch_size, spe, total, t.seed, min(warmup, total))


def _split(lengths: list[int], micro: int, max_tokens: int | None) -> list[int]:
    """Chunk sizes: consecutive examples while at most ``micro`` of them and ``max_tokens`` tokens."""
    sizes, n, tok = [], 0, 0
    for ln in lengths:
        if n and (n == micro or (max_tokens is not None and tok + ln > max_tokens)):
            sizes.append(n)
            n, tok = 0, 0
        n += 1
        tok += ln
    if n:
        sizes.append(n)
    return sizes


def _groups(lengths: list[int], micro: int | str, max_tokens: int | None) -> list[list[int]]:
    """Positions of a process's share per micro-batch. ``micro`` a number: consecutive runs (``_split``);
    ``auto``: the share packed into the fewest micro-batches of at most ``max_tokens`` tokens (first-fit
    decreasing; a longer example alone), whatever the number of examples in each."""
    if micro == "auto":
        from tunelab.train.collate import plan_rows

        assert max_tokens is not None, "micro_batch_size auto needs micro_batch_tokens"
        return [sorted(g) for g in plan_rows(lengths, max_tokens)] if lengths else []
    out, s = [], 0
    for n in _split(lengths, int(micro), max_tokens):
        out.append(list(range(s, s + n)))
        s += n
    return out


def micro_batches(examples: list[Example], idx: list[int], rank: int, world: int, micro: int | str,
                  max_tokens: int | None = None) -> list[list[Example]]:
    """This process's share of a step (every ``world``-th example), as micro-batches of at most ``micro``
    examples and ``max_tokens`` tokens (``micro`` auto: filled up to ``max_tokens``). Every process gets the same
    number of micro-batches (DDP syncs gradients on the last one), so a process with fewer splits its largest
    ones further. The grouping changes no result: the loss is the step's token mean either way."""
    shares = [[len(examples[i]) for i in idx[r::world]] for r in range(world)]
    plans = [_groups(s, micro, max_tokens) for s in shares]
    want = max(len(p) for p in plans)
    groups = plans[rank]
    while len(groups) < want:  # split the largest chunk (want <= examples per process, so this ends)
        j = max(range(len(groups)), key=lambda k: len(groups[k]))
        g = groups[j]
        half = len(g) - len(g) // 2
        groups[j:j + 1] = [g[:half], g[half:]]
    mine = idx[rank::world]
    return [[examples[mine[i]] for i in g] for g in groups]
