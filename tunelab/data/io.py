"""Dataset readers: JSONL and CSV, with errors that name the file and line."""

from __future__ import annotations

import csv
import json
import os
from contextlib import closing
from pathlib import Path
from typing import Any, Iterable, Iterator

from tunelab.errors import DataError
from tunelab.textfiles import text_lines


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, hex (memoised per process by path, size and mtime in nanoseconds)."""
    import hashlib

    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with p.open("rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def stable_hash(obj: Any, n: int = 64) -> str:
    """sha256 of canonical JSON (sorted keys, UTF-8), truncated to n hex digits."""
    import hashlib

    data = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:n]


def dir_digest(path: str | os.PathLike, pattern: str = "*", n: int = 16) -> str:
    """Content hash of the files under a folder that match ``pattern``: their relative names and bytes."""
    p = Path(path)
    return stable_hash({str(f.relative_to(p)): file_digest(f)[:16] for f in sorted(p.rglob(pattern)) if f.is_file()},
                       n)


def read_jsonl(path: str | os.PathLike, *, limit: int | None = None, encoding: str | None = None,
               encoding_option: str | None = None) -> list[dict[str, Any]]:
    """Read a JSON Lines file of objects. Blank lines are skipped; a bad line raises DataError(path:line).
    ``encoding``: the file's encoding (default: UTF-8, BOM or not, see tunelab/textfiles.py); ``encoding_option``:
    how the command names one, for the error of a file that does not decode."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no such file: {p}")
    rows: list[dict[str, Any]] = []
    with closing(text_lines(p, encoding=encoding, option=encoding_option)) as lines:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                # some messages end in "at" ("Unterminated string starting at"): the column completes them
                raise DataError(f"malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno}); expected one "
                                "JSON object per line", where=f"{p}:{lineno}") from None
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object, got {type(obj).__name__}", where=f"{p}:{lineno}")
            obj.setdefault("_line", lineno)
            rows.append(obj)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def read_csv(path: str | os.PathLike, *, limit: int | None = None, encoding: str | None = None,
             encoding_option: str | None = None) -> list[dict[str, Any]]:
    """Read a CSV file with a header row (decoding as read_jsonl: a UTF-8 BOM, as Excel writes, is no part of the
    first field's name)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no such file: {p}")
    rows: list[dict[str, Any]] = []
    with closing(text_lines(p, encoding=encoding, newline="", option=encoding_option)) as lines:
        reader = csv.DictReader(lines)
        if not reader.fieldnames:
            raise DataError("empty CSV file; expected a header row", where=f"{p}:1")
        for row in reader:
            lineno = reader.line_num
            if None in row:
                raise DataError(f"row has more fields than the header ({len(reader.fieldnames)})", where=f"{p}:{lineno}")
            row = dict(row)
            row["_line"] = lineno
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def read_records(path: str | os.PathLike, *, limit: int | None = None, encoding: str | None = None,
                 encoding_option: str | None = None) -> list[dict[str, Any]]:
    """Read a dataset by extension: .jsonl/.json (JSON Lines) or .csv; ``encoding`` as read_jsonl."""
    p = Path(path)
    suffix = p.suffix.lower()
    kw = dict(limit=limit, encoding=encoding, encoding_option=encoding_option)
    if suffix in (".csv",):
        return read_csv(p, **kw)
    if suffix in (".jsonl", ".json", ".ndjson", ""):
        return read_jsonl(p, **kw)
    raise DataError(f"unsupported dataset format {suffix!r}; expected .jsonl or .csv", where=str(p))


def record_location(row: dict[str, Any], path: str | os.PathLike | None) -> str:
    """'path:line' for a record read by this module (for error messages)."""
    line = row.get("_line")
    return f"{path}:{line}" if path is not None and line is not None else str(path or "<data>")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically (tmp file + rename), so a crash never leaves a half-written file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return n


class JsonlAppender:
    """Append-only JSONL writer: one flushed line per record, so everything written survives a crash."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_strip_private(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Rows without the reader's private keys (``_line``)."""
    for r in rows:
        yield {k: v for k, v in r.items() if not k.startswith("_")}
