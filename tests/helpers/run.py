"""`tunelab run` experiments on the tiny model (``tiny_model_dir``: a random 2-layer Llama with the bundled
tokenizer), with a few items and a few training steps, so that a whole run takes seconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helpers import EXAMPLES
from helpers.cli import cli_env

DEV = EXAMPLES / "data" / "nsmc_binary_dev_200.jsonl"
TRAIN = EXAMPLES / "data" / "nsmc_binary_train_512.jsonl"
SHORT = EXAMPLES / "train" / "sentiment_binary_short.yaml"
FEW_SHOT = EXAMPLES / "prompts" / "sentiment_binary.yaml"


def experiment(model: Path, **over: Any) -> dict:
    """A tiny experiment: 3 prompts (one inline) on 16 eval items, LoRA on 16 reviews for 4 steps; ``over`` sets
    top-level fields (None removes one)."""
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


def run_env(tmp: Path, **extra: str) -> dict:
    """One thread (2 shared cores), offline, plain wide output and a private tunelab cache (call cache, teacher
    cache) under ``tmp``."""
    return cli_env(NO_COLOR="1", COLUMNS="200", TUNELAB_CACHE=str(tmp / "tunelab-cache"), **extra)


def state(out: Path) -> dict:
    """The run folder's run.json."""
    return json.loads((out / "run.json").read_text(encoding="utf-8"))


def actions(out: Path) -> dict[str, tuple[str, str]]:
    """Each stage's (status, action) in the run folder, e.g. ``{"eval": ("done", "cached")}``."""
    return {k: (v["status"], v["action"]) for k, v in state(out)["stages"].items()}
