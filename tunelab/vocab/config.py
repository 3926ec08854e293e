"""The settings of `tunelab vocab extend` (the command's options take their defaults and bounds from here, and the
``vocab:`` stage of an experiment takes the same fields: tunelab.run.config.VocabSettings)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from tunelab.config import Encoding, StrictModel


class VocabOptions(StrictModel):
    """How the new tokens are learnt: shared by the command and the experiment's ``vocab:`` stage."""

    field: str = Field("text", description="the field of each JSONL/CSV record that holds the text")
    add: int = Field(2000, ge=1, description="how many new tokens to add")
    limit: Optional[int] = Field(None, ge=1, description="read only the first N records")
    min_frequency: int = Field(2, ge=1, description="a new token must occur at least this often in the text")
    encoding: Optional[Encoding] = Field(None, description="the text file's encoding when it is not UTF-8 (e.g. cp949)")


class VocabConfig(VocabOptions):
    model: str = Field("bundled", description="the base model: bundled | HF dir | .gguf")


class AlignConfig(StrictModel):
    """`tunelab vocab align`: the new rows of an extended model taught the base's own reading of the text."""

    field: str = Field("text", description="the field of each JSONL/CSV record that holds the text")
    limit: Optional[int] = Field(None, ge=2, description="read only the first N records (the last --eval-texts of "
                                                         "them are held out)")
    encoding: Optional[Encoding] = Field(None, description="the text file's encoding when it is not UTF-8")
    eval_texts: int = Field(64, ge=1, description="texts held out to measure the alignment and bits per byte")
    batch_size: int = Field(16, ge=1, description="texts per step")
    epochs: float = Field(1.0, gt=0, description="passes over the texts (may be fractional)")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate of the new rows (cosine schedule, no decay)")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="linear warm-up, as a share of the steps")
    clip_grad_norm: Optional[float] = Field(1.0, gt=0, description="clip the gradient norm; null: off")
    max_tokens: int = Field(256, ge=8, description="a text longer than this in the base's tokens is cut")
    seed: int = Field(0, description="order of the texts")
    dtype: Literal["auto", "bfloat16", "float32"] = Field("auto", description="autocast dtype; auto: bf16 on CPUs "
                                                                              "with native bf16 and on CUDA")
