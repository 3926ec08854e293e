"""Shared fixtures and helpers for the tests of `tunelab train` (imported by tests/test_train_*.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NSMC_TRAIN = ROOT / "examples" / "data" / "nsmc_binary_train_512.jsonl"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def reviews(n: int) -> list[dict]:
    rows = [json.loads(x) for x in NSMC_TRAIN.read_text(encoding="utf-8").splitlines()[:n]]
    return rows


def chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Classify the review: Positive or Negative."},
                          {"role": "user", "content": r["text"]},
                          {"role": "assistant", "content": r["label"]}]} for r in reviews(n)]


def train_env(threads: int = 1) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}


def tunelab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tunelab.cli", *args]


def sigkill_after_checkpoint(cmd: list[str], env: dict, latest: Path, step: int, timeout: float = 240) -> None:
    """Start ``cmd``, wait until the checkpoint pointer ``latest`` names step >= ``step``, then SIGKILL it (no
    cleanup handlers run, as after a crash or an OOM kill). Fails if the process ends on its own first."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if latest.is_file() and latest.read_text().strip() >= f"step-{step:06d}":
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 32) with the bundled model's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunelab.models.convert import resolve_local_path

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(str(resolve_local_path(None)))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from tunelab.train.tokenizer import load_tokenizer

    return load_tokenizer(tiny_model_dir)


class FakeSpec:
    """The PromptSpec interface the trainer uses (render, target_text, labels, gold, task, content_hash)."""

    labels = ["Positive", "Negative"]
    task = "label"

    def render(self, item: dict) -> list[dict]:
        return [{"role": "system", "content": "Sentiment: Positive or Negative."},
                {"role": "user", "content": item["text"]}]

    def gold(self, item: dict):
        return item.get("label")

    def target_text(self, item: dict) -> str:
        return item["label"]

    def content_hash(self) -> str:
        return "fake"


def have_prompt_specs() -> bool:
    try:
        from tunelab.prompts import load_prompt_spec  # noqa: F401
    except ImportError:
        return False
    return (ROOT / "examples" / "prompts" / "sentiment_binary.yaml").is_file()
