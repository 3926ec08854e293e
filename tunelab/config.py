"""Pydantic models of tunelab's YAML files, and loading with errors that say where and what to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunelab.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config: unknown or mistyped fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a syntax error becomes ConfigError('file:line: ...')."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no such file: {p}")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"invalid YAML: {problem}", where=where) from None


def format_validation_error(err: ValidationError) -> str:
    """The first error as 'field.path: message' (pydantic's own text, shortened to one line)."""
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; see the docs for the allowed fields)"
    elif e["type"] == "missing":
        msg = "required field is missing"
    more = len(err.errors()) - 1
    return f"{loc or '<root>'}: {msg}" + (f" (and {more} more error{'s' if more > 1 else ''})" if more else "")


def validate_as(model: type[M], data: Any, source: str | Path) -> M:
    """Validate ``data`` as ``model``; errors name the file and the field path."""
    if data is None:
        raise ConfigError("the file is empty", where=str(source))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e), where=str(source)) from None


def load_config(model: type[M], path: str | Path) -> M:
    return validate_as(model, load_yaml(path), path)


# --------------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------------
class DataConfig(StrictModel):
    path: str = Field(description="JSONL or CSV file, relative to the config file")
    limit: int | None = Field(None, ge=1, description="use only the first N items")
    id_field: str | None = Field(None, description="item id field; default: 'id' if present, else the row index")
    name: str | None = None


class ModelConfig(StrictModel):
    name: str | None = Field(None, description="display name in tables")
    model: str | None = Field(None, description="'bundled', an HF dir, a .gguf file, or openai:MODEL")
    adapter: str | None = None
    base_url: str | None = None
    api_key_env: str | None = Field(None, description="env var that holds the API key (never the key itself)")
    api_key_file: str | None = None
    concurrency: int = Field(8, ge=1, le=256)
    price: tuple[float, float] | None = Field(None, description="USD per 1M (input, output) tokens")
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    batch_size: int = Field(16, ge=1)

    @property
    def display(self) -> str:
        if self.name:
            return self.name
        base = self.model or "smollm2-135m"
        return base + (f"+{Path(self.adapter).name}" if self.adapter else "")


class GenerationConfig(StrictModel):
    max_new_tokens: int = Field(256, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    samples: int = Field(1, ge=1, le=100, description="repeat each item N times (needs temperature > 0)")
    seed: int = 0
    stop: list[str] = Field(default_factory=list)


class EvalConfig(StrictModel):
    name: str = "eval"
    description: str | None = None
    data: DataConfig
    variants: dict[str, str | dict[str, Any]] = Field(
        description="name -> prompt spec file (relative to this file) or an inline spec")
    models: list[str | ModelConfig] = Field(default_factory=lambda: ["bundled"])
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    scoring: Literal["auto", "loglik", "generate"] = Field(
        "auto", description="label tasks: loglik (score each label) on local models, else generate + parse")
    metric: str = "accuracy"
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    seed: int = 0

    @field_validator("variants")
    @classmethod
    def _non_empty(cls, v: dict) -> dict:
        if not v:
            raise ValueError("at least one variant is needed")
        return v

    def model_configs(self) -> list[ModelConfig]:
        return [ModelConfig(model=m) if isinstance(m, str) else m for m in self.models]
