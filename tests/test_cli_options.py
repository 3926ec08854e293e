"""The CLI takes its defaults and bounds from the config models: every option of every command either sets a config
field (and then its default and min/max are the field's), or is listed below as setting none."""

from __future__ import annotations

import inspect
import types
import typing

import pytest
import typer
from pydantic import BaseModel, Field
from typer.main import get_command
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.options import FIELD, field_option, given_fields

# command -> {parameter: why it is no config field}
NOT_CONFIG_FIELDS = {
    "eval": {
        "config": "the eval config file itself",
        "prompt": "quick form: becomes variants",
        "data": "quick form: becomes data.path; with a config it is an error",
        "model": "replaces the config's models with one ModelConfig",
        "adapter": "replaces the config's models with one ModelConfig",
        "allow_other_base": "sets ModelConfig.allow_other_base of every model",
        "limit": "a run option of EvalRunner (at most N items, under data.limit)",
        "out": "output folder: EvalConfig has no field for it",
        "dry_run": "a run option", "no_cache": "a run option", "report": "a run option",
    },
    "prompt render": {"spec": "the spec file", "input": "one input", "item": "one input", "model": "display only",
                      "as_json": "display only"},
    "train": {"config": "the train config file itself", "set_": "any field by name", "resume": "a run option",
              "dry_run": "a run option", "force": "a run option"},
    "merge": {"adapter": "a path", "out": "a path", "model": "a model spec", "probe": "a path",
              "max_new_tokens": "merge_adapter's own keyword default (no config model)",
              "allow_other_base": "a run option (merge_adapter's keyword)"},
    "export": {"source": "a model, run or adapter", "out": "a path", "fmt": "export_model's keyword (no config model)",
               "dtype": "export_model's keyword (no config model)", "model": "a model spec", "probe": "a path",
               "max_new_tokens": "export_model's own keyword default (no config model)",
               "allow_other_base": "a run option (merge_adapter's keyword)"},
    "generate": {"config": "the generate config file itself", "limit": "a run option (inputs or new tasks)",
                 "dry_run": "a run option", "batch_api": "a run option", "batch_results": "a run option",
                 "no_cache": "a run option"},
    "serve": {"adapter": "NAME=PATH items become ServeConfig.adapters", "threads": "torch, not ServeConfig",
              "log_level": "uvicorn and logging, not ServeConfig"},
    "run": {"experiment": "the experiment file itself", "out": "run folder (default runs/<name>)",
            "force": "a run option", "only": "a run option", "limit": "a smoke run over every stage"},
    "compare": {"run_a": "a run folder", "run_b": "a run folder"},
    "vocab extend": {"data": "a path", "out": "a path"},
    "vocab align": {"model": "a path (an extended model)", "data": "a path", "out": "a path",
                    "threads": "torch, not AlignConfig"},
}


def commands(t: typer.Typer = app, group=None, prefix: str = ""):
    """(command path, the function, its click command) for every command of the app."""
    group = group or get_command(t)
    for info in t.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        yield prefix + name, info.callback, group.commands[name]
    for g in t.registered_groups:
        yield from commands(g.typer_instance, group.commands[g.name], prefix + g.name + " ")


def expected_field(model: type[BaseModel], path: str):
    """(default, {"min": ge, "max": le}) of a config field, read from model_fields."""
    *sections, last = path.split(".")
    for name in sections:
        ann = model.model_fields[name].annotation
        members = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
        model = next(m for m in members if isinstance(m, type) and issubclass(m, BaseModel))
    f = model.model_fields[last]
    default = None if f.is_required() else f.get_default(call_default_factory=True)
    bounds = {}
    for m in f.metadata:
        if getattr(m, "ge", None) is not None:
            bounds["min"] = m.ge
        if getattr(m, "le", None) is not None:
            bounds["max"] = m.le
    return default, bounds


def _bound(param, which: str):
    """An option's min or max (on the option in this typer, on its click type in older ones)."""
    value = getattr(param, which, None)
    return value if value is not None else getattr(getattr(param, "type", None), which, None)


def test_every_command_is_checked():
    assert {c for c, _, _ in commands()} == set(NOT_CONFIG_FIELDS)


@pytest.mark.parametrize("name,func,cmd", list(commands()), ids=[c for c, _, _ in commands()])
def test_cli_defaults_and_bounds_are_the_config_fields(name, func, cmd):
    params = {p.name: p for p in cmd.params}
    unlisted = []
    for pname, sig in inspect.signature(func).parameters.items():
        if pname == "ctx":
            continue
        target = getattr(sig.default, FIELD, None)
        if target is None:
            if pname not in NOT_CONFIG_FIELDS[name]:
                unlisted.append(pname)
            continue
        assert pname not in NOT_CONFIG_FIELDS[name], f"{name} {pname}: sets {target[1]}, yet listed as no field"
        model, path = target
        default, bounds = expected_field(model, path)
        p = params[pname]
        same = p.default is None if default is None else type(default)(p.default) == default  # Path vs str
        assert same, f"tunelab {name} {p.opts[0]}: default {p.default!r}, {model.__name__}.{path} " \
                                 f"has {default!r}"
        got = {k: v for k in ("min", "max") if (v := _bound(p, k)) is not None}
        assert got == bounds, f"tunelab {name} {p.opts[0]}: bounds {got}, {model.__name__}.{path} has {bounds}"
    assert not unlisted, f"tunelab {name}: options {unlisted} set no config field: make them field_option(...) " \
                         f"or list them in NOT_CONFIG_FIELDS with the reason"
    assert set(NOT_CONFIG_FIELDS[name]) <= set(params), f"stale entries for {name}"


def test_help_shows_the_models_defaults():
    from tunelab.serve.config import ServeConfig

    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for field in ("port", "max_batch", "max_tokens_limit", "host"):
        assert f"[default: {ServeConfig.model_fields[field].default}]" in out, field


class _Section(BaseModel):
    rate: float = Field(0.5, ge=0.0, le=1.0)


class _Settings(BaseModel):
    size: int = Field(8, ge=1)
    section: _Section = Field(default_factory=_Section)


def _demo_app(seen: list) -> typer.Typer:
    demo = typer.Typer()

    @demo.command()
    def run(ctx: typer.Context, size: int = field_option(_Settings, "size", "--size"),
            rate: float = field_option(_Settings, "section.rate", "--rate")) -> None:
        seen.append((size, rate, given_fields(ctx, run)))

    return demo


def test_only_given_flags_become_settings():
    seen: list = []
    demo = _demo_app(seen)
    runner = CliRunner()
    assert runner.invoke(demo, []).exit_code == 0
    assert runner.invoke(demo, ["--rate", "0.25"]).exit_code == 0
    assert runner.invoke(demo, ["--size", "8"]).exit_code == 0  # the default value, given: still a setting
    assert seen == [(8, 0.5, {}), (8, 0.25, {"section.rate": 0.25}), (8, 0.5, {"size": 8})]
    bad = runner.invoke(demo, ["--rate", "2"])
    assert bad.exit_code == 2 and "--rate" in bad.output
