"""Small helpers of `tunelab run`: content hashes, atomic JSON, the environment, per-stage peak memory."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tunelab.data.io import dir_digest, file_digest
from tunelab.data.io import stable_hash as io_stable_hash

def stable_hash(obj: Any, n: int = 16) -> str:
    """tunelab.data.io.stable_hash, 16 hex digits by default (the run's stage and file hashes)."""
    return io_stable_hash(obj, n)


def file_sha(path: str | os.PathLike, n: int = 16) -> str:
    """sha256 of a file's bytes, the first ``n`` hex digits (memoised: tunelab.data.io.file_digest)."""
    return file_digest(path)[:n]


def dir_sha(path: str | os.PathLike, pattern: str = "*") -> str:
    """Content hash of the files under a folder (names and bytes): tunelab.data.io.dir_digest."""
    return dir_digest(path, pattern)


def model_identity(spec: str) -> str:
    """What identifies the base model's weights without reading them all: the bundled GGUF's name and size,
    or the names and sizes of an HF folder's files."""
    if spec == "bundled":
        try:
            from tunelab.models.convert import bundled_gguf

            g = bundled_gguf()
            return f"bundled:{g.name}:{g.stat().st_size}"
        except Exception:  # noqa: BLE001 - reported when the model is loaded
            return "bundled"
    p = Path(spec)
    if p.is_file():
        return f"file:{p.name}:{p.stat().st_size}"
    if p.is_dir():
        return "dir:" + stable_hash({str(f.relative_to(p)): f.stat().st_size for f in sorted(p.rglob("*"))
                                     if f.is_file()})
    return spec


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (a temporary file, then rename): a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------------
PACKAGES = ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "numpy", "scipy", "pydantic",
            "openai", "fastapi", "uvicorn")


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git(cwd: Path) -> dict[str, Any] | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def environment(seed: int, experiment_dir: Path) -> dict[str, Any]:
    from importlib import metadata

    from tunelab import __version__

    versions: dict[str, str | None] = {"tunelab": __version__}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cuda = None
    try:
        import torch

        if torch.cuda.is_available():
            cuda = {"device": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                    "cuda": torch.version.cuda}
        threads = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        threads = None
    return {
        "python": platform.python_version(), "platform": platform.platform(), "packages": versions,
        "seed": seed, "cpu": {"model": _cpu_model(), "cores": os.cpu_count(), "torch_threads": threads},
        "cuda": cuda,
        "git": {"experiment": _git(experiment_dir), "tunelab": _git(Path(__file__).resolve().parents[2])},
    }


# --------------------------------------------------------------------------------------------------
# peak memory of one stage
# --------------------------------------------------------------------------------------------------
def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakRss:
    """Samples this process's resident memory while a stage runs (ru_maxrss only ever grows over the whole
    process, so it cannot tell the stages apart)."""

    def __init__(self, every_s: float = 0.2):
        self.every_s = every_s
        self.peak = _rss_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tunelab-rss", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, _rss_bytes() or 0)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.peak = max(self.peak, _rss_bytes() or 0)
        if not self.peak:  # not Linux: the process-wide peak is the best there is
            import resource

            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @property
    def mb(self) -> float:
        return round(self.peak / 2 ** 20, 1)


class Timer:
    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        self.s = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self.t0
