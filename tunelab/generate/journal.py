"""The append-only journal of teacher answers: what makes a run crash-safe and resumable.

One JSON line per finished request, keyed by ``request_key`` (a stable hash of pipeline, prompt spec, the
rendered messages, teacher model and sampling parameters). Lines are written (flushed to the OS) as answers
arrive, so a SIGKILL loses only the requests still in flight; ``fsync`` runs every ``fsync_every`` lines or
``fsync_interval_s`` seconds and on close, so a power cut loses at most one batch. A rerun of the same
command reads the journal and skips every key that is done.

A process killed in the middle of a write can leave a torn last line: it is cut off on open (that request is
simply asked again). A malformed line anywhere else means the file was edited or damaged; that is an error
naming the line, and nothing is changed. An exclusive lock stops two runs from writing one journal.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from tunelab.errors import DataError
from tunelab.evaluate.cache import stable_hash


def request_key(*, pipeline: str, prompt_hash: str, messages: list[dict], model: str, params: dict[str, Any],
                extra: Any = None) -> str:
    """The journal key of one request. The endpoint is not part of it (online and Batch API answers are
    interchangeable), and neither, of course, is the API key."""
    return stable_hash({"pipeline": pipeline, "prompt": prompt_hash, "messages": messages, "model": model,
                        "params": params, "extra": extra}, 32)


class Journal:
    def __init__(self, path: str | os.PathLike, *, fsync_every: int = 64, fsync_interval_s: float = 1.0):
        self.path = Path(path)
        self.fsync_every = fsync_every
        self.fsync_interval_s = fsync_interval_s
        self.entries: dict[str, dict[str, Any]] = {}  # key -> latest entry
        self.torn_bytes = 0  # bytes cut off a torn last line on open
        self.loaded = 0
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a+b")
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.close()
            raise DataError("another `tunelab generate` is writing to this journal; wait for it or use another "
                            "output folder", where=str(self.path)) from None
        self._load()

    # ---------------------------------------------------------------------------------------------- read
    def _load(self) -> None:
        self._f.seek(0)
        data = self._f.read()
        good_end = 0
        lines = data.split(b"\n")
        # Everything after the last newline is a torn write (or empty).
        complete, tail = lines[:-1], lines[-1]
        for i, raw in enumerate(complete, 1):
            if not raw.strip():
                good_end += len(raw) + 1
                continue
            try:
                entry = json.loads(raw)
                if not isinstance(entry, dict) or "key" not in entry:
                    raise ValueError("not a journal entry")
            except ValueError:
                if i == len(complete) and not tail:
                    tail = raw  # a damaged last line: treat as torn
                    break
                raise DataError("damaged journal line (not written by tunelab, or the disk failed); move the "
                                "file aside to start over, or delete this line to redo that request",
                                where=f"{self.path}:{i}") from None
            self.entries[entry["key"]] = entry
            self.loaded += 1
            good_end += len(raw) + 1
        if good_end < len(data):
            self.torn_bytes = len(data) - good_end
            self._f.truncate(good_end)
            self._f.flush()
            os.fsync(self._f.fileno())
        self._f.seek(0, os.SEEK_END)

    def done(self, key: str) -> dict[str, Any] | None:
        e = self.entries.get(key)
        return e if e is not None and e.get("status") == "ok" else None

    def __contains__(self, key: str) -> bool:
        return self.done(key) is not None

    def ok_entries(self) -> Iterator[dict[str, Any]]:
        return (e for e in self.entries.values() if e.get("status") == "ok")

    # ---------------------------------------------------------------------------------------------- write
    def append(self, entry: dict[str, Any]) -> None:
        if "key" not in entry:
            raise ValueError("journal entries need a key")
        self._f.write((json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))
        self._f.flush()  # to the OS: survives a SIGKILL of this process
        self.entries[entry["key"]] = entry
        self._unsynced += 1
        if self._unsynced >= self.fsync_every or time.monotonic() - self._last_sync >= self.fsync_interval_s:
            self.sync()

    def sync(self) -> None:
        if self._f.closed:
            return
        self._f.flush()
        if self._unsynced:
            os.fsync(self._f.fileno())
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
            fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
            self._f.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
