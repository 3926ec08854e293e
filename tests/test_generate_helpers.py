"""Shared helpers (no tests here) for the `tunelab generate` tests: configs, CLI runs, output readers, leak checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SENTINEL = "sk-SENTINEL-d41d8cd98f00b204e980"  # a fake API key that must never appear in any output


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def self_instruct_config(url: str, **over) -> dict:
    cfg = {
        "name": "si-test",
        "pipeline": "self-instruct",
        "self_instruct": {"seed_tasks": str(EXAMPLES / "data" / "seed_tasks_small.jsonl"), "num_instructions": 30,
                          "seeds_per_prompt": 3, "machine_per_prompt": 2, "tasks_per_request": 5,
                          "requests_per_round": 4},
        "teacher": {"model": "gpt-4o-mini", "base_url": url, "concurrency": 4, "timeout_s": 5, "max_retries": 5,
                    "backoff_initial_s": 0.02, "backoff_max_s": 0.1},
        "sampling": {"temperature": 0.7, "max_tokens": 800},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def env_for(tmp_path: Path, key: str | None = SENTINEL) -> dict:
    e = {"TUNELAB_CACHE": str(tmp_path / "cache"), "NO_COLOR": "1", "COLUMNS": "200"}
    if key is not None:
        e["OPENAI_API_KEY"] = key
    return e


def run_generate(config: Path, *args: str, env: dict, cwd: Path | None = None, timeout: int = 120):
    e = {**os.environ, **env}
    e.pop("OPENAI_BASE_URL", None)
    if "OPENAI_API_KEY" not in env:
        e.pop("OPENAI_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "tunelab.cli", "generate", str(config), *args],
                          capture_output=True, text=True, env=e, cwd=cwd or ROOT, timeout=timeout)


def popen_generate(config: Path, *args: str, env: dict) -> subprocess.Popen:
    e = {**os.environ, **env}
    e.pop("OPENAI_BASE_URL", None)
    return subprocess.Popen([sys.executable, "-m", "tunelab.cli", "generate", str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=ROOT)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def assert_ok(r) -> None:
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr


def assert_clean_error(r, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def assert_no_secret(*texts: str, dirs: tuple[Path, ...] = ()) -> None:
    """The key appears in no text and in no file (any bytes) under ``dirs``."""
    for t in texts:
        assert SENTINEL not in t
    needle = SENTINEL.encode()
    for d in dirs:
        for p in Path(d).rglob("*"):
            if p.is_file():
                assert needle not in p.read_bytes(), f"the API key leaked into {p}"


def stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text(encoding="utf-8"))
