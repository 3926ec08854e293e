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
                   "tunelab.generate.command", "tunelab.serve.command", "tunelab.run.command")


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        console.print(f"tunelab {__version__}")
        raise typer.Exit(0)


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Entry point: bad input becomes one line on stderr and exit code 2, never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    try:
        app(standalone_mode=True)
    except TunelabError as e:
        print_error(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
