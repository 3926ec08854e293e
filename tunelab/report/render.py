"""The Jinja2 environment of every report page and the filters the templates format numbers with."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jinja2

from tunelab.stats import format_diff, format_interval, format_p

__all__ = ["render_page", "write_page", "environment"]

TEMPLATES = Path(__file__).parent / "templates"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}"


def _points(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f}"


def _diff(c: Any) -> str:
    """A comparison's difference (an Interval ``diff``, in points) as ``+2.0 [-1.5, +5.5]``."""
    return format_diff(c.diff) if c and getattr(c, "n", 0) else "-"


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _thousands(n: int | float | None) -> str:
    return "-" if n is None else f"{n:,}"


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters.update(pct=_pct, interval=format_interval, points=_points, diffci=_diff, pvalue=format_p, secs=_secs,
                       show=_show, thousands=_thousands)
    return env


def render_page(template: str, **context: Any) -> str:
    """The page ``template`` (a file under templates/) rendered with ``context``: one HTML string."""
    return environment().get_template(template).render(**context)


def write_page(path: str | Path, template: str, **context: Any) -> Path:
    """Render ``template`` and write it to ``path`` (UTF-8); returns the path."""
    from tunelab.results import write_text

    return write_text(path, render_page(template, **context))
