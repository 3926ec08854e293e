"""Shared by the benchmarks that measure each contender in a process of its own (peak RSS and imports stay apart)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

QUIET_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
             "PYTHONWARNINGS": "ignore"}


def run_child(script: str, which: str, *, timeout: float, threads: int | None = None, cwd=None) -> dict:
    """Rerun ``script`` with ``--child WHICH`` and this command line's arguments; its last stdout line is the JSON
    result. A failed child prints its stderr's tail and stops the benchmark."""
    cmd = [sys.executable, script, "--child", which, *sys.argv[1:]]
    env = {**os.environ, **QUIET_ENV}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"{which} failed (exit {p.returncode})")
    return json.loads(p.stdout.strip().splitlines()[-1])
