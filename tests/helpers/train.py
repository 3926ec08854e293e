"""`tunelab train` on the tiny model: NSMC reviews as items or chat rows, the CLI run and its losses, a stand-in
PromptSpec, and the plain per-example loss that every batched loss must equal."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable

from helpers import EXAMPLES, read_jsonl
from helpers.cli import cli_env, run_cli

NSMC_TRAIN = EXAMPLES / "data" / "nsmc_binary_train_512.jsonl"


def tiny_base(out: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A tiny random Llama like ``tiny_model_dir`` (``seed``: its weights, ``hidden``: its width, ``layers``: its
    depth) with the bundled tokenizer, written to ``out``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunelab.models.convert import resolve_local_path

    tok = AutoTokenizer.from_pretrained(str(resolve_local_path(None)))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def reviews(n: int) -> list[dict]:
    """The first ``n`` NSMC training reviews (id, text, label)."""
    return read_jsonl(NSMC_TRAIN)[:n]


def chat_rows(n: int) -> list[dict]:
    """The first ``n`` reviews as chat records: a system prompt, the review, the label as the answer."""
    return [{"messages": [{"role": "system", "content": "Classify the review: Positive or Negative."},
                          {"role": "user", "content": r["text"]},
                          {"role": "assistant", "content": r["label"]}]} for r in reviews(n)]


def train_env(threads: int = 1) -> dict:
    """The environment of a training subprocess (offline, quiet, ``threads`` torch threads)."""
    return cli_env(threads)


def run_train(*args: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """`tunelab train ARGS` to its end, with one torch thread unless ``env`` says otherwise."""
    return run_cli("train", *args, env=env or train_env(), timeout=timeout)


def common(tiny: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The quick-form flags of a small LoRA run: batch 8 in micro-batches of 4, lr 5e-3, rank 4."""
    return ["--model", str(tiny), "--data", str(data), "--out", str(out), "--batch-size", "8",
            "--micro-batch-size", "4", "--lr", "5e-3", "--lora-r", "4", *extra]


def losses(out: Path) -> list[float]:
    """The training loss of each step, from the run's metrics.jsonl."""
    return [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]


def checkpointed(latest: Path, step: int) -> Callable[[], bool]:
    """A ``sigkill_when`` condition: the checkpoint pointer ``latest`` names step ``step`` or a later one."""
    return lambda: latest.is_file() and latest.read_text().strip() >= f"step-{step:06d}"


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


def random_examples(n_list: list[int], vocab: int = 97, seed: int = 1) -> list:
    """Random token sequences of the given lengths, a random half of the tokens (and always the last) targets."""
    import torch

    from tunelab.train.data import Example

    g = torch.Generator().manual_seed(seed)
    out = []
    for n in n_list:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        tg = [False] + [bool(x) for x in torch.randint(0, 2, (n - 1,), generator=g).tolist()]
        tg[-1] = True
        out.append(Example(ids, tg))
    return out


def naive_loss(model, examples: list):
    """The summed negative log-likelihood of every target token, one plain forward pass per example."""
    import torch

    total = 0.0
    for e in examples:
        logp = model(torch.tensor([e.input_ids])).logits[0].log_softmax(-1)
        total = total - sum(logp[t - 1, e.input_ids[t]] for t in range(1, len(e)) if e.targets[t])
    return total
