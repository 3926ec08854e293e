import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def bundled_model():
    """The bundled SmolLM2-135M-Instruct, converted once (cached under $TUNELAB_CACHE or ~/.cache/tunelab)."""
    from tunelab.models import load_model

    return load_model(None)


@pytest.fixture(scope="session")
def tiny_llama():
    """A tiny random Llama (no tokenizer): fast model-level tests that need no weights file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def pytest_configure(config):
    """The CLI's list of unavoidable third-party warnings, ignored here as there (one filter each)."""
    from tunelab.console import THIRD_PARTY_WARNINGS

    for message, category, module in THIRD_PARTY_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}:{module}")


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600):
    """Run the real `tunelab` CLI in a subprocess (as a user would)."""
    import subprocess

    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True,
                          env=e, cwd=cwd or ROOT, timeout=timeout)
