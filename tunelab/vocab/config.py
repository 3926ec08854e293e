"""The settings of `tunelab vocab extend` (the command's options take their defaults and bounds from here, and the
``vocab:`` stage of an experiment takes the same fields: tunelab.run.config.VocabSettings)."""

from __future__ import annotations

from typing import Optional

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
