"""The settings of `tunelab vocab extend` (the command's options take their defaults and bounds from here)."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class VocabConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("bundled", description="the base model: bundled | HF dir | .gguf")
    field: str = Field("text", description="the field of each JSONL/CSV record that holds the text")
    add: int = Field(2000, ge=1, description="how many new tokens to add")
    limit: Optional[int] = Field(None, ge=1, description="read only the first N records")
    min_frequency: int = Field(2, ge=1, description="a new token must occur at least this often in the text")
    encoding: Optional[str] = Field(None, description="the text file's encoding when it is not UTF-8 (e.g. cp949)")
