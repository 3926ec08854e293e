"""Examples -> model inputs: padding-free packed rows, or one padded row per example.

Packing concatenates sequences into rows (first-fit decreasing, at most ``pack_len`` tokens). Each token keeps
its own sequence's position id, and attention stops at sequence boundaries, so a packed batch computes exactly
what the same sequences would compute one by one (tested). Two ways to stop it:

- ``varlen`` (default): one row holding every sequence of the micro-batch, no padding at all, and the
  sequence boundaries (``segments``) handed to an attention function that runs causal attention per sequence
  (``tunelab.train.loop.varlen_attention``). Attention then costs sum(L_i^2), not (sum L_i)^2.
- ``mask``: rows of at most ``pack_len`` tokens with a block-diagonal causal bool mask ``(B, 1, T, T)``, which
  transformers uses as given; works with any attention implementation.

Only the positions that predict a target token are listed (``pred_rows``, ``pred_cols``): the loss applies
the output projection there only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.train.data import Example


@dataclass
class Batch:
    input_ids: torch.Tensor       # (B, T) long
    position_ids: torch.Tensor    # (B, T) long
    attention_mask: torch.Tensor | None  # (B, 1, T, T) bool: may query q attend to key k; None for varlen
    pred_rows: torch.Tensor       # (N,) row of each position that predicts a target
    pred_cols: torch.Tensor       # (N,) column of that position
    targets: torch.Tensor         # (N,) the token ids to predict
    n_tokens: int                 # real (non-padding) tokens
    n_examples: int
    segments: list[int] | None = None  # varlen: sequence boundaries in the single row, [0, l1, l1+l2, ...]

    @property
    def n_targets(self) -> int:
        return int(self.targets.numel())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    def to(self, device: torch.device) -> "Batch":
        mask = self.attention_mask.to(device) if self.attention_mask is not None else None
        return Batch(self.input_ids.to(device), self.position_ids.to(device), mask, self.pred_rows.to(device),
                     self.pred_cols.to(device), self.targets.to(device), self.n_tokens, self.n_examples,
                     self.segments)


def plan_rows(lengths: list[int], pack_len: int) -> list[list[int]]:
    """First-fit decreasing: example indices per row, each row at most ``max(pack_len, longest)`` tokens."""
    cap = max([pack_len, *lengths])
    rows: list[list[int]] = []
    space: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, free in enumerate(space):
            if lengths[i] <= free:
                rows[r].append(i)
                space[r] -= lengths[i]
                break
        else:
            rows.append([i])
            space.append(cap - lengths[i])
    return rows


def collate(examples: list[Example], *, packing: bool = True, pack_len: int = 1024, pad_id: int = 0,
            varlen: bool = False) -> Batch:
    """Build a batch: one varlen row (``packing`` and ``varlen``), packed rows with a block-diagonal mask
    (``packing``), or one right-padded row per example."""
    if not examples:
        raise ValueError("empty batch")
    lengths = [len(e) for e in examples]
    if packing and varlen:
        return _varlen(examples, lengths)
    rows = plan_rows(lengths, pack_len) if packing else [[i] for i in range(len(examples))]
    B = len(rows)
    T = max(sum(lengths[i] for i in r) for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)  # sequence id per token; -1 = padding
    pr, pc, tg = [], [], []
    for b, r in enumerate(rows):
        col = 0
        for s, i in enumerate(r):
            ex, n = examples[i], lengths[i]
            ids[b, col:col + n] = torch.tensor(ex.input_ids)
            pos[b, col:col + n] = torch.arange(n)
            seg[b, col:col + n] = s
            for t in range(1, n):
                if ex.targets[t]:
                    pr.append(b)
                    pc.append(col + t - 1)  # the hidden state at t-1 predicts token t
                    tg.append(ex.input_ids[t])
            col += n
        if col < T:
            pos[b, col:] = torch.arange(T - col)
    causal = torch.ones(T, T, dtype=torch.bool).tril()                     # (T, T)
    same = seg[:, :, None] == seg[:, None, :]                                # (B, T, T)
    real = (seg >= 0)[:, None, :]                                            # keys that are tokens
    mask = causal & same & real
    # Padding queries see themselves only: no all-masked rows (NaN in attention), no effect on real tokens.
    mask |= torch.eye(T, dtype=torch.bool) & (seg < 0)[:, :, None]
    return Batch(ids, pos, mask[:, None], torch.tensor(pr, dtype=torch.long), torch.tensor(pc, dtype=torch.long),
                 torch.tensor(tg, dtype=torch.long), sum(lengths), len(examples))


def _varlen(examples: list[Example], lengths: list[int]) -> Batch:
    ids, pos, pr, pc, tg, segments = [], [], [], [], [], [0]
    col = 0
    for ex, n in zip(examples, lengths):
        ids += ex.input_ids
        pos += range(n)
        for t in range(1, n):
            if ex.targets[t]:
                pc.append(col + t - 1)
                tg.append(ex.input_ids[t])
        col += n
        segments.append(col)
    pr = [0] * len(pc)
    return Batch(torch.tensor([ids]), torch.tensor([pos]), None, torch.tensor(pr, dtype=torch.long),
                 torch.tensor(pc, dtype=torch.long), torch.tensor(tg, dtype=torch.long), col, len(examples),
                 segments)
