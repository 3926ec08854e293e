"""The headline of a run (``summary.json``): "did tuning beat prompting, by how much, at what cost?", built from
the stage folders: the prompt table (eval/summary.json), each tuned model against the best prompt on the same items
(eval_after/summary.json: paired bootstrap interval of the difference, exact McNemar, Holm over the methods), the
training runs (the train stages' results in run.json) and the cost of every stage (run.json).
"""

from __future__ import annotations

from pathlib import Path

from tunelab.evaluate.results import EvalSummary
from tunelab.run.results import (BestPrompt, DatasetInfo, EvalAfterSummary, GenerateStageResult, MethodRow,
                                 PromptRow, RunCost, RunState, RunSummary, RunVerdict, ServeStageResult, StageBrief,
                                 StageCostRow, TrainStageResult, VsBaseline)
from tunelab.run.util import now
from tunelab.stats import format_p, paired_sentence, verdict


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
        row = MethodRow(name=name, method=res.method if res else m.method, train=res)
        a = after.methods.get(name) if after is not None else None
        if a is not None:
            row.prompt, row.vs_best, row.vs_before = a.prompt, a.vs_best, a.vs_before
            row.accuracy, row.macro_f1, row.compliance = (a.metrics.get(k) for k in ("accuracy", "macro_f1",
                                                                                      "compliance"))
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
    gen = stages.get("generate")
    return RunSummary(
        name=r.name, description=r.exp.description, created=now(), experiment=str(r.path), model=r.model,
        limit=r.limit, metric="accuracy",
        stages={k: StageBrief(status=v.status, action=v.action, hash=v.hash) for k, v in stages.items()},
        dataset=dataset, prompts=prompts, best_prompt=best_prompt, methods=methods,
        pairs=after.pairs if after is not None else [],
        teacher=gen.result if gen is not None and isinstance(gen.result, GenerateStageResult) else None,
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
