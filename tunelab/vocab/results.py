"""``tunelab_vocab.json``: what `tunelab vocab extend` wrote into a model directory (its base, the tokens added,
the text they were learnt from, and tokens per text before and after)."""

from __future__ import annotations

from tunelab.models.base import VOCAB_FILE
from tunelab.results import Result

__all__ = ["VOCAB_FILE", "VocabReport"]


class VocabReport(Result):
    base: str                      # the base model as given (bundled, a path)
    base_path: str                 # the HF directory it resolved to
    base_vocab_size: int           # rows of the base's embedding matrix
    vocab_size: int                # rows of the extended model's embedding matrix (config vocab_size)
    added: int                     # new tokens, ids base_tokenizer_size .. base_tokenizer_size + added - 1
    first_new_id: int
    method: str                    # how the tokens were added: "bpe-merges" (vocab + merges of tokenizer.json)
    data: str
    data_field: str
    data_digest: str               # sha256 of the text file
    texts: int
    chars: int
    tokens_per_text_before: float  # mean tokens per text under the base tokenizer
    tokens_per_text_after: float   # ... under the extended one
    tied_embeddings: bool
    seconds: float
