"""`tunelab vocab extend` (registered by tunelab/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunelab.options import field_option
from tunelab.vocab.config import AlignConfig, VocabConfig


def extend_cmd(
    data: Path = typer.Option(..., "--data", "-d", help="In-domain text: JSONL or CSV records."),
    out: Path = typer.Option(..., "--out", "-o", help="A new directory for the extended model."),
    field: str = field_option(VocabConfig, "field", "--field"),
    add: int = field_option(VocabConfig, "add", "--add", "-n"),
    model: str = field_option(VocabConfig, "model", "--model", "-m"),
    limit: Optional[int] = field_option(VocabConfig, "limit", "--limit"),
    min_frequency: int = field_option(VocabConfig, "min_frequency", "--min-frequency"),
    encoding: Optional[str] = field_option(VocabConfig, "encoding", "--encoding"),
) -> None:
    """Add N tokens learnt from in-domain text to a base model (old ids unchanged), new embedding rows the mean of
    the rows of their pieces; writes an ordinary HF model directory.

    tunelab vocab extend --data reviews.jsonl --add 2000 --out models/smollm2-ko
    """
    from tunelab.console import log, new_progress, progress_factory
    from tunelab.vocab.extend import extend_vocab

    cfg = VocabConfig(field=field, add=add, model=model, limit=limit, min_frequency=min_frequency,
                      encoding=encoding)
    with new_progress(transient=True) as progress:
        rep = extend_vocab(data, out, cfg, log=log, progress=progress_factory(progress))
    saved = 1 - rep.tokens_per_text_after / rep.tokens_per_text_before
    log(f"tokens per text: {rep.tokens_per_text_before:.1f} before, {rep.tokens_per_text_after:.1f} after "
        f"({saved:.0%} fewer; {rep.texts} texts, {rep.added} tokens added, vocabulary {rep.base_vocab_size} -> "
        f"{rep.vocab_size}, {rep.seconds:.0f} s)")
    print(str(out))


def align_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="A model written by `tunelab vocab extend` (or a stage that "
                                                          "started from one)."),
    data: Path = typer.Option(..., "--data", "-d", help="In-domain text: JSONL or CSV records."),
    out: Path = typer.Option(..., "--out", "-o", help="A new directory for the aligned model."),
    field: str = field_option(AlignConfig, "field", "--field"),
    limit: Optional[int] = field_option(AlignConfig, "limit", "--limit"),
    encoding: Optional[str] = field_option(AlignConfig, "encoding", "--encoding"),
    eval_texts: int = field_option(AlignConfig, "eval_texts", "--eval-texts"),
    batch_size: int = field_option(AlignConfig, "batch_size", "--batch-size"),
    epochs: float = field_option(AlignConfig, "epochs", "--epochs"),
    lr: float = field_option(AlignConfig, "lr", "--lr"),
    max_tokens: int = field_option(AlignConfig, "max_tokens", "--max-tokens"),
    seed: int = field_option(AlignConfig, "seed", "--seed"),
    dtype: str = field_option(AlignConfig, "dtype", "--dtype"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Torch CPU threads."),
) -> None:
    """Teach the new rows of an extended model what the base reads in bytes: only the new embedding rows train, so
    that the model's hidden states where a text in new tokens and the same text in old tokens share a token boundary
    match its own on the old tokens (self-distillation; every other weight is unchanged).

    tunelab vocab align --model models/smollm2-ko --data reviews.jsonl --limit 6000 --out models/smollm2-ko-aligned
    """
    from tunelab.console import log, new_progress, progress_factory
    from tunelab.vocab.align import align_vocab

    cfg = AlignConfig(field=field, limit=limit, encoding=encoding, eval_texts=eval_texts, batch_size=batch_size,
                      epochs=epochs, lr=lr, max_tokens=max_tokens, seed=seed, dtype=dtype)
    with new_progress(transient=True) as progress:
        rep = align_vocab(model, data, out, cfg, log=log, progress=progress_factory(progress), threads=threads)
    log(f"aligned {rep.new_rows} new rows on {rep.texts} texts in {rep.steps} steps ({rep.seconds:.0f} s): held-out "
        f"alignment loss {rep.loss_before:.4f} -> {rep.loss_after:.4f}; bits per byte on the new tokens "
        f"{rep.bits_per_byte_before:.3f} -> {rep.bits_per_byte_after:.3f} (the base on its own tokens: "
        f"{rep.bits_per_byte_base:.3f})")
    print(str(out))


def register(app: typer.Typer) -> None:
    vocab_app = typer.Typer(help="Extend a model's vocabulary for a new language or domain.", no_args_is_help=True)
    vocab_app.command("extend")(extend_cmd)
    vocab_app.command("align")(align_cmd)
    app.add_typer(vocab_app, name="vocab")
