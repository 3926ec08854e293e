"""Shared test code, no tests: paths and small file helpers here, the rest by topic (cli, processes, pages, run,
train, generate, fakeserver, serve). tests/ is on sys.path through tests/conftest.py, so a test imports
``helpers.<topic>``; fixtures live in the conftest.py files, never imported by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (blank lines skipped)."""
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """``rows`` as JSONL, one object a line, non-ASCII as written; returns ``path``."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    """``data`` as a YAML file (keys in their order, non-ASCII as written), its folder made; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path
