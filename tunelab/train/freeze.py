"""Which weights a run trains (the ``trainable:`` section): ``apply_trainable`` freezes every parameter that
``trainable.match`` does not name (methods full and pretrain) and, with ``trainable.new_rows_only``, lets only the
rows of the input embedding and output layer that `tunelab vocab extend` added learn (EEVE's first stage, and its
"new rows next to LoRA" one).

The rows are held with a hook after gradient accumulation (``register_post_accumulate_grad_hook``) that zeroes the old
rows' gradient before clipping and the optimizer step: AdamW's moments of those rows stay 0 and so does their
update, with weight decay 0 (the config requires it), so the old rows come out bit-identical. A sparse-row
optimizer or an embedding split in two modules would save the old rows' optimizer memory (2 x vocab x hidden
floats); measured not worth a second embedding path for 135M-1B models, whose old rows are a few MB to a few
hundred MB of moments.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tunelab.errors import ConfigError
from tunelab.train.config import TrainableConfig


def apply_trainable(model: torch.nn.Module, settings: TrainableConfig, model_path: Path | str,
                    log=lambda m: None) -> None:
    """Freeze what ``settings.match`` leaves out and hold the old vocabulary rows (``settings.new_rows_only``)."""
    named = dict(model.named_parameters())
    if settings.match is not None:
        kept = [n for n in named if any(re.search(m, n) for m in settings.match)]
        if not kept:
            raise ConfigError(f"trainable.match {settings.match} names no parameter (names look like "
                              f"{next(iter(named), '')!r})", where="trainable.match")
        for n, p in named.items():
            p.requires_grad_(n in kept)
        log(f"trainable: {len(kept)} of {len(named)} parameter tensors match {settings.match}; the rest frozen")
    if settings.new_rows_only:
        first = first_new_id(model_path)
        rows = vocabulary_rows(model)
        held = [(n, p) for n, p in rows if p.requires_grad]
        if not held:
            raise ConfigError("trainable.new_rows_only: neither the input embedding nor the output layer trains "
                              "(methods full/pretrain: let trainable.match name embed_tokens; lora: put embed_tokens "
                              "in lora.modules_to_save)", where="trainable.new_rows_only")
        for _, p in held:
            p.register_post_accumulate_grad_hook(_zero_rows_below(first))
        vocab = held[0][1].shape[0]
        log(f"trainable: only rows {first}..{vocab - 1} (the {vocab - first} added tokens) of "
            f"{', '.join(n for n, _ in held)} learn; the {first} old rows stay as they are")


def _zero_rows_below(first: int):
    def hook(p: torch.Tensor) -> None:
        if p.grad is not None:
            p.grad[:first].zero_()
    return hook


def vocabulary_rows(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters with one row per token: the input embedding and the output layer (once when tied), PEFT's
    trainable copies (modules_to_save) included."""
    n_vocab = model.get_input_embeddings().weight.shape[0]
    seen: set[int] = set()
    out = []
    for n, p in model.named_parameters():
        if p.ndim == 2 and p.shape[0] == n_vocab and id(p) not in seen and re.search(r"embed|lm_head|wte|output", n):
            seen.add(id(p))
            out.append((n, p))
    return out


def first_new_id(model_path: Path | str) -> int:
    """The first id `tunelab vocab extend` added to the model in ``model_path`` (its tunelab_vocab.json)."""
    from tunelab.models.base import VOCAB_FILE

    path = Path(model_path) / VOCAB_FILE
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["first_new_id"])
    except FileNotFoundError:
        raise ConfigError(f"trainable.new_rows_only needs a model whose vocabulary `tunelab vocab extend` grew "
                          f"({path} is missing): there are no new rows to train otherwise",
                          where="trainable.new_rows_only") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read first_new_id from {path}: {e}", where="trainable.new_rows_only") from None
