"""What every command prints with: the stdout and stderr consoles, the progress bars, and the one-line error."""

from __future__ import annotations

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
