"""Recipe: continued pre-training. Raw text is cut into blocks of ``data.max_seq_len`` tokens, packed into rows
(each block keeps its own positions and attention), and every token is a target. All weights train; the
result is a complete HF model directory in OUT/model, which a later LoRA run can use as its base
(``--model OUT/model``).

Run: ``tunelab train --method pretrain --data reviews.jsonl --out DIR`` (JSONL ``text`` field, .txt, or a
folder of .txt files).
"""

from __future__ import annotations

# the full fine-tuning recipe: start_session reads raw text into blocks for method "pretrain" and every token is a
# target there; loading, fitting, saving and the report are the same
from tunelab.train.full import run

__all__ = ["run"]
