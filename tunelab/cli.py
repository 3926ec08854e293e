"""The `tunelab` command line: a thin layer over the library."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from tunelab import __version__
from tunelab.errors import TunelabError

app = typer.Typer(help="tunelab: measure prompts, generate teacher data, fine-tune and serve small LMs.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
prompt_app = typer.Typer(help="Inspect prompt specs.", no_args_is_help=True)
app.add_typer(prompt_app, name="prompt")

# Wide enough for the results table when the output is a file or a CI log (rich defaults to 80 there).
console = Console(width=None if Console().is_terminal else 160)
err_console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"error: {message}", highlight=False, soft_wrap=True, markup=False)
    raise typer.Exit(code)


def _progress_factory(progress) -> Callable[[str, int], Callable[[int], None]]:
    def make(desc: str, total: int) -> Callable[[int], None]:
        task = progress.add_task(desc, total=total)
        return lambda n: progress.advance(task, n)

    return make


def _new_progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err_console, transient=False,
                    disable=not err_console.is_terminal)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        console.print(f"tunelab {__version__}")
        raise typer.Exit(0)


# --------------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------------
@app.command("eval")
def eval_cmd(
    config: Optional[Path] = typer.Argument(None, help="Eval config YAML (variants x models x dataset)."),
    prompt: List[Path] = typer.Option([], "--prompt", "-p", help="Prompt spec YAML (quick form; repeatable)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset JSONL/CSV (quick form)."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="bundled | HF dir | .gguf | openai:MODEL (overrides the config)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT adapter directory on top of the model."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="Use only the first N items."),
    out: Path = typer.Option(Path("runs/eval"), "--out", "-o", help="Output directory."),
    samples: Optional[int] = typer.Option(None, "--samples", min=1, help="Repeat each item N times (sampling)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, help="Sampling temperature."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1),
    scoring: Optional[str] = typer.Option(None, "--scoring", help="auto | loglik | generate"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print items, token estimate and cost; run nothing."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Ignore and do not fill the model-call cache."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.html."),
) -> None:
    """Run prompt variants x models over a dataset; print the table, write results, summary and report."""
    from tunelab.config import EvalConfig, ModelConfig, validate_as
    from tunelab.evaluate.runner import EvalRunner, load_eval_config

    if config is not None:
        cfg = load_eval_config(config)
        base_dir = config.parent
        if prompt or data:
            _fail("give either a config file or --prompt/--data, not both")
    else:
        if not prompt or data is None:
            _fail("give an eval config, or --prompt SPEC.yaml and --data FILE.jsonl (see `tunelab eval --help`)")
        for p in prompt:
            if not p.is_file():
                _fail(f"no such file: {p}")
        names = [p.stem for p in prompt]
        if len(set(names)) != len(names):
            names = [f"{i}:{p.stem}" for i, p in enumerate(prompt)]
        cfg = validate_as(EvalConfig, {"name": "eval", "data": {"path": str(data.resolve())},
                                       "variants": {n: str(p.resolve()) for n, p in zip(names, prompt)}},
                          "<command line>")
        base_dir = Path.cwd()
    updates: dict = {}
    gen = cfg.generation.model_dump()
    if samples is not None:
        gen["samples"] = samples
    if temperature is not None:
        gen["temperature"] = temperature
    if max_new_tokens is not None:
        gen["max_new_tokens"] = max_new_tokens
    updates["generation"] = gen
    if scoring is not None:
        updates["scoring"] = scoring
    if model is not None or adapter is not None:
        mcfgs = cfg.model_configs()
        base = mcfgs[0] if mcfgs else ModelConfig()
        models = [base.model_copy(update={"model": model if model is not None else base.model,
                                          "adapter": str(adapter.resolve()) if adapter else base.adapter,
                                          "name": None})]
        updates["models"] = [mc.model_dump() for mc in models]
    cfg = validate_as(EvalConfig, {**cfg.model_dump(), **updates}, config or "<command line>")
    if cfg.generation.samples > 1 and cfg.generation.temperature == 0:
        _fail("--samples > 1 needs --temperature > 0 (greedy decoding repeats the same answer)")

    with _new_progress() as progress:
        runner = EvalRunner(cfg, base_dir, out, limit=limit, use_cache=not no_cache,
                            progress=_progress_factory(progress), log=lambda s: None)
        if dry_run:
            plans = runner.dry_run()
    if dry_run:
        _print_dry_run(plans)
        return
    with _new_progress() as progress:
        runner.progress = _progress_factory(progress)
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


def _fmt_metric(m) -> str:
    if not m:
        return "-"
    return f"{m.value * 100:.1f} [{m.low * 100:.1f}, {m.high * 100:.1f}]"


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
    from tunelab.stats import format_p

    for c in summary.cells:
        comp, is_best = c.comparison, summary.is_best(c)
        word = summary.cell_verdict(c)
        style = "bold green" if is_best else "red" if comp is not None and comp.significant else ""
        row = [c.variant, c.model, c.mode, _fmt_metric(c.metrics.get(metric))]
        if summary.task == "label":
            row.append(_fmt_metric(c.metrics.get("macro_f1")))
        row += [_fmt_metric(c.metrics.get("compliance")), f"{c.tokens.prompt_mean:.0f}", f"{c.latency_ms.mean:.0f}",
                "-" if is_best or comp is None else format_p(comp.p), f"[{style}]{word}[/]" if style else word]
        t.add_row(*row)
    console.print(t)
    for n in summary.notes:
        console.print(f"  - {n}", highlight=False)


# --------------------------------------------------------------------------------------------------
# prompt
# --------------------------------------------------------------------------------------------------
@prompt_app.command("render")
def prompt_render(
    spec: Path = typer.Argument(..., help="Prompt spec YAML."),
    input: Optional[str] = typer.Option(None, "--input", "-i", help="Input text (the `text` field)."),
    item: Optional[str] = typer.Option(None, "--item", help="A JSON object of dataset fields."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Also show the exact text after the model's chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print the messages as JSON."),
) -> None:
    """Show the exact messages a spec produces for one input."""
    from tunelab.prompts import load_prompt_spec

    s = load_prompt_spec(spec)
    if item is not None:
        try:
            fields = json.loads(item)
        except json.JSONDecodeError as e:
            _fail(f"--item: invalid JSON ({e.msg}); expected an object like '{{\"text\": \"...\"}}'")
        if not isinstance(fields, dict):
            _fail("--item: expected a JSON object")
    else:
        fields = {"text": input if input is not None else "", "question": input if input is not None else ""}
    messages = s.render(fields)
    if as_json:
        console.print_json(json.dumps(messages, ensure_ascii=False))
    else:
        for m in messages:
            console.rule(f"[bold]{m['role']}")
            console.print(m["content"], highlight=False, markup=False)
        console.rule()
    if model is not None:
        from tunelab.models import load_model

        mdl = load_model(model)
        if hasattr(mdl, "render"):
            console.rule("[bold]as the model sees it")
            console.print(mdl.render(messages), highlight=False, markup=False)
            console.print(f"({mdl.count_tokens(messages)} tokens)")


# Commands that live beside their library code register themselves here (each module has register(app)).
def _register_subcommands() -> None:
    import importlib

    for name in ("tunelab.train.command", "tunelab.generate.command", "tunelab.serve.command",
                 "tunelab.run.command"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(app)


_register_subcommands()


def main() -> None:
    """Entry point: bad input becomes one line on stderr and exit code 2, never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    try:
        app(standalone_mode=True)
    except TunelabError as e:
        err_console.print(f"error: {e}", highlight=False, soft_wrap=True, markup=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


def _quiet_libraries() -> None:
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)


if __name__ == "__main__":
    main()
