"""What every command prints with: the stdout and stderr consoles, the progress bars, the one-line error, and
which library noise is kept off stderr."""

from __future__ import annotations

import os
from typing import Callable, NoReturn

import typer
from rich.console import Console

# Wide enough for the results table when the output is a file or a CI log (rich defaults to 80 there).
console = Console(width=None if Console().is_terminal else 160)
err_console = Console(stderr=True)


def print_error(message: str) -> None:
    """``error: MESSAGE`` as one line on stderr."""
    err_console.print(f"error: {message}", highlight=False, soft_wrap=True, markup=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: MESSAGE`` as one line on stderr and exit (2: bad input)."""
    print_error(message)
    raise typer.Exit(code)


def log(message: str) -> None:
    """One progress line on stderr, printed as given (no markup, no highlighting, no wrapping)."""
    err_console.print(message, highlight=False, markup=False, soft_wrap=True)


def new_progress(*, transient: bool = False):
    """Progress bars on stderr (description, bar, done/total, elapsed, remaining); silent unless it is a terminal."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err_console, transient=transient,
                    disable=not err_console.is_terminal)


def progress_factory(progress) -> Callable[[str, int], Callable[[int], None]]:
    """``(description, total) -> advance(n)`` over a ``new_progress()``: what the library's runners take."""
    def make(desc: str, total: int) -> Callable[[int], None]:
        task = progress.add_task(desc, total=total)
        return lambda n: progress.advance(task, n)

    return make


# Warnings raised inside third-party code that tunelab cannot avoid: (message, category, module), as regular
# expressions for warnings.filterwarnings. The CLI ignores exactly these; tests/conftest.py has pytest ignore them.
THIRD_PARTY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # peft's PeftModel.__init__ reads model.is_gradient_checkpointing, which transformers 5 deprecates: every
    # adapter that is trained, loaded or merged raises it; tunelab never reads the property.
    ("`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils\Z"),
    # The embedding recipes train embed_tokens (lora.modules_to_save) of SmolLM2, whose output head is tied to it.
    # PEFT suggests ensure_weight_tying=True, which would tie the trained copy into lm_head as well: another model
    # than the one each recipe was measured with (the head stays the base's).
    ("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter", UserWarning,
     r"peft\.tuners\.tuners_utils\Z"),
    # Merging such an adapter gives the model a trained input embedding beside the base's output head; PEFT unties
    # them in the merged config, which is what that model needs (tunelab merge, tunelab/train/merge.py).
    ("Input and output embeddings are no longer tied after merging", UserWarning, r"peft\.tuners\.tuners_utils\Z"),
    # The server's LRU eviction deletes an adapter PEFT counts as active, and PEFT activates another; serving routes
    # every row by adapter_names, so which adapter is active is never used (tunelab/serve/adapters.py).
    ("Adapter .* was active which is now deleted", UserWarning, r"peft\.tuners\.tuners_utils\Z"),
)


def quiet_libraries() -> None:
    """Before a command runs: the hub offline, no transformers advisories or hub progress bars, and the known
    third-party warnings above ignored (one by one: any other warning still shows)."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for message, category, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # bitsandbytes (lora.quantize) logs on every 8-bit matmul that it casts the input to fp16, and at import on a
    # CPU with AVX512-BF16 that the optional `kernels` package is missing (it falls back to its own kernels).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
