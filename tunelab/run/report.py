"""The headline of a run (``summary.json``) and its one-page report (``report.html``).

The summary answers "did tuning beat prompting, by how much, at what cost?" from the stage folders: the
prompt table (eval/summary.json), each tuned model against the best prompt on the same items
(eval_after/summary.json: paired bootstrap interval of the difference, exact McNemar, Holm over the
methods), the training runs (train/*/report.json) and the cost of every stage (run.json).

The report is one self-contained HTML file: inline CSS and SVG charts, no scripts, nothing fetched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from tunelab.evaluate.results import EvalRow, EvalSummary, read_rows
from tunelab.run.results import (BestPrompt, DatasetInfo, EvalAfterSummary, MethodRow, PromptRow, RunCost, RunState,
                                 RunSummary, RunVerdict, ServeStageResult, StageBrief, StageCostRow, TrainStageResult,
                                 VsBaseline)
from tunelab.run.util import now, read_jsonl
from tunelab.stats import Interval, format_p, paired_sentence, verdict

MAX_EXAMPLES = 16


def _points(x: float) -> str:
    return f"{x * 100:+.1f}"


def method_sentence(name: str, v: VsBaseline | None, best: str) -> str:
    if v is None or not v.n:
        return f"{name}: no paired items with the best prompt"
    return paired_sentence(name, f"the best prompt ({best})", v)


def _prompt_rows(ev: EvalSummary) -> list[PromptRow]:
    rows = []
    for c in ev.cells:
        comp, is_best = c.comparison, ev.best is not None and ev.best.variant == c.variant
        rows.append(PromptRow(
            variant=c.variant, mode=c.mode, accuracy=c.metrics.get("accuracy"), macro_f1=c.metrics.get("macro_f1"),
            compliance=c.metrics.get("compliance"), prompt_tokens_mean=c.tokens.prompt_mean,
            completion_tokens_mean=c.tokens.completion_mean, ms_per_item=c.latency_ms.mean, spec_hash=c.spec_hash,
            diff_vs_best=comp.diff if comp else None, p_value=comp.p_value if comp else None,
            p_holm=comp.p_holm if comp else None, significant=comp.significant if comp else None,
            verdict=verdict(comp.diff if comp else None, comp.significant if comp else None, best=is_best),
            is_best=is_best))
    return rows


def build_summary(out: Path, state: RunState, r) -> RunSummary:
    """The run's headline numbers from the stage folders (only what finished)."""
    ev = EvalSummary.read(out / "eval" / "summary.json") if (out / "eval" / "summary.json").is_file() else None
    stages = state.stages
    after = None
    if (out / "eval_after" / "summary.json").is_file() and getattr(stages.get("eval_after"), "status", None) == "done":
        after = EvalAfterSummary.read(out / "eval_after" / "summary.json")
    dataset = prompts = best_prompt = None
    if ev is not None:
        dataset = DatasetInfo(name=ev.dataset, path=ev.dataset_path, n_items=ev.n_items, task=ev.task,
                              labels=ev.labels)
        prompts = _prompt_rows(ev)
        b = next((x for x in prompts if x.is_best), None)
        if b is not None:
            best_prompt = BestPrompt(variant=b.variant, accuracy=b.accuracy)
    best = best_prompt.variant if best_prompt else None
    methods = []
    for m in r.methods:
        name = m.entry.name
        tr = stages.get(f"train/{name}")
        res = tr.result if tr is not None and tr.status == "done" and isinstance(tr.result, TrainStageResult) \
            else None
        row = MethodRow(name=name, method=res.method if res else m.base_data.get("method"), train=res)
        a = after.methods.get(name) if after is not None else None
        if a is not None:
            row.prompt, row.vs_best, row.vs_before = a.prompt, a.vs_best, a.vs_before
            row.accuracy, row.macro_f1, row.compliance = (a.metrics.get(k) for k in ("accuracy", "macro_f1",
                                                                                      "compliance"))
            row.verdict = a.vs_best.verdict if a.vs_best.n else "not evaluated"
            row.sentence = method_sentence(name, a.vs_best, best or "?")
        methods.append(row)
    cost_rows = [StageCostRow(stage=k, status=v.status, action=v.action, **(v.cost.model_dump() if v.cost else {}))
                 for k in (state.stage_order or list(stages)) if (v := stages.get(k)) is not None]
    cost = RunCost(
        stages=cost_rows, total_wall_s=round(sum(x.wall_s or 0 for x in cost_rows), 2),
        total_tokens=sum(x.tokens or 0 for x in cost_rows),
        peak_rss_mb=max((x.peak_rss_mb or 0 for x in cost_rows), default=0),
        teacher_usd=(round(sum(x.teacher_usd or 0 for x in cost_rows), 6)
                     if any(x.teacher_usd is not None for x in cost_rows) else None),
        train_wall_s=round(sum(x.wall_s or 0 for x in cost_rows if x.stage.startswith("train/")), 2))
    serve = stages.get("serve")
    return RunSummary(
        name=r.name, description=r.exp.description, created=now(), experiment=str(r.path), model=r.model,
        limit=r.limit, metric="accuracy",
        stages={k: StageBrief(status=v.status, action=v.action, hash=v.hash) for k, v in stages.items()},
        dataset=dataset, prompts=prompts, best_prompt=best_prompt, methods=methods,
        verdict=_verdict(best_prompt, methods, cost), cost=cost,
        serve=serve.result if serve is not None and serve.status == "done" and isinstance(serve.result,
                                                                                          ServeStageResult) else None)


def _verdict(best: BestPrompt | None, methods: list[MethodRow], cost: RunCost) -> RunVerdict:
    if best is None:
        return RunVerdict(text="No result yet: the eval stage has not finished (or the data has no gold answers).")
    acc = best.accuracy
    scored = [m for m in methods if m.evaluated]
    if not methods:
        return RunVerdict(text=f"Prompting only: the best prompt is {best.variant} with {acc.value * 100:.1f}% "
                               f"[{acc.low * 100:.1f}, {acc.high * 100:.1f}].")
    if not scored:
        return RunVerdict(text=f"The best prompt is {best.variant} ({acc.value * 100:.1f}%); the tuned models have "
                               "not been evaluated yet.")
    top = max(scored, key=lambda m: m.vs_best.diff.value)
    v = top.vs_best
    wins = bool(v.significant and v.diff.value > 0)
    loses = bool(v.significant and v.diff.value < 0)
    head = ("Tuning beat prompting" if wins else "Prompting beat tuning" if loses
            else "No significant difference between tuning and prompting")
    text = (f"{head}: {top.name} {top.accuracy.value * 100:.1f}% vs the best prompt {best.variant} "
            f"{acc.value * 100:.1f}% ({_points(v.diff.value)} points [{_points(v.diff.low)}, "
            f"{_points(v.diff.high)}], McNemar p={format_p(v.p)}, n={v.n}).")
    return RunVerdict(text=text, tuning_wins=wins, tuning_loses=loses, best_method=top.name, diff=v.diff.value,
                      train_wall_s=cost.train_wall_s)


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------
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


def _charts(out: Path, summary: RunSummary) -> dict[str, str]:
    from tunelab.report import plots

    charts: dict[str, str] = {}
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


def _fmt_interval(m: Interval | None) -> str:
    return "-" if not m else f"{m.value * 100:.1f} [{m.low * 100:.1f}, {m.high * 100:.1f}]"


def _fmt_diff(v: VsBaseline | None) -> str:
    if not v or not v.n:
        return "-"
    return f"{_points(v.diff.value)} [{_points(v.diff.low)}, {_points(v.diff.high)}]"


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _show(x: Any) -> str:
    return "(none)" if x is None else str(x)


def _environment() -> jinja2.Environment:
    from tunelab.run.template import TEMPLATE

    env = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True,
                             loader=jinja2.DictLoader({"run.html": TEMPLATE}))
    env.filters.update(interval=_fmt_interval, diffci=_fmt_diff, pvalue=format_p, secs=_fmt_s, show=_show)
    return env


def render_run_report(summary: RunSummary, out: Path) -> str:
    from tunelab.run.util import read_json

    env_info = read_json(out / "env.json") if (out / "env.json").is_file() else {}
    cols, examples = _examples(out, summary)
    return _environment().get_template("run.html").render(
        s=summary, charts=_charts(out, summary), example_cols=cols, examples=examples, env=env_info,
        serve=summary.serve)


def write_run_report(path: Path, summary: RunSummary, out: Path) -> Path:
    path.write_text(render_run_report(summary, out), encoding="utf-8")
    return path
