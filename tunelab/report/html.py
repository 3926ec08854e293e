"""A self-contained HTML report of an eval run: one file, charts inlined as SVG, no scripts, nothing fetched.

``render_report`` turns the run summary (``summary.json``) and the per-item result rows into a page:
the headline (best cell, which differences are significant), the table of cells, a bar chart of the main
metric with its intervals, a confusion matrix per cell (label tasks), the items most cells got wrong, the
prompt previews and the notes. All text goes through Jinja2 autoescaping.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import jinja2

from tunelab.report import plots
from tunelab.stats import format_p, verdict

__all__ = ["render_report", "write_report"]

MAX_EXAMPLES = 20

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True,
                          trim_blocks=True, lstrip_blocks=True)


# -- formatting ------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}"


def _interval(m: dict | None) -> str:
    return "-" if not m else f"{m['value'] * 100:.1f} [{m['low'] * 100:.1f}, {m['high'] * 100:.1f}]"


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


_env.filters.update(pct=_pct, interval=_interval, pvalue=format_p, show=_show)


# -- view model ------------------------------------------------------------------------------------
def _names(cells: Sequence[dict]) -> list[str]:
    """Variant names alone when every cell has the same model, else ``variant @ model``."""
    one_model = len({c["model"] for c in cells}) <= 1
    return [c["variant"] if one_model else f"{c['variant']} @ {c['model']}" for c in cells]


def _is_best(cell: dict, best: dict | None) -> bool:
    return bool(best) and cell["variant"] == best["variant"] and cell["model"] == best["model"]


def _verdict(cell: dict, best: dict | None) -> str:
    comp = cell.get("comparison") or {}
    return verdict(comp.get("diff"), comp.get("significant"), best=_is_best(cell, best))


def _headline(cells: Sequence[dict], names: list[str], best: dict | None) -> list[dict]:
    """Plain sentences (``text``, ``significant``): how the best cell compares with each of the others."""
    if best is None:
        return []
    best_name = next(n for c, n in zip(cells, names) if _is_best(c, best))
    lines = []
    for c, name in zip(cells, names):
        comp = c.get("comparison")
        if _is_best(c, best) or not comp:
            continue
        points = -comp["diff"] * 100
        p = format_p(comp.get("p_holm", comp.get("p_value")))
        p = p if p.startswith("<") else f"={p}"
        if comp.get("significant"):
            text = f"{best_name} beats {name} by {points:+.1f} points (p{p}, significant)"
        else:
            text = f"{best_name} vs {name}: {points:+.1f} points, not significant (p{p})"
        lines.append({"text": text, "significant": bool(comp.get("significant"))})
    return lines


def _cell_key(row: dict) -> tuple[str, str]:
    return (str(row.get("variant")), str(row.get("model")))


def _worst_examples(results: Sequence[dict], cells: Sequence[dict], names: list[str],
                    limit: int = MAX_EXAMPLES) -> tuple[list[dict], str]:
    """Items that most cells got wrong (or, without gold, did not comply with), worst first.

    One row per cell and item: its first sample. Returns the examples and what "wrong" meant.
    """
    name_of = {(c["variant"], c["model"]): n for c, n in zip(cells, names)}
    first: dict[str, dict[tuple[str, str], dict]] = defaultdict(dict)
    for r in results:
        item, key = str(r.get("item_id")), _cell_key(r)
        prev = first[item].get(key)
        if prev is None or int(r.get("sample", 0)) < int(prev.get("sample", 0)):
            first[item][key] = r
    graded = any(r.get("correct") is not None for r in results)
    what = "wrong" if graded else "did not comply"

    def failed(r: dict) -> bool | None:
        return (None if r.get("correct") is None else not r["correct"]) if graded else not r.get("complied")

    examples = []
    for item, by_cell in first.items():
        outcomes = [f for f in (failed(r) for r in by_cell.values()) if f is not None]
        n_failed = sum(outcomes)
        if not n_failed:
            continue
        any_row = next(iter(by_cell.values()))
        order = [k for k in name_of if k in by_cell] + [k for k in by_cell if k not in name_of]
        examples.append({
            "item_id": item, "input": any_row.get("input"), "gold": any_row.get("gold"),
            "failed": n_failed, "total": len(outcomes),
            "cells": [{"name": name_of.get(k, f"{k[0]} @ {k[1]}"), "prediction": by_cell[k].get("prediction"),
                       "raw_output": by_cell[k].get("raw_output"), "correct": by_cell[k].get("correct"),
                       "complied": by_cell[k].get("complied")} for k in order],
        })
    examples.sort(key=lambda e: (-e["failed"] / e["total"], -e["failed"], e["item_id"]))
    return examples[:limit], what


def _chart(cells: Sequence[dict], names: list[str], best: dict | None, metric: str) -> tuple[str, str]:
    shown = metric if any(metric in c["metrics"] for c in cells) else "compliance"
    rows = [(n, c["metrics"][shown], _is_best(c, best)) for c, n in zip(cells, names) if shown in c["metrics"]]
    if not rows:
        return "", shown
    best_i = next((i for i, (_, _, b) in enumerate(rows) if b), None)
    svg = plots.metric_bars([n for n, _, _ in rows], [m["value"] for _, m, _ in rows],
                            [m["low"] for _, m, _ in rows], [m["high"] for _, m, _ in rows],
                            metric=shown, best=best_i)
    return svg, shown


def _context(summary: dict, results: Sequence[dict], title: str) -> dict:
    cells = list(summary.get("cells") or [])
    names = _names(cells)
    best = summary.get("best")
    metric = summary.get("metric") or (best or {}).get("metric") or "accuracy"
    chart, chart_metric = _chart(cells, names, best, metric)
    best_cell = next((c for c in cells if _is_best(c, best)), None)
    confusions = [{"name": n, "svg": plots.confusion_heatmap(c["confusion"]["labels"], c["confusion"]["matrix"]),
                   "per_label": c.get("per_label") or {}}
                  for c, n in zip(cells, names) if c.get("confusion")]
    examples, failed_word = _worst_examples(results, cells, names)
    return {
        "title": title, "summary": summary, "metric": metric, "task": summary.get("task", ""),
        "best": best, "best_name": next((n for c, n in zip(cells, names) if c is best_cell), None),
        "best_metric": best_cell["metrics"].get(metric) if best_cell else None,
        "headline": _headline(cells, names, best),
        "rows": [{"name": n, "cell": c, "is_best": _is_best(c, best), "verdict": _verdict(c, best)}
                 for c, n in zip(cells, names)],
        "has_macro_f1": any("macro_f1" in c["metrics"] for c in cells),
        "has_json": any("json_valid" in c["metrics"] for c in cells),
        "has_flaky": any("flaky_items" in c for c in cells),
        "chart": chart, "chart_metric": chart_metric, "confusions": confusions,
        "examples": examples, "failed_word": failed_word,
        "prompts": [{"name": n, "text": c.get("prompt_preview")} for c, n in zip(cells, names)
                    if c.get("prompt_preview")],
        "notes": list(summary.get("notes") or []),
        "environment": summary.get("environment") or {},
    }


# -- entry points ----------------------------------------------------------------------------------
def render_report(summary: dict, results: list[dict], *, title: str) -> str:
    """The report as one HTML string (UTF-8, inline CSS and SVG, no external references)."""
    return _env.get_template("template.html.jinja").render(**_context(summary, results, title))


def write_report(path: str | Path, summary: dict, results: list[dict], title: str | None = None) -> Path:
    """Render the report and write it to ``path`` (UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(summary, results, title=title or summary.get("title") or "eval"), encoding="utf-8")
    return path
