"""`tunelab eval`: prompt variants x models over a dataset (registered by tunelab/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from tunelab.config import EvalConfig
from tunelab.console import console, fail, log, new_progress, progress_factory
from tunelab.options import choices, field_option, given_fields, set_fields


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)


def eval_cmd(
    ctx: typer.Context,
    config: Optional[Path] = typer.Argument(None, help="Eval config YAML (variants x models x dataset)."),
    prompt: List[Path] = typer.Option([], "--prompt", "-p", help="Prompt spec YAML (quick form; repeatable)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset JSONL/CSV (quick form)."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="bundled | HF dir | .gguf | openai:MODEL (overrides the config)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT adapter directory on top of the model."),
    allow_other_base: bool = typer.Option(False, "--allow-other-base",
                                          help="Apply --adapter to a base other than the one it was trained on "
                                               "(same shapes; refused otherwise)."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="Use only the first N items."),
    out: Path = typer.Option(Path("runs/eval"), "--out", "-o", help="Output directory."),
    samples: int = field_option(EvalConfig, "generation.samples", "--samples",
                                help="Repeat each item N times (sampling)."),
    temperature: float = field_option(EvalConfig, "generation.temperature", "--temperature",
                                      help="Sampling temperature."),
    max_new_tokens: int = field_option(EvalConfig, "generation.max_new_tokens", "--max-new-tokens"),
    scoring: str = field_option(EvalConfig, "scoring", "--scoring", help=choices(EvalConfig, "scoring")),
    encoding: Optional[str] = field_option(EvalConfig, "data.encoding", "--encoding",
                                           help="The data file's encoding when it is not UTF-8 (e.g. cp949)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print items, token estimate and cost; run nothing."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Ignore and do not fill the model-call cache."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.html."),
) -> None:
    """Run prompt variants x models over a dataset; print the table, write results, summary and report."""
    from tunelab.config import ModelConfig, validate_as
    from tunelab.evaluate.runner import EvalRunner, load_eval_config

    if config is not None:
        cfg = load_eval_config(config)
        base_dir = config.parent
        if prompt or data:
            fail("give either a config file or --prompt/--data, not both")
    else:
        if not prompt or data is None:
            fail("give an eval config, or --prompt SPEC.yaml and --data FILE.jsonl (see `tunelab eval --help`)")
        for p in prompt:
            if not p.is_file():
                fail(f"no such file: {p}")
        names = [p.stem for p in prompt]
        if len(set(names)) != len(names):
            names = [f"{i}:{p.stem}" for i, p in enumerate(prompt)]
        cfg = validate_as(EvalConfig, {"name": "eval", "data": {"path": str(data.resolve())},
                                       "variants": {n: str(p.resolve()) for n, p in zip(names, prompt)}},
                          "<command line>")
        base_dir = Path.cwd()
    settings = set_fields(cfg.model_dump(), given_fields(ctx, eval_cmd))
    if model is not None or adapter is not None:
        mcfgs = cfg.model_configs()
        base = mcfgs[0] if mcfgs else ModelConfig()
        models = [base.model_copy(update={"model": model if model is not None else base.model,
                                          "adapter": str(adapter.resolve()) if adapter else base.adapter,
                                          "name": None})]
        settings["models"] = [mc.model_dump() for mc in models]
    if allow_other_base:
        settings["models"] = [{**(m if isinstance(m, dict) else {"model": m}), "allow_other_base": True}
                              for m in settings.get("models") or ["bundled"]]
    cfg = validate_as(EvalConfig, settings, config or "<command line>")
    if cfg.generation.samples > 1 and cfg.generation.temperature == 0:
        fail("--samples > 1 needs --temperature > 0 (greedy decoding repeats the same answer)")

    with new_progress() as progress:
        runner = EvalRunner(cfg, base_dir, out, limit=limit, use_cache=not no_cache,
                            progress=progress_factory(progress), log=lambda s: None,
                            warn=lambda s: log(f"warning: {s}"))
        if dry_run:
            plans = runner.dry_run()
    if dry_run:
        _print_dry_run(plans)
        return
    with new_progress() as progress:
        runner.progress = progress_factory(progress)
        summary, rows = runner.run()
    summary.write(out / "summary.json")
    _print_table(summary)
    console.print(f"results: {out / 'results.jsonl'}  summary: {out / 'summary.json'}")
    if report:
        from tunelab.evaluate import page

        page.write(out / "report.html", summary, rows)
        console.print(f"report: {out / 'report.html'}")


def _print_dry_run(plans: list) -> None:
    t = Table(title="dry run: nothing was called")
    for col in ("variant", "model", "mode", "items", "samples", "prompt tokens", "max output tokens", "cost"):
        t.add_column(col, justify="right" if col not in ("variant", "model", "mode") else "left")
    for p in plans:
        cost = f"${p.cost_usd:.4f}" if p.cost_usd is not None else "-"
        t.add_row(p.variant, p.model, p.mode, str(p.items), str(p.samples), f"{p.prompt_tokens:,}",
                  f"{p.max_output_tokens:,}", cost)
    console.print(t)
    total = sum(p.cost_usd or 0 for p in plans)
    if any(p.cost_usd is not None for p in plans):
        console.print(f"estimated cost at most: ${total:.4f}")


def _print_table(summary) -> None:
    """The eval's results table (an EvalSummary) on stdout."""
    metric = summary.metric
    t = Table(title=f"{summary.title}: {summary.dataset} ({summary.n_items} items, task {summary.task})")
    cols = ["variant", "model", "mode", f"{metric} % [95% CI]"]
    if summary.task == "label":
        cols.append("macro-F1 %")
    cols += ["compliance %", "tok/item", "ms/item", "p vs best", "verdict"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("variant", "model", "mode", "verdict") else "right")
    from tunelab.stats import format_interval, format_p

    for c in summary.cells:
        comp, is_best = c.comparison, summary.is_best(c)
        word = summary.cell_verdict(c)
        style = "bold green" if is_best else "red" if comp is not None and comp.significant else ""
        row = [c.variant, c.model, c.mode, format_interval(c.metrics.get(metric))]
        if summary.task == "label":
            row.append(format_interval(c.metrics.get("macro_f1")))
        row += [format_interval(c.metrics.get("compliance")), f"{c.tokens.prompt_mean:.0f}", f"{c.latency_ms.mean:.0f}",
                "-" if is_best or comp is None else format_p(comp.p), f"[{style}]{word}[/]" if style else word]
        t.add_row(*row)
    console.print(t)
    for n in summary.notes:
        console.print(f"  - {n}", highlight=False, markup=False)
