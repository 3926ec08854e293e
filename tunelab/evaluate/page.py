"""The eval page: one self-contained HTML file from an eval's summary and result rows.

The headline (the best cell, which differences are significant), the table of cells, a bar chart of the main
metric with its intervals, a confusion matrix per cell (label tasks), the items most cells got wrong, the cost,
the prompt previews and the notes (``tunelab/report/templates/eval.html.jinja``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

from tunelab.evaluate.results import Cell, EvalRow, EvalSummary
from tunelab.report import plots, render_page, write_page
from tunelab.stats import format_p

__all__ = ["render", "write"]

MAX_EXAMPLES = 20


# -- view model ------------------------------------------------------------------------------------
def _names(cells: Sequence[Cell]) -> list[str]:
    """Variant names alone when every cell has the same model, else ``variant @ model``."""
    one_model = len({c.model for c in cells}) <= 1
    return [c.variant if one_model else c.key for c in cells]


def _headline(summary: EvalSummary, names: list[str]) -> list[dict]:
    """Plain sentences (``text``, ``significant``): how the best cell compares with each of the others."""
    if summary.best is None:
        return []
    best_name = next(n for c, n in zip(summary.cells, names) if summary.is_best(c))
    lines = []
    for c, name in zip(summary.cells, names):
        comp = c.comparison
        if summary.is_best(c) or comp is None:
            continue
        points = -comp.diff * 100
        p = format_p(comp.p)
        p = p if p.startswith("<") else f"={p}"
        if comp.significant:
            text = f"{best_name} beats {name} by {points:+.1f} points (p{p}, significant)"
        else:
            text = f"{best_name} vs {name}: {points:+.1f} points, not significant (p{p})"
        lines.append({"text": text, "significant": comp.significant})
    return lines


def _worst_examples(results: Sequence[EvalRow], cells: Sequence[Cell], names: list[str],
                    limit: int = MAX_EXAMPLES) -> tuple[list[dict], str]:
    """Items that most cells got wrong (or, without gold, did not comply with), worst first.

    One row per cell and item: its first sample. Returns the examples and what "wrong" meant.
    """
    name_of = {(c.variant, c.model): n for c, n in zip(cells, names)}
    first: dict[str, dict[tuple[str, str], EvalRow]] = defaultdict(dict)
    for r in results:
        prev = first[r.item_id].get(r.cell)
        if prev is None or r.sample < prev.sample:
            first[r.item_id][r.cell] = r
    graded = any(r.correct is not None for r in results)
    what = "wrong" if graded else "did not comply"

    def failed(r: EvalRow) -> bool | None:
        return (None if r.correct is None else not r.correct) if graded else not r.complied

    examples = []
    for item, by_cell in first.items():
        outcomes = [f for f in (failed(r) for r in by_cell.values()) if f is not None]
        n_failed = sum(outcomes)
        if not n_failed:
            continue
        any_row = next(iter(by_cell.values()))
        order = [k for k in name_of if k in by_cell] + [k for k in by_cell if k not in name_of]
        examples.append({
            "item_id": item, "input": any_row.input, "gold": any_row.gold, "failed": n_failed, "total": len(outcomes),
            "cells": [{"name": name_of.get(k, f"{k[0]} @ {k[1]}"), "row": by_cell[k]} for k in order],
        })
    examples.sort(key=lambda e: (-e["failed"] / e["total"], -e["failed"], e["item_id"]))
    return examples[:limit], what


def _chart(summary: EvalSummary, names: list[str]) -> tuple[str, str]:
    cells, metric = summary.cells, summary.metric
    shown = metric if any(metric in c.metrics for c in cells) else "compliance"
    rows = [(n, c.metrics[shown], summary.is_best(c)) for c, n in zip(cells, names) if shown in c.metrics]
    if not rows:
        return "", shown
    best_i = next((i for i, (_, _, b) in enumerate(rows) if b), None)
    svg = plots.metric_bars([n for n, _, _ in rows], [m.value for _, m, _ in rows], [m.low for _, m, _ in rows],
                            [m.high for _, m, _ in rows], metric=shown, best=best_i)
    return svg, shown


def _context(summary: EvalSummary, results: Sequence[EvalRow], title: str) -> dict:
    cells = summary.cells
    names = _names(cells)
    chart, chart_metric = _chart(summary, names)
    best_cell = summary.best_cell
    confusions = [{"name": n, "svg": plots.confusion_heatmap(c.confusion.labels, c.confusion.matrix),
                   "per_label": c.per_label or {}}
                  for c, n in zip(cells, names) if c.confusion is not None]
    examples, failed_word = _worst_examples(results, cells, names)
    return {
        "title": title, "summary": summary, "metric": summary.metric, "task": summary.task,
        "best": summary.best, "best_name": next((n for c, n in zip(cells, names) if c is best_cell), None),
        "best_metric": best_cell.metrics.get(summary.metric) if best_cell else None,
        "headline": _headline(summary, names),
        "rows": [{"name": n, "cell": c, "is_best": summary.is_best(c), "verdict": summary.cell_verdict(c)}
                 for c, n in zip(cells, names)],
        "has_macro_f1": any("macro_f1" in c.metrics for c in cells),
        "has_json": any("json_valid" in c.metrics for c in cells),
        "has_flaky": any(c.flaky_items is not None for c in cells),
        "chart": chart, "chart_metric": chart_metric, "confusions": confusions,
        "examples": examples, "failed_word": failed_word,
        "prompts": [{"name": n, "text": c.prompt_preview} for c, n in zip(cells, names) if c.prompt_preview],
        "notes": summary.notes, "environment": summary.environment,
        "cost_rows": [{"stage": n, "wall_s": c.wall_s, "tokens": c.tokens.prompt_total + c.tokens.completion_total,
                       "peak_rss_mb": None, "teacher_usd": None} for c, n in zip(cells, names)],
        "cost_total": {"wall_s": sum(c.wall_s for c in cells),
                       "tokens": sum(c.tokens.prompt_total + c.tokens.completion_total for c in cells),
                       "peak_rss_mb": None, "teacher_usd": None},
        "cached": sum(c.cached for c in cells), "answers": sum(c.n_items * c.n_samples for c in cells),
    }


def render(summary: EvalSummary, results: Sequence[EvalRow], *, title: str | None = None) -> str:
    """The page as one HTML string (UTF-8, inline CSS and SVG, no external references)."""
    return render_page("eval.html.jinja", **_context(summary, results, title or summary.title or "eval"))


def write(path: str | Path, summary: EvalSummary, results: Sequence[EvalRow], title: str | None = None) -> Path:
    """Render the page and write it to ``path``; returns the path."""
    return write_page(path, "eval.html.jinja", **_context(summary, results, title or summary.title or "eval"))
