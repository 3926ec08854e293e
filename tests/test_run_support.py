"""Shared helpers for the tests of `tunelab run` (imported by tests/test_run_*.py; no tests here).

The experiments run the real CLI in a subprocess on a tiny random Llama with the bundled tokenizer
(``tiny_model_dir``), with a few items and a few training steps, so a whole run takes seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DEV = EXAMPLES / "data" / "nsmc_binary_dev_200.jsonl"
TRAIN = EXAMPLES / "data" / "nsmc_binary_train_512.jsonl"
SHORT = EXAMPLES / "train" / "sentiment_binary_short.yaml"
FEW_SHOT = EXAMPLES / "prompts" / "sentiment_binary.yaml"
EVIL = "<script>alert(1)</script>"


def experiment(model: Path, **over: Any) -> dict:
    """A tiny experiment: 2 prompts (one inline) on 16 eval items, LoRA on 16 reviews for 4 steps."""
    exp: dict[str, Any] = {
        "name": "tiny",
        "model": str(model),
        "seed": 0,
        "data": {"eval": str(DEV), "eval_limit": 16, "train": str(TRAIN), "train_limit": 16},
        "prompts": {
            "short": str(SHORT),
            "few_shot": str(FEW_SHOT),
            "zero_shot": {"instruction": "Classify the sentiment of the movie review as Positive or Negative.",
                          "layout": "chat", "format_instruction": "",
                          "output": {"type": "label", "labels": ["Positive", "Negative"]}},
        },
        "train": [{"name": "lora", "method": "lora", "prompt": "short", "max_seq_len": 512,
                   "lora": {"r": 4, "alpha": 8}, "optim": {"lr": 5.0e-3},
                   "train": {"epochs": 1, "batch_size": 4, "micro_batch_size": 4}}],
    }
    for k, v in over.items():
        if v is None:
            exp.pop(k, None)
        else:
            exp[k] = v
    return exp


def write_experiment(path: Path, exp: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(exp, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def run_env(tmp: Path, **extra: str) -> dict:
    """One thread (2 shared cores), offline, and a private tunelab cache (call cache, teacher cache)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore", "NO_COLOR": "1", "COLUMNS": "200",
            "TUNELAB_CACHE": str(tmp / "tunelab-cache"), **extra}


def tunelab(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p


def state(out: Path) -> dict:
    return json.loads((out / "run.json").read_text(encoding="utf-8"))


def actions(out: Path) -> dict[str, tuple[str, str]]:
    return {k: (v["status"], v["action"]) for k, v in state(out)["stages"].items()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def assert_clean_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    """Bad input: exit 2, one line on stderr, no traceback."""
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr + p.stdout
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
