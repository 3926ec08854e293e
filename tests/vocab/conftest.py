"""The vocabulary tests' shared inputs: 400 training reviews and the tiny model extended with ADD tokens from them
(built once per session)."""

from __future__ import annotations

import pytest

from helpers import write_jsonl
from helpers.train import reviews
from helpers.vocab import extend


@pytest.fixture(scope="session")
def texts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("ko") / "reviews.jsonl", reviews(400))


@pytest.fixture(scope="session")
def extended(tmp_path_factory, tiny_model_dir, texts):
    out = tmp_path_factory.mktemp("ext") / "model"
    extend(texts, out, tiny_model_dir)
    return out


@pytest.fixture(scope="session")
def untied(tmp_path_factory, texts):
    """(a tiny model whose output layer is its own random matrix, the same extended with ADD tokens)."""
    import torch
    from transformers import LlamaForCausalLM

    from helpers.train import tiny_base

    root = tmp_path_factory.mktemp("untied")
    base = tiny_base(root / "base")
    model = LlamaForCausalLM.from_pretrained(str(base))
    model.config.tie_word_embeddings = False
    untied = LlamaForCausalLM(model.config)
    untied.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        untied.lm_head.weight.normal_(generator=torch.Generator().manual_seed(3))
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    untied.save_pretrained(str(root / "untied"))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (base / f).exists():
            (root / "untied" / f).write_bytes((base / f).read_bytes())
    extend(texts, root / "ext", root / "untied")
    return root / "untied", root / "ext"
