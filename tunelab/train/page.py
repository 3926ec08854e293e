"""The training page (``report.html`` beside ``report.json``): one self-contained HTML file from a TrainReport (what
was trained, the loss curve, the before/after eval as paired comparisons, the forgetting probe, the cost;
``tunelab/report/templates/train.html.jinja``)."""

from __future__ import annotations

from pathlib import Path

from tunelab.report import plots, write_page
from tunelab.stats import paired_sentence
from tunelab.train.results import TrainReport

__all__ = ["write"]


def _mfu_text(r: TrainReport) -> str:
    m = r.mfu
    if m.estimate is None:
        return "-"
    return f"{m.estimate:.1%} of {m.reference_flops / 1e9:.0f} GFLOP/s ({m.reference})"


def _headline(r: TrainReport) -> dict | None:
    """The before/after verdict of the first variant, when the eval ran."""
    ev = r.eval
    if ev is None or ev.error or not ev.variants:
        return None
    name, c = next(iter(ev.variants.items()))
    if not c.n:
        return None
    win, lose = c.significant and c.diff.value > 0, c.significant and c.diff.value < 0
    head = "Training helped" if win else "Training hurt" if lose else "No significant change from training"
    lines = [paired_sentence("after", "before", x) + f" ({v})" for v, x in ev.variants.items() if x.n]
    if ev.ema:
        lines += [paired_sentence("the weight average", "the last weights", x) + f" ({v})"
                  for v, x in ev.ema.items() if x.n]
    return {"text": f"{head}: {c.a.value:.1%} -> {c.b.value:.1%} on {c.n} items ({name})", "win": win, "lose": lose,
            "lines": lines}


def write(path: str | Path, r: TrainReport) -> Path:
    p, d = r.parameters, r.data
    run_rows = [
        ("method", r.method), ("base model", r.base_model), (r.artifact_kind, r.artifact),
        ("trainable parameters", f"{p.trainable:,} of {p.total:,} ({p.trainable_share:.2%})"),
        ("steps", f"{r.steps}" + (f" (resumed at {r.resumed_from})" if r.resumed_from else "")),
        ("processes", r.processes), ("device / autocast", f"{r.device} / {r.autocast}"),
        ("tokens (targets)", f"{r.tokens:,} ({r.target_tokens:,})"), ("throughput", f"{r.tok_s:.1f} tok/s"),
        ("MFU (estimate)", _mfu_text(r)),
        ("peak memory", f"{r.peak_rss_gb:.2f} GB RSS" + (f"; estimated {r.memory.total_gb:.2f} GB ({r.memory.device})"
                                                        if r.memory is not None else "")),
        ("loss first / last", f"{r.loss.first:.4f} / {r.loss.last:.4f}" if r.history else "-"),
    ]
    data_rows = [("file", f"{d.path} ({d.format})"),
                 *[("mixed in", f"{x['path']} ({x['format']}, {x['examples']:,} examples)") for x in d.sources[1:]],
                 ("examples / tokens / targets", f"{d.examples:,} / {d.tokens:,} / {d.target_tokens:,} "
                                                 f"({d.target_share:.1%})"),
                 ("length mean / p50 / p95 / max", f"{d.length_mean} / {d.length_p50} / {d.length_p95} / "
                                                   f"{d.length_max}")]
    if d.dropped_too_long:
        data_rows.append(("dropped (too long)", f"{d.dropped_too_long:,}"))
    fg = r.forgetting
    forgetting_rows = []
    if fg is not None:
        forgetting_rows = [("data", f"{fg.data} ({fg.examples} examples)"), ("perplexity before", fg.perplexity_before)]
        if fg.perplexity_after is not None:
            forgetting_rows += [("perplexity after", fg.perplexity_after),
                                ("change", f"{fg.perplexity_change_pct:+.2f}%")]
    loss_chart = plots.loss_curves({"loss": ([h.step for h in r.history], [h.loss for h in r.history])}) \
        if r.history else ""
    cost_rows = [{"stage": "training", "wall_s": r.train_seconds, "tokens": r.tokens,
                  "peak_rss_mb": r.peak_rss_gb * 1024, "teacher_usd": None}]
    if r.eval is not None and r.eval.wall_s is not None:
        cost_rows.append({"stage": "before/after eval", "wall_s": r.eval.wall_s, "tokens": None,
                          "peak_rss_mb": r.peak_rss_gb_with_eval * 1024, "teacher_usd": None})
    return write_page(path, "train.html.jinja", title=f"tunelab train: {r.name}", rep=r, headline=_headline(r),
                      run_rows=run_rows, data_rows=data_rows, forgetting_rows=forgetting_rows, loss_chart=loss_chart,
                      cost_rows=cost_rows)
