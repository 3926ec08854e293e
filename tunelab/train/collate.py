"""Examples -> model inputs: padding-free packed rows, or one padded row per example.

Packing concatenates sequences into rows (first-fit decreasing, at most ``pack_len`` tokens). Each token keeps
its own sequence's position id, and attention stops at sequence boundaries, so a packed batch computes exactly
what the same sequences would compute one by one (tested). Two ways to stop it:

- ``varlen`` (``train.attention: auto`` on a CPU): one row holding every sequence of the micro-batch, no
  padding at all, and the sequence boundaries (``segments``) handed to an attention function that runs causal
  attention per sequence (``tunelab.train.attention.varlen_attention``). Attention then costs sum(L_i^2), not
  (sum L_i)^2.
- ``mask``: rows of at most ``pack_len`` tokens with a block-diagonal causal bool mask ``(B, 1, T, T)``, which
  transformers uses as given; works with any attention implementation.

``pad_to`` (``train.compile``, ``train.attention: flex``) rounds a row's length up to a multiple of that many
tokens, so that a compiled layer meets few shapes; the padding is no target, and no real token attends to it.

Only the positions that predict a target token are listed (``pred_rows``, ``pred_cols``): the loss applies
the output projection there only. With ``prompt_targets`` every other token of an example (system prompt,
user turn: everything that is not the answer) is listed as well, after all the answer targets
(``targets[n_answer:]``), for a language-modelling loss on the prompt (``train.prompt_loss_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    n_answer: int | None = None   # targets[:n_answer] are answer targets, the rest prompt targets; None: all

    @property
    def n_targets(self) -> int:
        """Answer targets (the prompt targets of ``prompt_targets`` not counted)."""
        return int(self.targets.numel()) if self.n_answer is None else self.n_answer

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    def to(self, device: torch.device) -> "Batch":
        mask = self.attention_mask.to(device) if self.attention_mask is not None else None
        return Batch(self.input_ids.to(device), self.position_ids.to(device), mask, self.pred_rows.to(device),
                     self.pred_cols.to(device), self.targets.to(device), self.n_tokens, self.n_examples,
                     self.segments, self.n_answer)


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
            varlen: bool = False, prompt_targets: bool = False, pad_to: int | None = None) -> Batch:
    """Build a batch: one varlen row (``packing`` and ``varlen``), packed rows with a block-diagonal mask
    (``packing``), or one right-padded row per example. ``prompt_targets``: also list the non-answer tokens;
    ``pad_to``: row lengths rounded up to a multiple of it."""
    if not examples:
        raise ValueError("empty batch")
    lengths = [len(e) for e in examples]
    if packing and varlen:
        return _varlen(examples, lengths, prompt_targets, pad_to, pad_id)
    rows = plan_rows(lengths, pack_len) if packing else [[i] for i in range(len(examples))]
    B = len(rows)
    T = _round_up(max(sum(lengths[i] for i in r) for r in rows), pad_to)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)  # sequence id per token; -1 = padding
    answer, prompt = _Targets(), _Targets() if prompt_targets else None
    for b, r in enumerate(rows):
        col = 0
        for s, i in enumerate(r):
            ex, n = examples[i], lengths[i]
            ids[b, col:col + n] = torch.tensor(ex.input_ids)
            pos[b, col:col + n] = torch.arange(n)
            seg[b, col:col + n] = s
            _collect(ex, b, col, answer, prompt)
            col += n
        if col < T:
            pos[b, col:] = torch.arange(T - col)
    causal = torch.ones(T, T, dtype=torch.bool).tril()                     # (T, T)
    same = seg[:, :, None] == seg[:, None, :]                                # (B, T, T)
    real = (seg >= 0)[:, None, :]                                            # keys that are tokens
    mask = causal & same & real
    # Padding queries see themselves only: no all-masked rows (NaN in attention), no effect on real tokens.
    mask |= torch.eye(T, dtype=torch.bool) & (seg < 0)[:, :, None]
    return _batch(ids, pos, mask[:, None], answer, prompt, sum(lengths), len(examples))


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _varlen(examples: list[Example], lengths: list[int], prompt_targets: bool, pad_to: int | None = None,
            pad_id: int = 0) -> Batch:
    ids, pos, segments = [], [], [0]
    answer, prompt = _Targets(), _Targets() if prompt_targets else None
    col = 0
    for ex, n in zip(examples, lengths):
        ids += ex.input_ids
        pos += range(n)
        _collect(ex, 0, col, answer, prompt)
        col += n
        segments.append(col)
    tail = _round_up(col, pad_to) - col  # after segments[-1]: varlen gives it zeros, flex a document of its own
    ids += [pad_id] * tail
    pos += range(tail)
    return _batch(torch.tensor([ids]), torch.tensor([pos]), None, answer, prompt, col, len(examples), segments)


@dataclass
class _Targets:
    rows: list[int] = field(default_factory=list)
    cols: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)


def _collect(ex: Example, row: int, col: int, answer: _Targets, prompt: _Targets | None) -> None:
    """The positions of ``ex`` (placed at ``row``, from ``col``) that predict a target; the hidden state at
    t-1 predicts token t."""
    for t in range(1, len(ex)):
        into = answer if ex.targets[t] else prompt
        if into is not None:
            into.rows.append(row)
            into.cols.append(col + t - 1)
            into.ids.append(ex.input_ids[t])


def _batch(ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, answer: _Targets,
           prompt: _Targets | None, n_tokens: int, n_examples: int, segments: list[int] | None = None) -> Batch:
    both = [answer] if prompt is None else [answer, prompt]
    cat = lambda f: torch.tensor([v for t in both for v in getattr(t, f)], dtype=torch.long)  # noqa: E731
    return Batch(ids, pos, mask, cat("rows"), cat("cols"), cat("ids"), n_tokens, n_examples, segments,
                 None if prompt is None else len(answer.ids))
