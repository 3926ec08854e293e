"""The `tunelab` command line: the typer app; every command registers from its package's command module."""

from __future__ import annotations

import importlib
import os
import sys

import typer

from tunelab import __version__
from tunelab.console import console, err_console, print_error, quiet_libraries
from tunelab.errors import TunelabError

app = typer.Typer(help="tunelab: measure prompts, generate teacher data, fine-tune and serve small LMs.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

# Each module has register(app); the order is the order of `tunelab --help`.
COMMAND_MODULES = ("tunelab.evaluate.command", "tunelab.prompts.command", "tunelab.train.command",
                   "tunelab.generate.command", "tunelab.serve.command", "tunelab.vocab.command",
                   "tunelab.run.command")


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        console.print(f"tunelab {__version__}")
        raise typer.Exit(0)


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Entry point: bad input becomes one line on stderr and exit code 2, never a traceback: our own errors
    (TunelabError) and the command line's (an unknown command or option, a value out of its bounds)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    try:
        code = app(standalone_mode=False)  # click returns what a standalone run would exit with
    except TunelabError as e:
        print_error(str(e))
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # the command line's own errors (typer's click: UsageError and kin)
        if type(e).__name__ != "NoArgsIsHelpError":  # (`tunelab` alone: typer has printed the help already)
            print_error(usage_line(e))
        sys.exit(getattr(e, "exit_code", 2))
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def usage_line(e: typer.TyperException) -> str:
    """A command-line mistake in one line, with where to read more: ``eval: Invalid value for '--samples': ...
    (see `tunelab eval --help`)``."""
    names, ctx = [], getattr(e, "ctx", None)
    while ctx is not None and ctx.parent is not None:  # the command's names below the program, however it ran
        names.insert(0, ctx.info_name)
        ctx = ctx.parent
    path = " ".join(names)
    where = f"{path}: " if path else ""
    return f"{where}{e.format_message()} (see `tunelab {path + ' ' if path else ''}--help`)"


if __name__ == "__main__":
    main()
