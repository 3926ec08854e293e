"""`tunelab generate CONFIG.yaml`: teacher-model training data (label, respond, self-instruct)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from tunelab.console import console, err_console, log, new_progress
from tunelab.generate.config import GenerateConfig
from tunelab.generate.results import GenerateDryRun, GenerateStats
from tunelab.options import field_option, given_fields


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)


def generate_cmd(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="Generate config YAML (see examples/generate/ and docs/generate.md)."),
    out: Optional[Path] = field_option(GenerateConfig, "output.dir", "--out", "-o",
                                       help="Output folder (default: output.dir or runs/generate/<name>). "
                                            "Rerun to resume."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1,
                                        help="Use only the first N inputs (self-instruct: N new tasks)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count requests, tokens and cost; send nothing."),
    batch_api: bool = typer.Option(False, "--batch-api",
                                   help="Write an OpenAI Batch API input file instead of calling the teacher."),
    batch_results: List[Path] = typer.Option([], "--batch-results",
                                             help="Ingest a Batch API results file (repeatable), then export."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor fill the response cache."),
    concurrency: int = field_option(GenerateConfig, "teacher.concurrency", "--concurrency", "-c",
                                    help="Requests in flight (overrides teacher.concurrency)."),
    model: Optional[str] = field_option(GenerateConfig, "teacher.model", "--model", "-m",
                                        help="Teacher model (overrides teacher.model)."),
    base_url: Optional[str] = field_option(GenerateConfig, "teacher.base_url", "--base-url",
                                           help="Endpoint (overrides teacher.base_url)."),
    eval_set: Optional[Path] = field_option(GenerateConfig, "contamination.eval_path", "--eval-set",
                                            help="Report overlap of the generated data with this eval set."),
) -> None:
    """Have a teacher model label texts, answer questions, or invent tasks; write validated training data.

    Crash-safe: every answer goes to a journal first, and rerunning the same command resumes."""
    from tunelab.generate.runner import RunOptions, run_generate

    if not config.is_file():
        from tunelab.errors import ConfigError

        raise ConfigError(f"no such file: {config}")
    concurrency_given = given_fields(ctx, generate_cmd).get("teacher.concurrency")  # else the config's
    opts = RunOptions(out=out, limit=limit, dry_run=dry_run, batch_api=batch_api, batch_results=list(batch_results),
                      use_cache=not no_cache, concurrency=concurrency_given, model=model, base_url=base_url,
                      eval_set=eval_set)
    progress = None
    if err_console.is_terminal and not dry_run:
        progress = new_progress(transient=True)
        task = progress.add_task("teacher", total=None)
        opts.progress = lambda done, total: progress.update(task, completed=done, total=total)
        progress.start()
    try:
        stats = run_generate(config, opts)
    finally:
        if progress is not None:
            progress.stop()
    if isinstance(stats, GenerateDryRun):
        _print_dry_run(stats)
    else:
        if stats.teacher_labels is not None and stats.teacher_labels.warning:
            log(f"warning: {stats.teacher_labels.warning}")  # once a run, also in stats.json
        _print_summary(stats)


def _print_dry_run(s: GenerateDryRun) -> None:
    console.print(f"dry run ({s.pipeline}, teacher {s.teacher} at {s.endpoint}): nothing was sent", highlight=False)
    console.print(f"  requests to send: {s.requests_to_send:,} ({s.already_done:,} already in the journal)")
    console.print(f"  prompt tokens (estimate): {s.prompt_tokens_est:,}; completion tokens at most: "
                  f"{s.max_completion_tokens:,}")
    if s.max_cost_usd is not None:
        console.print(f"  cost at most: ${s.max_cost_usd:.4f}")
    if s.note:
        console.print(f"  note: {s.note}", highlight=False)


def _print_summary(s: GenerateStats) -> None:
    t = Table(title=f"generate {s.name}: {s.pipeline}, teacher {s.teacher.model}", show_header=False)
    t.add_column("what")
    t.add_column("value")
    r = s.requests
    kept = f"{s.kept:,}"
    if s.inputs:
        kept += f" rows from {s.inputs:,} inputs"
    t.add_row("kept", kept)
    if s.excluded_inputs:
        t.add_row("excluded", f"{s.excluded_inputs:,} inputs found in data.exclude (not sent)")
    t.add_row("dropped", ", ".join(f"{k} {v}" for k, v in s.dropped.by_reason.items()) or "none")
    if s.pending:
        t.add_row("pending", f"{s.pending:,} (rerun to finish)")
    retries = ", ".join(f"{k}: {v}" for k, v in r.retries.items())
    t.add_row("answers", f"{r.fetched:,} from the teacher, {r.from_journal:,} resumed, {r.from_cache:,} "
                         f"cached" + (f"; retries {retries}" if retries else "")
              + (f"; repairs {r.repairs_ok}/{r.repairs_asked}" if r.repairs_asked else ""))
    if r.failed:
        t.add_row("failed requests", ", ".join(f"{k} {v}" for k, v in r.failed.items())
                  + " (asked again on the next run)")
    tok = s.tokens
    cost = f"; est. ${s.cost_usd:.4f}" if s.cost_usd is not None else ""
    t.add_row("tokens", f"{tok.prompt:,} prompt + {tok.completion:,} completion{cost}")
    lat = s.latency_ms
    if lat.n:
        t.add_row("latency", f"p50 {lat.p50:.0f} ms, p95 {lat.p95:.0f} ms over {lat.n:,} requests")
    if s.agreement_with_gold is not None:
        a = s.agreement_with_gold
        t.add_row("agreement with gold", f"{a.rate * 100:.1f}% of {a.n:,}")
    tl = s.teacher_labels
    if tl is not None and tl.confidence.n > tl.confidence.null:
        qs = tl.confidence.quantiles or {}
        line = (f"median {qs.get('p50', 0):.3f}, p10 {qs.get('p10', 0):.3f} over {tl.confidence.n - tl.confidence.null:,}"
                f" labels" + (f" ({tl.confidence.null:,} without)" if tl.confidence.null else ""))
        t.add_row("confidence", line)
    if tl is not None and (tl.min_confidence is not None or tl.balance != "none"):
        t.add_row("kept labels", f"{tl.kept:,} of {tl.labelled:,} ({tl.keep_rate * 100:.1f}% of the inputs)"
                  + (f"; agreement with gold: all {tl.agreement_all.rate * 100:.1f}%, kept "
                     f"{tl.agreement_kept.rate * 100:.1f}%" if tl.agreement_all and tl.agreement_kept else ""))
    if s.teacher_accuracy is not None:
        a = s.teacher_accuracy
        t.add_row("teacher accuracy", f"{a.rate * 100:.1f}% of {a.n:,}")
    if s.contamination:
        c = s.contamination
        t.add_row("contamination", f"{c['contaminated']:,} of {c['rows_checked']:,} rows overlap the eval set "
                                   f"({c['exact']} exact, {c['ngram']} {c['ngram_n']}-gram)")
    console.print(t)
    if s.stopped:
        console.print(f"stopped early: {s.stopped}; rerun with a larger budget to continue", highlight=False)
    if s.batch_input:
        console.print("Batch API input: " + ", ".join(s.batch_input), highlight=False)
        console.print("  upload it (openai api files.create -p batch), create a batch for /v1/chat/completions, "
                      "then rerun with --batch-results RESULTS.jsonl", highlight=False)
    for name, path in s.outputs.items():
        console.print(f"{name}: {path}", highlight=False)
    console.print(f"stats: {Path(s.data_path).parent / 'stats.json'}", highlight=False)
    sys.stdout.flush()
