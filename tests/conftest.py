"""The fixtures that tests in several folders use, the test environment (offline, quiet) and the warning filters.
Shared code that is not a fixture is in helpers/ (this file puts tests/ on sys.path for it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama():
    """A tiny random Llama (no tokenizer): fast model-level tests that need no weights file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 32) with the bundled model's tokenizer and chat template, on disk."""
    from helpers.train import tiny_base

    return tiny_base(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def other_bases(tmp_path_factory) -> dict[str, Path]:
    """Two bases an adapter of ``tiny_model_dir`` must not go on: ``shape`` (hidden 48, not 32) and ``weights``
    (the same shapes and config, other random weights)."""
    from helpers.train import tiny_base

    root = tmp_path_factory.mktemp("other-bases")
    return {"shape": tiny_base(root / "shape", hidden=48), "weights": tiny_base(root / "weights", seed=1)}


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter trained by `tunelab train` for 2 steps on ``tiny_model_dir`` (its train --out dir/adapter)."""
    from helpers import EXAMPLES, read_jsonl, write_jsonl
    from helpers.cli import ok
    from helpers.train import NSMC_TRAIN, common, run_train

    root = tmp_path_factory.mktemp("tiny-adapter")
    items = write_jsonl(root / "items.jsonl", read_jsonl(NSMC_TRAIN)[:16])
    ok(run_train(*common(tiny_model_dir, items, root / "run", "--max-steps", "2", "--prompt",
                         str(EXAMPLES / "train" / "sentiment_binary_short.yaml"))))
    return root / "run" / "adapter"


def pytest_configure(config):
    """The CLI's list of unavoidable third-party warnings, ignored here as there (one filter each)."""
    from tunelab.console import THIRD_PARTY_WARNINGS

    for message, category, module in THIRD_PARTY_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}:{module}")
