"""Pydantic models of tunelab's YAML files, and loading with errors that say where and what to fix."""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunelab.errors import ConfigError
from tunelab.textfiles import check_encoding, read_text

M = TypeVar("M", bound=BaseModel)
Encoding = Annotated[str, AfterValidator(check_encoding)]  # a codec name Python knows (the data's `encoding:`)


class StrictModel(BaseModel):
    """Base for every config: unknown or mistyped fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error at its second line (the safe loader
    keeps the last silently). Keys a merge (``<<: *base``) brings in may be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {seen[key]}): keep one of the two",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """YAML text as Python data (safe types only; a duplicate key is a yaml.YAMLError, see UniqueKeyLoader)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file (UTF-8, BOM or not; see tunelab/textfiles.py); a syntax error, a duplicate key or a file
    that is not UTF-8 becomes ConfigError('file:line: ...')."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no such file: {p}")
    try:
        return parse_yaml(read_text(p, error=ConfigError))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"invalid YAML: {problem}", where=where) from None


def _model_class(tp: Any) -> type[BaseModel] | None:
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unwrap(tp: Any, tag: str | None = None) -> list[tuple[Any, str | None]]:
    """The alternatives of an annotation as (type, pydantic Tag or None): Optional/Union/Annotated peeled,
    None dropped."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        tag = next((m.tag for m in meta if type(m).__name__ == "Tag"), tag)
        return _unwrap(base, tag)
    if origin in (typing.Union, types.UnionType):
        return [a for x in typing.get_args(tp) if x is not type(None) for a in _unwrap(x)]
    return [(tp, tag)]


def _union_member(options: list[tuple[Any, str | None]], tag: str) -> tuple[Any, str | None] | None:
    """The union member that pydantic names ``tag`` in an error location (Tag, class name or discriminator)."""
    for o, t in options:
        if t == tag:
            return o, t
        m = _model_class(o)
        if m is None:
            continue
        if m.__name__ == tag:
            return o, t
        for f in m.model_fields.values():
            if typing.get_origin(f.annotation) is Literal and tag in typing.get_args(f.annotation):
                return o, t
    return None


def _walk(model: type[BaseModel] | None, raw_loc: tuple) -> tuple[list[str], type[BaseModel] | None]:
    """An error location as the user wrote it (no union tags, no validator names) and the model class that
    owns its last part (for did-you-mean)."""
    loc: list[str] = []
    options: list[tuple[Any, str | None]] = [(model, None)] if model is not None else []
    owner: type[BaseModel] | None = None
    for x in raw_loc:
        if isinstance(x, str) and x.startswith("function-"):
            continue
        member = _union_member(options, x) if isinstance(x, str) and len(options) > 1 else None
        if member is not None:
            options = [member]
            continue
        models = [m for m in (_model_class(o) for o, _ in options) if m is not None]
        owner = next((m for m in models if x in m.model_fields or any(
            f.alias == x for f in m.model_fields.values())), models[0] if len(models) == 1 else None)
        loc.append(str(x))
        nxt: list[tuple[Any, str | None]] = []
        if owner is not None:
            field = owner.model_fields.get(x) or next((f for f in owner.model_fields.values() if f.alias == x), None)
            nxt = _unwrap(field.annotation) if field is not None else []
        else:  # a list index or dict key: step into the item type
            for o, _ in options:
                args = typing.get_args(o)
                if typing.get_origin(o) in (list, tuple, set) and args:
                    nxt += _unwrap(args[0])
                elif typing.get_origin(o) is dict and len(args) == 2:
                    nxt += _unwrap(args[1])
        options = nxt
    return loc, owner


def describe_validation_error(err: ValidationError, model: type[BaseModel] | None = None) -> tuple[str, str]:
    """(field path, message) of the first error, in the user's terms.

    Unknown fields come first (a typo also makes a field missing); an unknown field names the closest allowed
    one ("did you mean") and the allowed list when ``model`` is given; union tags and validator names are
    dropped from the path (output.label.labels -> output.labels); pydantic's "Value error, " prefix too.
    """
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    e = errors[0]
    loc, owner = _walk(model, tuple(e["loc"]))
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown field"
        if owner is not None and loc:
            allowed = [f.alias or n for n, f in owner.model_fields.items()]
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            msg += (f" (did you mean {close[0]!r}?)" if close else "") + f"; allowed: {', '.join(allowed)}"
        else:
            msg += " (check the spelling; see the docs for the allowed fields)"
    elif e["type"] == "missing":
        msg = "required field is missing"
    more = len(errors) - 1
    return ".".join(loc), msg + (f" (and {more} more error{'s' if more > 1 else ''})" if more else "")


def format_validation_error(err: ValidationError, model: type[BaseModel] | None = None) -> str:
    """The first error as one line, 'field.path: message' (see describe_validation_error)."""
    loc, msg = describe_validation_error(err, model)
    return f"{loc or '<root>'}: {msg}"


def field_line(path: Path, loc: tuple) -> int | None:
    """The line of the YAML key at ``loc`` (or of its deepest existing parent), for error messages."""
    try:
        node = yaml.compose(read_text(path, error=ConfigError))
    except (yaml.YAMLError, OSError, ConfigError):
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(part):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def yaml_where(path: str | Path, dotted: str) -> str:
    """``file:line`` of the field ``a.b.0.c`` in a YAML file (just the file when the line is unknown)."""
    loc = tuple(int(x) if x.isdigit() else x for x in dotted.split(".")) if dotted else ()
    line = field_line(Path(path), loc) if loc else None
    return f"{path}:{line}" if line else str(path)


def validate_as(model: type[M], data: Any, source: str | Path) -> M:
    """Validate ``data`` as ``model``; errors name the file and the field path."""
    if data is None:
        raise ConfigError("the file is empty", where=str(source))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        loc, msg = describe_validation_error(e, model)
        where = yaml_where(source, loc) if Path(str(source)).is_file() else str(source)
        raise ConfigError(f"{loc or '<root>'}: {msg}", where=where) from None


def load_config(model: type[M], path: str | Path) -> M:
    return validate_as(model, load_yaml(path), path)


# --------------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------------
class EvalDataConfig(StrictModel):
    path: str = Field(description="JSONL or CSV file, relative to the config file")
    limit: int | None = Field(None, ge=1, description="use only the first N items")
    id_field: str | None = Field(None, description="item id field; default: 'id' if present, else the row index")
    name: str | None = None
    encoding: Encoding | None = Field(None, description="the file's encoding when it is not UTF-8 (e.g. cp949 for a file saved by Windows or Excel in Korea); default: UTF-8, with or without a BOM")


class ModelConfig(StrictModel):
    name: str | None = Field(None, description="display name in tables")
    model: str | None = Field(None, description="'bundled', an HF dir, a .gguf file, or openai:MODEL")
    adapter: str | None = None
    allow_other_base: bool = Field(False, description="apply the adapter to a base other than the one it was "
                                                      "trained on (same shapes; refused otherwise)")
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
    data: EvalDataConfig
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
