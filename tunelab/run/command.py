"""`tunelab run EXPERIMENT.yaml` and `tunelab compare RUN_A RUN_B` (registered by tunelab/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def _fmt(m: dict | None) -> str:
    return "-" if not m else f"{m['value'] * 100:.1f} [{m['low'] * 100:.1f}, {m['high'] * 100:.1f}]"


def _stage_line(key: str, st: dict) -> str:
    c = st.get("cost") or {}
    res = st.get("result") or {}
    action = st.get("action") or st.get("status")
    what = ""
    if key == "eval" and res:
        acc = (res.get("accuracy") or {}).get(res.get("best"))
        what = f"best prompt {res.get('best')} {_fmt(acc)} on {res.get('n_items')} items"
    elif key == "generate" and res:
        what = f"{res.get('kept')} rows kept from teacher {res.get('teacher')}" + (
            f", ${res['cost_usd']:.4f}" if res.get("cost_usd") is not None else "")
    elif key.startswith("train/") and res:
        what = (f"{res.get('method')}: {res.get('steps')} steps, loss {res.get('loss_first', 0):.3f} -> "
                f"{res.get('loss_last', 0):.3f}, {res.get('tok_s', 0):.0f} tok/s")
    elif key == "eval_after" and res:
        what = "; ".join(f"{n} {_fmt(m.get('accuracy'))}" for n, m in res.items())
    elif key == "serve" and res:
        sm = res.get("smoke")
        what = ("smoke test ok: " + ", ".join(f"{a['model']} -> {a['answer']!r}" for a in sm["answers"])) if sm \
            else res["commands"][0]
    took = f"{c['wall_s']:.1f}s" if c.get("wall_s") is not None else ""
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
    from rich.console import Console
    from rich.table import Table

    from tunelab.cli import _new_progress, _progress_factory, err_console
    from tunelab.errors import ConfigError
    from tunelab.run.experiment import run_experiment
    from tunelab.stats import format_p, verdict

    if not experiment.is_file():
        raise ConfigError(f"no such file: {experiment}")
    console = Console(width=None if Console().is_terminal else 160)

    def log(msg: str) -> None:
        err_console.print(msg, highlight=False, markup=False, soft_wrap=True)

    def on_stage(key: str, st: dict) -> None:
        console.print(_stage_line(key, st), highlight=False, markup=False)

    with _new_progress() as progress:
        summary = run_experiment(experiment, out=out, force=force, only=only, limit=limit, log=log,
                                 progress=_progress_factory(progress), console=None, on_stage=on_stage)
    folder = Path(out) if out is not None else Path("runs") / summary["name"]
    t = Table(title=f"{summary['name']}: {(summary.get('dataset') or {}).get('name', '')} "
                    f"({(summary.get('dataset') or {}).get('n_items', '?')} items)")
    for col in ("model", "prompt", "accuracy % [95% CI]", "vs best prompt", "p (Holm)", "verdict"):
        t.add_column(col, justify="right" if col in ("vs best prompt", "p (Holm)") else "left")
    for p in summary.get("prompts") or []:
        t.add_row("base", p["variant"], _fmt(p.get("accuracy")),
                  "-" if p["is_best"] else f"{(p.get('diff_vs_best') or 0) * 100:+.1f}",
                  "-" if p["is_best"] or p.get("p_holm") is None else format_p(p["p_holm"]), p["verdict"])
    for m in summary.get("methods") or []:
        v = m.get("vs_best") or {}
        if not v.get("n"):
            t.add_row(m["name"], m.get("prompt") or "-", "-", "-", "-", "not evaluated")
            continue
        d = v["diff"]
        t.add_row(m["name"], m["prompt"], _fmt(m.get("accuracy")),
                  f"{d['value'] * 100:+.1f} [{d['low'] * 100:+.1f}, {d['high'] * 100:+.1f}]",
                  format_p(v["p_holm"]), verdict(d["value"], v.get("significant")))
    console.print(t)
    console.print(summary["verdict"]["text"], highlight=False, markup=False, soft_wrap=True)
    cost = summary["cost"]
    console.print(f"cost: {cost['total_wall_s']:.1f}s of stage time, {cost['total_tokens']:,} tokens, peak RSS "
                  f"{cost['peak_rss_mb']:.0f} MB" + (f", teacher ${cost['teacher_usd']:.4f}"
                                                      if cost.get("teacher_usd") is not None else ""),
                  highlight=False)
    console.print(f"summary: {folder / 'summary.json'}", highlight=False, soft_wrap=True)
    console.print(f"report: {folder / 'report.html'}", highlight=False, soft_wrap=True)


def compare_cmd(
    run_a: Path = typer.Argument(..., help="A `tunelab run` folder."),
    run_b: Path = typer.Argument(..., help="Another one."),
) -> None:
    """Print what differs between two runs: headline, metrics per prompt and tuned model, cost, config,
    environment, stages."""
    from rich.console import Console
    from rich.table import Table

    from tunelab.run.compare import compare_runs

    sections = compare_runs(run_a, run_b)
    console = Console(width=None if Console().is_terminal else 160)
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
