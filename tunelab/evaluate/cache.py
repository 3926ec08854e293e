"""Cache of model calls, keyed by (model identity, operation, parameters, rendered prompt, sample index).

SQLite (WAL) in the tunelab cache directory: safe across processes, survives crashes, and makes a rerun of
an unchanged eval free. Every result row records whether its answer came from here.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterable

from tunelab.data.io import stable_hash
from tunelab.models.convert import cache_root


def prompt_hash(messages: list[dict]) -> str:
    return stable_hash(messages, 16)


class CallCache:
    def __init__(self, path: str | Path | None = None, *, enabled: bool = True):
        self.enabled = enabled
        env = os.environ.get("TUNELAB_CALL_CACHE")
        self.path = Path(path) if path else Path(env) if env else cache_root() / "calls.sqlite"
        self._db: sqlite3.Connection | None = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.commit()

    @staticmethod
    def key(model_identity: str, op: str, params: Any, prompt: Any, sample: int = 0) -> str:
        return stable_hash({"model": model_identity, "op": op, "params": params, "prompt": prompt,
                            "sample": sample})

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        if not self._db or not keys:
            return {}
        found: dict[str, Any] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            q = f"SELECT key, value FROM calls WHERE key IN ({','.join('?' * len(chunk))})"
            for k, v in self._db.execute(q, chunk):
                found[k] = json.loads(v)
        return found

    def put_many(self, items: Iterable[tuple[str, Any]]) -> None:
        if not self._db:
            return
        self._db.executemany("INSERT OR REPLACE INTO calls (key, value) VALUES (?, ?)",
                             [(k, json.dumps(v, ensure_ascii=False)) for k, v in items])
        self._db.commit()

    def close(self) -> None:
        if self._db:
            self._db.close()
            self._db = None
