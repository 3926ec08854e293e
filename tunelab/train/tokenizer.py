"""The tokenizer of a model directory as training uses it (``load_tokenizer``): with a pad token (the EOS when the
model has none) and a chat template (tunelab's fallback when the model has none).
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import ModelError


def load_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    from tunelab.models.local import FALLBACK_TEMPLATE

    try:
        tok = AutoTokenizer.from_pretrained(str(model_path))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer from {model_path}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = FALLBACK_TEMPLATE
    return tok
