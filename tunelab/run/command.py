"""`tunelab run EXPERIMENT.yaml` and `tunelab compare RUN_A RUN_B` (registered by tunelab/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from tunelab.console import console, log, new_progress, progress_factory
from tunelab.run.results import (EvalAfterStageResult, EvalStageResult, GenerateStageResult, ServeStageResult,
                                 StageCost, StageRecord, TrainStageResult, VocabStageResult)
from tunelab.stats import format_interval


def _stage_line(key: str, st: StageRecord) -> str:
    c, res = st.cost or StageCost(), st.result
    action = st.action or st.status
    what = ""
    if isinstance(res, EvalStageResult):
        acc = res.accuracy.get(res.best) if res.best else None
        what = f"best prompt {res.best} {format_interval(acc)} on {res.n_items} items"
    elif isinstance(res, GenerateStageResult):
        what = f"{res.kept} rows kept from teacher {res.teacher}" + (
            f", ${res.cost_usd:.4f}" if res.cost_usd is not None else "") + (
            f", {res.agreement.accuracy.value:.1%} agreement with gold" if res.agreement is not None else "")
    elif isinstance(res, VocabStageResult):
        what = (f"{res.added} tokens added: {res.tokens_per_text_before:.1f} -> {res.tokens_per_text_after:.1f} "
                f"tokens per text")
    elif isinstance(res, TrainStageResult):
        what = (f"{res.method}: {res.steps} steps, loss {res.loss_first or 0:.3f} -> {res.loss_last or 0:.3f}, "
                f"{res.tok_s or 0:.0f} tok/s")
    elif isinstance(res, EvalAfterStageResult):
        what = "; ".join(f"{n} {format_interval(m.accuracy)}" for n, m in res.methods.items())
    elif isinstance(res, ServeStageResult):
        what = ("smoke test ok: " + ", ".join(f"{a.model} -> {a.answer!r}" for a in res.smoke.answers)) \
            if res.smoke else res.commands[0]
    took = f"{c.wall_s:.1f}s" if c.wall_s is not None else ""
    if action == "cached":
        took = f"(ran before in {took})" if took else ""
    return f"{key:<14} {action:<8} {took:<22} {what}".rstrip()


def run_cmd(
    experiment: Path = typer.Argument(..., help="Experiment YAML (see examples/experiments/ and docs/run.md)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<name>). "
                                                                 "Rerun the same command to resume."),
    force: List[str] = typer.Option([], "--force", help="Redo this stage even if cached: eval, generate, train, "
                                                        "train/NAME, eval_after, serve (repeatable)."),
    only: List[str] = typer.Option([], "--only", help="Run only this stage (the stages it reads must be done; "
                                                      "repeatable)."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1,
                                        help="Quick smoke run: at most N eval items, training records and "
                                             "teacher inputs."),
) -> None:
    """The whole loop from one experiment file: prompts -> teacher data -> fine-tuning -> eval against the
    best prompt -> serve. Each stage is cached by a hash of its inputs; one HTML report at the end."""
    from rich.table import Table

    from tunelab.errors import ConfigError
    from tunelab.run.experiment import run_experiment
    from tunelab.stats import format_diff, format_p, paired_sentence

    if not experiment.is_file():
        raise ConfigError(f"no such file: {experiment}")

    def on_stage(key: str, st: StageRecord) -> None:
        console.print(_stage_line(key, st), highlight=False, markup=False)

    with new_progress() as progress:
        summary = run_experiment(experiment, out=out, force=force, only=only, limit=limit, log=log,
                                 progress=progress_factory(progress), console=None, on_stage=on_stage)
    folder = Path(out) if out is not None else Path("runs") / summary.name
    ds = summary.dataset
    t = Table(title=f"{summary.name}: {ds.name if ds else ''} ({ds.n_items if ds else '?'} items)")
    for col in ("model", "prompt", "accuracy % [95% CI]", "vs best prompt", "p (Holm)", "verdict"):
        t.add_column(col, justify="right" if col in ("vs best prompt", "p (Holm)") else "left")
    for p in summary.prompts or []:
        t.add_row("base", p.variant, format_interval(p.accuracy),
                  "-" if p.is_best else f"{(p.diff_vs_best or 0) * 100:+.1f}",
                  "-" if p.is_best or p.p_holm is None else format_p(p.p_holm), p.verdict)
    for m in summary.methods:
        if not m.evaluated:
            t.add_row(m.name, m.prompt or "-", "-", "-", "-", "not evaluated")
            continue
        v = m.vs_best
        t.add_row(m.name, m.prompt, format_interval(m.accuracy),
                  format_diff(v.diff), format_p(v.p),
                  v.verdict)
    console.print(t)
    if summary.teacher is not None and summary.teacher.agreement is not None:
        a = summary.teacher.agreement
        console.print(f"teacher {summary.teacher.teacher} vs gold on {a.n} kept training texts: agreement "
                      f"{format_interval(a.accuracy)}%, Cohen's kappa {a.kappa:.3f}", highlight=False, markup=False)
    for pc in summary.pairs:
        console.print(paired_sentence(pc.model, pc.baseline, pc), highlight=False, markup=False, soft_wrap=True)
    console.print(summary.verdict.text, highlight=False, markup=False, soft_wrap=True)
    cost = summary.cost
    console.print(f"cost: {cost.total_wall_s:.1f}s of stage time, {cost.total_tokens:,} tokens, peak RSS "
                  f"{cost.peak_rss_mb:.0f} MB" + (f", teacher ${cost.teacher_usd:.4f}"
                                                  if cost.teacher_usd is not None else ""),
                  highlight=False)
    console.print(f"summary: {folder / 'summary.json'}", highlight=False, soft_wrap=True)
    console.print(f"report: {folder / 'report.html'}", highlight=False, soft_wrap=True)


def compare_cmd(
    run_a: Path = typer.Argument(..., help="A `tunelab run` folder."),
    run_b: Path = typer.Argument(..., help="Another one."),
) -> None:
    """Print what differs between two runs: headline, metrics per prompt and tuned model, cost, config,
    environment, stages."""
    from rich.table import Table

    from tunelab.run.compare import compare_runs

    sections = compare_runs(run_a, run_b)
    if not sections:
        console.print("no differences")
        return
    for title, rows in sections:
        t = Table(title=title, title_justify="left")
        t.add_column("")
        t.add_column(f"A: {run_a}", overflow="fold")
        t.add_column(f"B: {run_b}", overflow="fold")
        t.add_column("change")
        for row in rows:
            t.add_row(*row)
        console.print(t)


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.command("compare")(compare_cmd)
