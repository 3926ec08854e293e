"""Fixtures of the `tunelab train` tests (the tiny model itself is in tests/conftest.py: the run tests use it too)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import write_jsonl
from helpers.train import chat_rows


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    """The tiny model's tokenizer, loaded as the trainer loads it."""
    from tunelab.train.tokenizer import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    """48 NSMC reviews as chat records (system prompt, review, label)."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chat_rows(48))
