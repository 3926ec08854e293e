"""The `tunelab run` page (``report.html``): one self-contained HTML file from the run's summary and its stage folders
(the verdict, accuracy of every prompt and tuned model, the paired differences, loss curves, cost per stage, example
outputs side by side, the stages and the environment; ``tunelab/report/templates/run.html.jinja``).
"""

from __future__ import annotations

from pathlib import Path

from tunelab.evaluate.results import EvalRow, read_rows
from tunelab.report import plots, write_page
from tunelab.run.results import RunSummary
from tunelab.run.util import read_json, read_jsonl
from tunelab.stats import Interval

__all__ = ["write"]

MAX_EXAMPLES = 16


def _first_samples(rows: list[EvalRow], key) -> dict[str, dict[str, EvalRow]]:
    by: dict[str, dict[str, EvalRow]] = {}
    for x in rows:
        if x.sample == 0:
            by.setdefault(key(x), {})[x.item_id] = x
    return by


def _examples(out: Path, summary: RunSummary, limit: int = MAX_EXAMPLES) -> tuple[list[str], list[dict]]:
    """The same items side by side: the best prompt's prediction (base model) and each tuned model's (or,
    without tuned models, every other prompt's), items where they disagree first."""
    if summary.best_prompt is None:
        return [], []
    best = summary.best_prompt.variant
    eval_rows = read_rows(out / "eval" / "results.jsonl")
    base = _first_samples(eval_rows, lambda x: x.variant).get(best, {})
    names = [m.name for m in summary.methods if m.accuracy]
    if names:
        by = _first_samples(read_rows(out / "eval_after" / "results.jsonl"), lambda x: x.model)
        cols = [f"{best} (best prompt)"] + names
    else:  # prompting only: the other prompts beside the best one
        names = [p.variant for p in summary.prompts or [] if p.variant != best]
        by = _first_samples(eval_rows, lambda x: x.variant)
        cols = [f"{best} (best prompt)"] + [f"{n} (prompt)" for n in names]
    items = []
    for iid, b in base.items():
        cells = [b] + [by.get(n, {}).get(iid) for n in names]
        outcomes = [c.correct if c else None for c in cells]
        disagree = len({o for o in outcomes if o is not None}) > 1
        gain = outcomes[0] is False and any(o for o in outcomes[1:])
        items.append({"item_id": iid, "input": b.input, "gold": b.gold,
                      "cells": [{"prediction": c.prediction if c else None, "raw": (c.raw_output or "") if c else "",
                                 "correct": c.correct if c else None} for c in cells],
                      "rank": (0 if gain else 1 if disagree else 2)})
    items.sort(key=lambda e: e["rank"])
    return cols, items[:limit]


def _charts(out: Path, summary: RunSummary) -> dict[str, str | None]:
    from tunelab.report import plots

    charts: dict[str, str | None] = dict.fromkeys(("accuracy", "diff", "loss"))  # a run of --only generate has none
    bars: list[tuple[str, Interval]] = []
    best_i = None
    for p in summary.prompts or []:
        if p.accuracy:
            if p.is_best:
                best_i = len(bars)
            bars.append((f"prompt: {p.variant}", p.accuracy))
    bars += [(f"tuned: {m.name} ({m.prompt})", m.accuracy) for m in summary.methods if m.accuracy]
    if bars:
        charts["accuracy"] = plots.metric_bars([n for n, _ in bars], [a.value for _, a in bars],
                                               [a.low for _, a in bars], [a.high for _, a in bars],
                                               metric="accuracy", best=best_i)
    scored = [m for m in summary.methods if m.evaluated]
    if scored:
        charts["diff"] = plots.diff_intervals(
            [m.name for m in scored], [m.vs_best.diff.value for m in scored], [m.vs_best.diff.low for m in scored],
            [m.vs_best.diff.high for m in scored],
            xlabel=f"accuracy points vs the best prompt ({summary.best_prompt.variant}), paired 95% interval")
    series = {}
    for m in summary.methods:
        hist = read_jsonl(out / "train" / m.name / "metrics.jsonl")
        if hist:
            series[m.name] = ([h["step"] for h in hist], [h["loss"] for h in hist])
    if series:
        charts["loss"] = plots.loss_curves(series)
    return charts


def write(path: Path, summary: RunSummary, out: Path) -> Path:
    """The page of the run in ``out`` (its summary, stage folders and env.json) written to ``path``."""
    env_info = read_json(out / "env.json") if (out / "env.json").is_file() else {}
    cols, examples = _examples(out, summary)
    c = summary.cost
    return write_page(path, "run.html.jinja", title=f"tunelab run: {summary.name}", s=summary,
                      charts=_charts(out, summary), example_cols=cols, examples=examples, env=env_info,
                      serve=summary.serve, pairs={f"{c.model} vs {c.baseline}": c for c in summary.pairs},
                      cost_rows=[{**r.model_dump(), "extra": _action(r)} for r in c.stages],
                      cost_total={"wall_s": c.total_wall_s, "tokens": c.total_tokens, "peak_rss_mb": c.peak_rss_mb,
                                  "teacher_usd": c.teacher_usd})


def _action(r) -> str:
    return (r.action or r.status or "") + (f" ({r.status})" if r.status != "done" else "")
