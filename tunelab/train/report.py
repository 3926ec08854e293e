"""The end of a training run: ``finish`` runs the before/after eval and writes ``report.json`` + ``report.html``
(trainable parameters, peak RSS, tok/s, an MFU estimate, the loss curve, eval before/after with intervals, the
forgetting probe) and prints the summary lines.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import torch

from tunelab.train.artifacts import write_json
from tunelab.train.evaluation import before_after_eval
from tunelab.train.forgetting import ForgettingProbe
from tunelab.train.loop import FitResult
from tunelab.train.session import TrainSession
from tunelab.train.throughput import flops_per_token, measured_matmul_flops, peak_rss_gb


# --------------------------------------------------------------------------------------------------
# the end of a run
# --------------------------------------------------------------------------------------------------
def env_info() -> dict[str, Any]:
    """The software and machine of the run (report.json's ``environment``)."""
    import platform

    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def finish(run: TrainSession, result: FitResult, params: dict[str, Any], probe: ForgettingProbe, *,
           artifact: Path, kind: str, last: Path | None = None) -> dict[str, Any]:
    run.accelerator.wait_for_everyone()
    if not run.is_main:
        return {}
    from transformers import AutoConfig

    stats = run.data.stats.as_dict()
    mcfg = AutoConfig.from_pretrained(str(run.model_path))
    t = run.cfg.train
    mean_len = min(max(stats["length_mean"], 1), t.pack_len) if not t.packing else \
        min(t.pack_len, stats["length_mean"] * t.micro_batch_size)
    share = 1.0 if t.prompt_loss_weight else stats["target_share"]
    fpt = flops_per_token(mcfg, run.cfg.method, mean_len, share, t.activation_checkpointing)
    peak = measured_matmul_flops(run.device, run.autocast)
    mfu = result.tok_s * fpt / peak if peak else None
    ev = None
    try:
        ev = before_after_eval(run, artifact, kind, last)
    except Exception as e:  # noqa: BLE001 - the trained artifact is saved; report the eval failure, do not lose it
        run.log(f"warning: before/after eval failed: {type(e).__name__}: {e}")
        ev = {"error": f"{type(e).__name__}: {e}"}
    losses = [h["loss"] for h in result.history]
    rep = {
        "name": run.cfg.name or run.out.name, "method": run.cfg.method, "base_model": run.cfg.model or "bundled",
        "artifact": str(artifact), "artifact_kind": kind, "out": str(run.out),
        "ema_decay": t.ema_decay, "last_weights": str(last) if last is not None else None,
        "parameters": params, "data": {"path": str(run.data.path), "format": run.data.format, **stats,
                                       "sources": run.data.sources},
        "steps": result.steps, "resumed_from": result.resumed_from, "processes": run.world,
        "tokens": result.tokens, "target_tokens": result.target_tokens,
        "train_seconds": round(result.train_seconds, 2), "tok_s": round(result.tok_s, 2),
        "peak_rss_gb": round(result.peak_rss_gb, 3), "peak_rss_gb_with_eval": round(peak_rss_gb(), 3),
        "autocast": str(run.autocast) if run.autocast else None,
        "device": str(run.device),
        "mfu": {"estimate": round(mfu, 4) if mfu is not None else None, "flops_per_token": round(fpt),
                "reference_flops": round(peak), "reference": f"measured {run.autocast or torch.float32} 1024^3 "
                                                              "matmul on this machine at the end of the run"},
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                 "last10_mean": sum(losses[-10:]) / len(losses[-10:]) if losses else None},
        "history": result.history, "forgetting": probe.as_dict(), "eval": ev,
        "config": run.cfg.model_dump(mode="json"), "environment": env_info(),
    }
    write_json(run.out / "report.json", rep)
    write_html(run.out / "report.html", rep)
    run.log(f"done: {result.steps} steps, loss {rep['loss']['first']:.4f} -> {rep['loss']['last']:.4f}, "
            f"{rep['tok_s']:.0f} tok/s, peak RSS {rep['peak_rss_gb']:.2f} GB; {kind}: {artifact}")
    if ev and "variants" in ev:
        for v, c in ev["variants"].items():
            if c.get("n"):
                run.log(f"eval {v}: {_paired_text(c, 'after', 'before')}")
        for v, c in ev.get("ema", {}).items():
            if c.get("n"):
                run.log(f"eval {v}, weight average (ema_decay {t.ema_decay:g}) vs last weights: "
                        f"{_paired_text(c, 'average', 'last weights')}")
    run.log(f"report: {run.out / 'report.html'}")
    return rep


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------
def loss_svg(history: list[dict[str, Any]]) -> str:
    if not history:
        return "<p>no steps</p>"
    from tunelab.report.plots import loss_curves

    return loss_curves({"loss": ([h["step"] for h in history], [h["loss"] for h in history])})


def _row(k: str, v: Any) -> str:
    return f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"


def _mfu_text(m: dict[str, Any]) -> str:
    if m["estimate"] is None:
        return "-"
    return f"{m['estimate']:.1%} of {m['reference_flops'] / 1e9:.0f} GFLOP/s ({m['reference']})"


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def _paired_text(c: dict[str, Any], b_name: str, a_name: str) -> str:
    """``a -> b: <the comparison's sentence>`` of a serialised PairedComparison."""
    from tunelab.stats import PairedComparison, paired_sentence

    pc = PairedComparison.model_validate(c)
    return f"{pc.a.value:.1%} -> {pc.b.value:.1%}: {paired_sentence(b_name, a_name, pc)}"


def _paired_table(variants: dict[str, dict[str, Any]], before: str, after: str) -> str:
    rows = [f"<table><tr><th>variant</th><th>{before}</th><th>{after}</th><th>difference</th><th>gained / lost</th>"
            "<th>p</th></tr>"]
    for v, c in variants.items():
        if not c.get("n"):
            continue
        a, b, d = c["a"], c["b"], c["diff"]
        rows.append(
            f"<tr><td>{html.escape(v)}</td><td>{_pct(a['value'])} [{_pct(a['low'])}, {_pct(a['high'])}]</td>"
            f"<td>{_pct(b['value'])} [{_pct(b['low'])}, {_pct(b['high'])}]</td><td>{d['value'] * 100:+.1f} "
            f"[{d['low'] * 100:+.1f}, {d['high'] * 100:+.1f}]</td><td>{c['gained']} / {c['lost']}</td>"
            f"<td>{c['p_value']:.3g}</td></tr>")
    return "".join(rows) + "</table>"


def write_html(path: Path, rep: dict[str, Any]) -> None:
    p = rep["parameters"]
    d = rep["data"]
    parts = [f"<h1>tunelab train: {html.escape(rep['name'])}</h1>",
             "<h2>Run</h2><table>",
             _row("method", rep["method"]), _row("base model", rep["base_model"]),
             _row(rep["artifact_kind"], rep["artifact"]),
             _row("trainable parameters", f"{p['trainable']:,} of {p['total']:,} ({p['trainable_share']:.2%})"),
             _row("steps", f"{rep['steps']}" + (f" (resumed at {rep['resumed_from']})" if rep["resumed_from"] else "")),
             _row("processes", rep["processes"]), _row("device / autocast", f"{rep['device']} / {rep['autocast']}"),
             _row("tokens (targets)", f"{rep['tokens']:,} ({rep['target_tokens']:,})"),
             _row("train time", f"{rep['train_seconds']:.1f} s"), _row("throughput", f"{rep['tok_s']:.1f} tok/s"),
             _row("peak RSS (training / with eval)",
                  f"{rep['peak_rss_gb']:.2f} / {rep['peak_rss_gb_with_eval']:.2f} GB"),
             _row("MFU (estimate)", _mfu_text(rep["mfu"])),
             _row("loss first / last", f"{rep['loss']['first']:.4f} / {rep['loss']['last']:.4f}"),
             "</table>",
             "<h2>Data</h2><table>",
             _row("file", f"{d['path']} ({d['format']})"),
             *[_row("mixed in", f"{x['path']} ({x['format']}, {x['examples']:,} examples)")
               for x in d.get("sources", [])[1:]],
             _row("examples / tokens / targets", f"{d['examples']:,} / {d['tokens']:,} / {d['target_tokens']:,} "
                                                 f"({d['target_share']:.1%})"),
             _row("length mean / p50 / p95 / max", f"{d['length_mean']} / {d['length_p50']} / {d['length_p95']} / "
                                                   f"{d['length_max']}"),
             "</table>", "<h2>Loss</h2>", loss_svg(rep["history"])]
    ev = rep.get("eval")
    if ev:
        parts.append("<h2>Eval before / after</h2>")
        if "error" in ev:
            parts.append(f"<p>failed: {html.escape(ev['error'])}</p>")
        else:
            parts.append(f"<p>{html.escape(str(ev['config']))}, {ev['items']} items; 95% intervals (Wilson for "
                         "accuracies, paired bootstrap for the difference), exact McNemar test.</p>")
            parts.append(_paired_table(ev["variants"], "before", "after"))
            if ev.get("ema"):
                parts.append(f"<h3>Weight average (ema_decay {rep['ema_decay']:g}) against the last weights</h3>"
                             f"<p>{html.escape(rep['artifact'])} holds the average; the last weights are in "
                             f"{html.escape(str(rep['last_weights']))}.</p>")
                parts.append(_paired_table(ev["ema"], "last weights", "average"))
    fg = rep.get("forgetting")
    if fg:
        parts += ["<h2>Forgetting probe</h2><table>", _row("data", f"{fg['data']} ({fg['examples']} examples)"),
                  _row("perplexity before", fg["perplexity_before"])]
        if "perplexity_after" in fg:
            parts += [_row("perplexity after", fg["perplexity_after"]),
                      _row("change", f"{fg['perplexity_change_pct']:+.2f}%")]
        parts.append("</table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:left}th{background:#f4f4f4}")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>tunelab train: {html.escape(rep['name'])}"
           f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path.write_text(doc, encoding="utf-8")
