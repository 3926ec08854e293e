"""Command-line options that set a field of a config model, so that a default or a bound lives in one place.

A field option's default is the field's default (``--help`` shows it), its min/max are the field's ``ge``/``le``
bounds (an open ``gt``/``lt`` bound is left to the model: typer cannot show one), and its help text is the field's
description unless the command words it. Only the flags a user gave become settings (``given_fields``): a flag
left out leaves the field to the config file, or to the model.
"""

from __future__ import annotations

import types
import typing
from pathlib import PurePath
from typing import Any, Callable

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

FIELD = "config_field"  # the attribute of a typer OptionInfo that names its (model, "section.field")


def config_field(model: type[BaseModel], path: str) -> FieldInfo:
    """The field ``a.b.c`` of ``model``, stepping into nested models (also an Optional or a union member)."""
    *sections, last = path.split(".")
    for name in sections:
        annotation = model.model_fields[name].annotation
        args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
            else (annotation,)
        model = next(a for a in args if isinstance(a, type) and issubclass(a, BaseModel))
    return model.model_fields[last]


def field_default(model: type[BaseModel], path: str) -> Any:
    """The default of a config field (None where it has none)."""
    info = config_field(model, path)
    return None if info.is_required() else info.get_default(call_default_factory=True)


def field_bounds(model: type[BaseModel], path: str) -> dict[str, float]:
    """``{"min": ge, "max": le}`` of a config field, as far as it has them."""
    out: dict[str, float] = {}
    for m in config_field(model, path).metadata:  # pydantic keeps Field(ge=..., le=...) as Ge(ge), Le(le)
        if getattr(m, "ge", None) is not None:
            out["min"] = m.ge
        if getattr(m, "le", None) is not None:
            out["max"] = m.le
    return out


def choices(model: type[BaseModel], path: str) -> str:
    """The values a Literal field allows, as help text: ``auto | loglik | generate``."""
    return " | ".join(map(str, typing.get_args(config_field(model, path).annotation)))


def field_option(model: type[BaseModel], path: str, *names: str, help: str | None = None, **kwargs: Any) -> Any:
    """A typer option for the config field ``path`` of ``model`` ("section.field" for a nested one), with the
    field's default and bounds, and its description as help unless ``help`` is given."""
    info = config_field(model, path)
    if help is None and info.description:
        help = info.description[0].upper() + info.description[1:] + "."
    option = typer.Option(field_default(model, path), *names, help=help, **field_bounds(model, path), **kwargs)
    setattr(option, FIELD, (model, path))
    return option


def given_fields(ctx: typer.Context, command: Callable[..., Any]) -> dict[str, Any]:
    """``{"section.field": value}`` for the field options of ``command`` that the user gave (on the command line
    or through an environment variable), not those left at their default; a path becomes a string."""
    import inspect

    out: dict[str, Any] = {}
    for name, param in inspect.signature(command).parameters.items():
        target = getattr(param.default, FIELD, None)
        source = ctx.get_parameter_source(name)
        if target is not None and source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            value = ctx.params[name]
            out[target[1]] = str(value) if isinstance(value, PurePath) else value
    return out


def set_fields(data: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a config as a dict) with each ``{"section.field": value}`` set in it, sections created as needed."""
    for dotted, value in fields.items():
        *sections, last = dotted.split(".")
        holder = data
        for name in sections:
            if not isinstance(holder.get(name), dict):  # absent or null: a section of its own now
                holder[name] = {}
            holder = holder[name]
        holder[last] = value
    return data
