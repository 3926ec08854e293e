"""`tunelab vocab extend` (registered by tunelab/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunelab.options import field_option
from tunelab.vocab.config import VocabConfig


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


def register(app: typer.Typer) -> None:
    vocab_app = typer.Typer(help="Extend a model's vocabulary for a new language or domain.", no_args_is_help=True)
    vocab_app.command("extend")(extend_cmd)
    app.add_typer(vocab_app, name="vocab")
