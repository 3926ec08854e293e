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

from tunelab.run.util import now, read_json, read_jsonl
from tunelab.stats import PairedComparison, format_p, paired_sentence, verdict

MAX_EXAMPLES = 16


def _load(p: Path) -> Any:
    return read_json(p) if p.is_file() else None


def _points(x: float) -> str:
    return f"{x * 100:+.1f}"


def _comparison(v: dict) -> PairedComparison:
    return PairedComparison.model_validate({k: x for k, x in v.items() if k != "baseline"})


def method_sentence(name: str, m: dict, best: str) -> str:
    v = m.get("vs_best") or {}
    if not v.get("n"):
        return f"{name}: no paired items with the best prompt"
    return paired_sentence(name, f"the best prompt ({best})", _comparison(v))


def build_summary(out: Path, state: dict, r) -> dict[str, Any]:
    """The run's headline numbers from the stage folders (only what finished)."""
    ev = _load(out / "eval" / "summary.json")
    after = _load(out / "eval_after" / "summary.json")
    stages = state.get("stages", {})
    summary: dict[str, Any] = {
        "name": r.name, "description": r.exp.description, "created": now(), "experiment": str(r.path),
        "model": r.model, "limit": r.limit, "metric": "accuracy",
        "stages": {k: {"status": v.get("status"), "action": v.get("action"), "hash": v.get("hash")}
                   for k, v in stages.items()},
    }
    best = None
    if ev:
        summary["dataset"] = {"name": ev.get("dataset"), "path": ev.get("dataset_path"), "n_items": ev.get("n_items"),
                              "task": ev.get("task"), "labels": ev.get("labels")}
        rows = []
        for c in ev["cells"]:
            comp = c.get("comparison") or {}
            is_best = (ev.get("best") or {}).get("variant") == c["variant"]
            word = verdict(comp.get("diff"), comp.get("significant"), best=is_best) if comp or is_best else "-"
            rows.append({"variant": c["variant"], "mode": c.get("mode"), "accuracy": c["metrics"].get("accuracy"),
                         "macro_f1": c["metrics"].get("macro_f1"), "compliance": c["metrics"].get("compliance"),
                         "prompt_tokens_mean": c["tokens"]["prompt_mean"],
                         "completion_tokens_mean": c["tokens"]["completion_mean"],
                         "ms_per_item": c["latency_ms"]["mean"], "spec_hash": c.get("spec_hash"),
                         "diff_vs_best": comp.get("diff"), "p_value": comp.get("p_value"),
                         "p_holm": comp.get("p_holm"), "significant": comp.get("significant"),
                         "verdict": word, "is_best": is_best})
        summary["prompts"] = rows
        b = next((x for x in rows if x["is_best"]), None)
        if b is not None:
            best = b["variant"]
            summary["best_prompt"] = {"variant": best, "accuracy": b["accuracy"]}
    methods = []
    for m in r.methods:
        name = m.entry.name
        tr = (stages.get(f"train/{name}") or {})
        res = dict(tr.get("result") or {}) if tr.get("status") == "done" else {}
        entry: dict[str, Any] = {"name": name, "method": res.get("method") or m.base_data.get("method"),
                                 "train": res or None}
        a = (after or {}).get("methods", {}).get(name) if stages.get("eval_after", {}).get("status") == "done" else None
        if a:
            entry.update(prompt=a["prompt"], accuracy=a["metrics"].get("accuracy"),
                         macro_f1=a["metrics"].get("macro_f1"), compliance=a["metrics"].get("compliance"),
                         vs_best=a["vs_best"], vs_before=a["vs_before"],
                         verdict=_comparison(a["vs_best"]).verdict if a["vs_best"].get("n") else "not evaluated",
                         sentence=method_sentence(name, a, best or "?"))
        methods.append(entry)
    summary["methods"] = methods
    summary["verdict"] = _verdict(summary, best)
    cost_rows = []
    for k in state.get("stage_order", list(stages)):
        v = stages.get(k)
        if not v:
            continue
        c = v.get("cost") or {}
        cost_rows.append({"stage": k, "status": v.get("status"), "action": v.get("action"),
                          "wall_s": c.get("wall_s"), "tokens": c.get("tokens"), "peak_rss_mb": c.get("peak_rss_mb"),
                          "teacher_usd": c.get("teacher_usd")})
    summary["cost"] = {
        "stages": cost_rows,
        "total_wall_s": round(sum(x["wall_s"] or 0 for x in cost_rows), 2),
        "total_tokens": sum(x["tokens"] or 0 for x in cost_rows),
        "peak_rss_mb": max((x["peak_rss_mb"] or 0 for x in cost_rows), default=0),
        "teacher_usd": (round(sum(x["teacher_usd"] or 0 for x in cost_rows), 6)
                        if any(x["teacher_usd"] is not None for x in cost_rows) else None),
        "train_wall_s": round(sum(x["wall_s"] or 0 for x in cost_rows if x["stage"].startswith("train/")), 2),
    }
    serve = stages.get("serve")
    if serve and serve.get("status") == "done":
        summary["serve"] = serve.get("result")
    return summary


def _verdict(s: dict, best: str | None) -> dict[str, Any]:
    if best is None:
        return {"text": "No result yet: the eval stage has not finished (or the data has no gold answers).",
                "tuning_wins": None}
    acc = s["best_prompt"]["accuracy"]
    scored = [m for m in s["methods"] if m.get("vs_best", {}).get("n")]
    if not s["methods"]:
        return {"text": f"Prompting only: the best prompt is {best} with {acc['value'] * 100:.1f}% "
                        f"[{acc['low'] * 100:.1f}, {acc['high'] * 100:.1f}].", "tuning_wins": None}
    if not scored:
        return {"text": f"The best prompt is {best} ({acc['value'] * 100:.1f}%); the tuned models have not been "
                        "evaluated yet.", "tuning_wins": None}
    top = max(scored, key=lambda m: m["vs_best"]["diff"]["value"])
    v = _comparison(top["vs_best"])
    wins = bool(v.significant and v.diff.value > 0)
    loses = bool(v.significant and v.diff.value < 0)
    train_min = (s.get("cost") or {}).get("train_wall_s")
    head = ("Tuning beat prompting" if wins else "Prompting beat tuning" if loses
            else "No significant difference between tuning and prompting")
    text = (f"{head}: {top['name']} {top['accuracy']['value'] * 100:.1f}% vs the best prompt {best} "
            f"{acc['value'] * 100:.1f}% ({_points(v.diff.value)} points [{_points(v.diff.low)}, "
            f"{_points(v.diff.high)}], McNemar p={format_p(v.p)}, n={v.n}).")
    return {"text": text, "tuning_wins": wins, "tuning_loses": loses, "best_method": top["name"],
            "diff": v.diff.value, "train_wall_s": train_min}


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------
def _examples(out: Path, summary: dict, limit: int = MAX_EXAMPLES) -> tuple[list[str], list[dict]]:
    """The same items side by side: the best prompt's prediction (base model) and each tuned model's (or,
    without tuned models, every other prompt's), items where they disagree first."""
    best = (summary.get("best_prompt") or {}).get("variant")
    if best is None:
        return [], []
    eval_rows = read_jsonl(out / "eval" / "results.jsonl")
    base = {str(x["item_id"]): x for x in eval_rows if x["variant"] == best and x.get("sample", 0) == 0}
    names = [m["name"] for m in summary.get("methods", []) if m.get("accuracy")]
    by: dict[str, dict[str, dict]] = {n: {} for n in names}
    if names:
        for x in read_jsonl(out / "eval_after" / "results.jsonl"):
            if x.get("model") in by and x.get("sample", 0) == 0:
                by[x["model"]][str(x["item_id"])] = x
        cols = [f"{best} (best prompt)"] + names
    else:  # prompting only: the other prompts beside the best one
        names = [p["variant"] for p in summary.get("prompts") or [] if p["variant"] != best]
        by = {n: {} for n in names}
        for x in eval_rows:
            if x["variant"] in by and x.get("sample", 0) == 0:
                by[x["variant"]][str(x["item_id"])] = x
        cols = [f"{best} (best prompt)"] + [f"{n} (prompt)" for n in names]
    items = []
    for iid, b in base.items():
        cells = [b] + [by[n].get(iid) for n in names]
        outcomes = [c.get("correct") if c else None for c in cells]
        disagree = len({o for o in outcomes if o is not None}) > 1
        gain = outcomes[0] is False and any(o for o in outcomes[1:])
        items.append({"item_id": iid, "input": b.get("input"), "gold": b.get("gold"),
                      "cells": [{"prediction": c.get("prediction") if c else None,
                                 "raw": (c.get("raw_output") or "") if c else "",
                                 "correct": c.get("correct") if c else None} for c in cells],
                      "rank": (0 if gain else 1 if disagree else 2)})
    items.sort(key=lambda e: e["rank"])
    return cols, items[:limit]


def _charts(out: Path, summary: dict) -> dict[str, str]:
    from tunelab.report import plots

    charts: dict[str, str] = {}
    prompts = summary.get("prompts") or []
    names, vals, lows, highs, best_i = [], [], [], [], None
    for p in prompts:
        if p.get("accuracy"):
            if p["is_best"]:
                best_i = len(names)
            names.append(f"prompt: {p['variant']}")
            vals.append(p["accuracy"]["value"])
            lows.append(p["accuracy"]["low"])
            highs.append(p["accuracy"]["high"])
    for m in summary.get("methods", []):
        if m.get("accuracy"):
            names.append(f"tuned: {m['name']} ({m.get('prompt')})")
            vals.append(m["accuracy"]["value"])
            lows.append(m["accuracy"]["low"])
            highs.append(m["accuracy"]["high"])
    if names:
        charts["accuracy"] = plots.metric_bars(names, vals, lows, highs, metric="accuracy", best=best_i)
    scored = [m for m in summary.get("methods", []) if (m.get("vs_best") or {}).get("n")]
    if scored:
        charts["diff"] = plots.diff_intervals(
            [m["name"] for m in scored], [m["vs_best"]["diff"]["value"] for m in scored],
            [m["vs_best"]["diff"]["low"] for m in scored], [m["vs_best"]["diff"]["high"] for m in scored],
            xlabel=f"accuracy points vs the best prompt ({summary['best_prompt']['variant']}), paired 95% interval")
    series = {}
    for m in summary.get("methods", []):
        hist = read_jsonl(out / "train" / m["name"] / "metrics.jsonl")
        if hist:
            series[m["name"]] = ([h["step"] for h in hist], [h["loss"] for h in hist])
    if series:
        charts["loss"] = plots.loss_curves(series)
    return charts


def _fmt_interval(m: dict | None) -> str:
    return "-" if not m else f"{m['value'] * 100:.1f} [{m['low'] * 100:.1f}, {m['high'] * 100:.1f}]"


def _fmt_diff(v: dict | None) -> str:
    if not v or not v.get("n"):
        return "-"
    d = v["diff"]
    return f"{_points(d['value'])} [{_points(d['low'])}, {_points(d['high'])}]"


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


def render_run_report(summary: dict, out: Path) -> str:
    env_info = _load(out / "env.json") or {}
    cols, examples = _examples(out, summary)
    return _environment().get_template("run.html").render(
        s=summary, charts=_charts(out, summary), example_cols=cols, examples=examples, env=env_info,
        serve=summary.get("serve"))


def write_run_report(path: Path, summary: dict, out: Path) -> Path:
    path.write_text(render_run_report(summary, out), encoding="utf-8")
    return path
