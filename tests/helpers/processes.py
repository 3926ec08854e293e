"""Subprocesses and ports: kill a run mid-way as a crash would, and a local port nothing listens on."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from typing import Callable

from helpers import ROOT


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sigkill_when(cmd: list[str], ready: Callable[[], bool], *, env: dict, timeout: float = 240) -> None:
    """Start ``cmd`` (cwd: the repository root, output discarded), wait until ``ready()`` holds, then SIGKILL it:
    no cleanup handler runs, as after a crash or an OOM kill. Fails if the process ends on its own first or
    ``ready()`` does not hold within ``timeout`` seconds."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, f"the run was not ready to be killed after {timeout} s"
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
