"""Typed results: every JSON file tunelab writes as a result (an eval's summary.json and results.jsonl rows, a
training run's report.json, generate's stats.json, a run's run.json and summary.json) is a pydantic model here or
in its package's ``results`` module, and is written and read through that model.

``Result`` refuses unknown fields, so a writer cannot add a key the readers do not know about; ``read`` turns a
missing, malformed or foreign file into one ``DataError`` line. Files whose shape changed carry a ``schema``
number (``Versioned``) and upgrade older files on read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from tunelab.errors import DataError

R = TypeVar("R", bound="Result")
FROM_FILE = "tunelab_from_file"  # validation context: the data was read from a file (it may be an older schema)

__all__ = ["Result", "Versioned", "write_json", "write_text", "read_json_file"]


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a file atomically (a temporary file beside it, flushed, then renamed): a crash never leaves half a
    file, and readers see either the old content or the new."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return p


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """JSON (UTF-8, indented) written atomically; models are dumped in their JSON form."""
    if isinstance(obj, BaseModel):
        return write_text(path, obj.model_dump_json(indent=2) + "\n")
    return write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n")


def read_json_file(path: str | os.PathLike) -> Any:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"no such file: {p}") from None
    except UnicodeDecodeError:
        raise DataError("not a UTF-8 JSON file", where=str(p)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg})", where=f"{p}:{e.lineno}") from None


class Result(BaseModel):
    """A result file's shape. Unknown fields are refused, so writers and readers agree on every key."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)

    @classmethod
    def read(cls: type[R], path: str | os.PathLike) -> R:
        """The file at ``path`` as this model (upgraded when it is of an older schema); a missing, malformed or
        different file is one DataError line."""
        raw = read_json_file(path)
        try:
            return cls.model_validate(raw, context={FROM_FILE: True})
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise DataError(f"not a {cls.__name__} file ({loc + ': ' if loc else ''}{err['msg']})",
                            where=str(path)) from None

    def write(self, path: str | os.PathLike) -> Path:
        return write_json(path, self)

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready dict (what the file holds)."""
        return self.model_dump(mode="json")


class Versioned(Result):
    """A result whose shape has changed over releases: ``schema`` says which one a file has. Subclasses set
    ``SCHEMA`` and override ``upgrade`` to turn an older file's dict into the current shape."""

    SCHEMA: ClassVar[int] = 1
    version: int = Field(1, alias="schema")

    def model_post_init(self, context: Any) -> None:  # a new result is always written at the current schema
        if "version" not in self.model_fields_set:
            object.__setattr__(self, "version", self.SCHEMA)

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and (info.context or {}).get(FROM_FILE):  # new results are built current
            found = data.get("schema", data.get("version", 1))
            if isinstance(found, int) and found < cls.SCHEMA:
                data = cls.upgrade({k: v for k, v in data.items() if k not in ("schema", "version")}, found)
                data["schema"] = cls.SCHEMA
        return data

    @classmethod
    def upgrade(cls, data: dict[str, Any], found: int) -> dict[str, Any]:
        """An older file's dict (schema ``found``) in the current shape; the default knows no older shape."""
        return data
