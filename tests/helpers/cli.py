"""The real `tunelab` CLI in a subprocess, as a user runs it, and the two ways a run may end: done, or refused
with one clean error line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import ROOT


def tunelab_cmd(*args: str | Path) -> list[str]:
    """The command line of `tunelab ARGS` with this interpreter."""
    return [sys.executable, "-m", "tunelab.cli", *map(str, args)]


def cli_env(threads: int = 1, **extra: str) -> dict[str, str]:
    """This process's environment for a CLI subprocess: offline, quiet, ``threads`` torch threads (the cores are
    shared), and ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore", **extra}


def run_cli(*args: str | Path, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `tunelab ARGS` to its end (cwd: the repository root), ``env`` over this process's environment."""
    return subprocess.run(tunelab_cmd(*args), capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=cwd or ROOT, timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """A run that succeeded: exit 0, no traceback. Returns ``p``."""
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p


def assert_clean_error(p: subprocess.CompletedProcess, *needles: str, last_line_only: bool = False) -> str:
    """Bad input, refused as every tunelab command must: exit 2, no traceback, and one line on stderr that starts
    with ``error: `` and holds every needle. With ``last_line_only`` (a command that logs progress before it fails)
    the error is the last of several lines and the only one that starts with ``error``. Returns the error line."""
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert lines and (last_line_only or len(lines) == 1), p.stderr[-2000:]
    line = lines[-1]
    assert line.startswith("error: "), line
    assert not any(ln.startswith("error") for ln in lines[:-1]), p.stderr[-2000:]
    for n in needles:
        assert n in line, (n, line)
    return line
