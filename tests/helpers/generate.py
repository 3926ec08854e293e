"""`tunelab generate` against the fake teacher: configs, the CLI run and its outputs, and the API-key sentinel
that must never appear anywhere."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from helpers import EXAMPLES
from helpers.cli import ok, run_cli, tunelab_cmd
from helpers.processes import sigkill_when

SENTINEL = "sk-SENTINEL-d41d8cd98f00b204e980"  # a fake API key that must never appear in any output


def with_overrides(cfg: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with each field of ``over`` set; a mapping over a mapping updates it one level deep."""
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def self_instruct_config(url: str, **over: Any) -> dict:
    """A self-instruct run of 30 instructions from the small seed file, against the teacher at ``url``."""
    return with_overrides({
        "name": "si-test",
        "pipeline": "self-instruct",
        "self_instruct": {"seed_tasks": str(EXAMPLES / "data" / "seed_tasks_small.jsonl"), "num_instructions": 30,
                          "seeds_per_prompt": 3, "machine_per_prompt": 2, "tasks_per_request": 5,
                          "requests_per_round": 4},
        "teacher": {"model": "gpt-4o-mini", "base_url": url, "concurrency": 4, "timeout_s": 5, "max_retries": 5,
                    "backoff_initial_s": 0.02, "backoff_max_s": 0.1},
        "sampling": {"temperature": 0.7, "max_tokens": 800},
    }, over)


def env_for(tmp_path: Path, key: str | None = SENTINEL) -> dict:
    """A private tunelab cache, plain wide output, and ``key`` as OPENAI_API_KEY (None: no key at all)."""
    e = {"TUNELAB_CACHE": str(tmp_path / "cache"), "NO_COLOR": "1", "COLUMNS": "200"}
    if key is not None:
        e["OPENAI_API_KEY"] = key
    return e


def generate_env(env: dict) -> dict:
    """This process's environment with ``env`` over it, less the machine's OPENAI_BASE_URL and OPENAI_API_KEY (a key
    only when ``env`` gives one): the test decides what the teacher sees."""
    e = {**os.environ, **env}
    e.pop("OPENAI_BASE_URL", None)
    if "OPENAI_API_KEY" not in env:
        e.pop("OPENAI_API_KEY", None)
    return e


def run_generate(config: Path, *args: str, env: dict, cwd: Path | None = None,
                 timeout: int = 120) -> subprocess.CompletedProcess:
    """`tunelab generate CONFIG ARGS` to its end."""
    return run_cli("generate", config, *args, env=generate_env(env), cwd=cwd, timeout=timeout)


def kill_and_rerun(config: Path, out: Path, env: dict, entries: int) -> int:
    """SIGKILL `tunelab generate CONFIG --out OUT --no-cache` once its journal holds ``entries`` answers (before it
    wrote any data), then run it again to its end. Returns how many answers the killed run had journaled."""
    journal = out / "journal.jsonl"

    def journaled() -> bool:
        return journal.exists() and journal.read_bytes().count(b"\n") >= entries

    sigkill_when(tunelab_cmd("generate", config, "--out", out, "--no-cache"), journaled, env=generate_env(env),
                 timeout=60)
    done = journal.read_bytes().count(b"\n")
    assert not (out / "data.jsonl").exists()
    ok(run_generate(config, "--out", str(out), "--no-cache", env=env))
    return done


def stats(out: Path) -> dict:
    """The run's stats.json."""
    return json.loads((out / "stats.json").read_text(encoding="utf-8"))


def assert_no_secret(*texts: str, dirs: tuple[Path, ...] = ()) -> None:
    """The key appears in no text and in no file (any bytes) under ``dirs``."""
    for t in texts:
        assert SENTINEL not in t
    needle = SENTINEL.encode()
    for d in dirs:
        for p in Path(d).rglob("*"):
            if p.is_file():
                assert needle not in p.read_bytes(), f"the API key leaked into {p}"
