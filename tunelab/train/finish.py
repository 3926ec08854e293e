"""The end of a training run: ``finish`` runs the before/after eval and writes ``report.json`` (a
:class:`~tunelab.train.results.TrainReport`: trainable parameters, peak RSS, tok/s, an MFU estimate, the loss
history, eval before/after as paired comparisons, the forgetting probe) and ``report.html`` (tunelab.train.page),
and prints the summary lines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tunelab.stats import PairedComparison, paired_sentence
from tunelab.train.evaluation import before_after_eval
from tunelab.train.forgetting import ForgettingProbe
from tunelab.train.loop import FitResult
from tunelab.train.results import (BeforeAfter, DataSummary, LossSummary, MfuEstimate, ParameterCount, StepMetrics,
                                   TrainReport)
from tunelab.train.session import TrainSession
from tunelab.train.throughput import flops_per_token, measured_matmul_flops, peak_rss_gb


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
           artifact: Path, kind: str, last: Path | None = None) -> TrainReport | None:
    """The report of a finished run (None on processes other than the main one): the before/after eval, then
    OUT/report.json (a TrainReport) and OUT/report.html, and the summary lines in the log."""
    run.accelerator.wait_for_everyone()
    if not run.is_main:
        return None
    from transformers import AutoConfig

    from tunelab.train import page

    stats = run.data.stats.as_dict()
    mcfg = AutoConfig.from_pretrained(str(run.model_path))
    t = run.cfg.train
    mean_len = min(max(stats["length_mean"], 1), t.pack_len) if not t.packing else \
        min(t.pack_len, stats["length_mean"] * t.micro_batch_size if t.micro_batch_size != "auto"
            else t.micro_batch_tokens)
    share = 1.0 if t.prompt_loss_weight else stats["target_share"]
    fpt = flops_per_token(mcfg, run.cfg.method, mean_len, share, t.activation_checkpointing)
    peak = measured_matmul_flops(run.device, run.autocast)
    mfu = result.tok_s * fpt / peak if peak else None
    try:
        ev = before_after_eval(run, artifact, kind, last)
    except Exception as e:  # noqa: BLE001 - the trained artifact is saved; report the eval failure, do not lose it
        run.log(f"warning: before/after eval failed: {type(e).__name__}: {e}")
        ev = BeforeAfter(error=f"{type(e).__name__}: {e}")
    losses = [h["loss"] for h in result.history]
    rep = TrainReport(
        name=run.cfg.name or run.out.name, method=run.cfg.method, base_model=run.cfg.model or "bundled",
        artifact=str(artifact), artifact_kind=kind, out=str(run.out), ema_decay=t.ema_decay,
        last_weights=str(last) if last is not None else None, parameters=ParameterCount(**params),
        data=DataSummary(path=str(run.data.path), format=run.data.format, **stats, sources=run.data.sources),
        steps=result.steps, resumed_from=result.resumed_from, processes=run.world, tokens=result.tokens,
        target_tokens=result.target_tokens, train_seconds=round(result.train_seconds, 2), tok_s=round(result.tok_s, 2),
        peak_rss_gb=round(result.peak_rss_gb, 3), peak_rss_gb_with_eval=round(peak_rss_gb(), 3),
        autocast=str(run.autocast) if run.autocast else None, device=str(run.device),
        mfu=MfuEstimate(estimate=round(mfu, 4) if mfu is not None else None, flops_per_token=round(fpt),
                        reference_flops=round(peak), reference=f"measured {run.autocast or torch.float32} 1024^3 "
                                                               "matmul on this machine at the end of the run"),
        memory=run.memory,
        loss=LossSummary(first=losses[0] if losses else None, last=losses[-1] if losses else None,
                         last10_mean=sum(losses[-10:]) / len(losses[-10:]) if losses else None),
        history=[StepMetrics(**h) for h in result.history], forgetting=probe.result(), eval=ev,
        config=run.cfg.model_dump(mode="json"), environment=env_info())
    rep.write(run.out / "report.json")
    page.write(run.out / "report.html", rep)
    first, last_loss = rep.loss.first or 0.0, rep.loss.last or 0.0
    run.log(f"done: {result.steps} steps, loss {first:.4f} -> {last_loss:.4f}, {rep.tok_s:.0f} tok/s, peak RSS "
            f"{rep.peak_rss_gb:.2f} GB; {kind}: {artifact}")
    if ev is not None and not ev.error:
        for v, c in ev.variants.items():
            if c.n:
                run.log(f"eval {v}: {_paired_text(c, 'after', 'before')}")
        for v, c in (ev.ema or {}).items():
            if c.n:
                run.log(f"eval {v}, weight average (ema_decay {t.ema_decay:g}) vs last weights: "
                        f"{_paired_text(c, 'average', 'last weights')}")
    run.log(f"report: {run.out / 'report.html'}")
    return rep


def _paired_text(c: PairedComparison, b_name: str, a_name: str) -> str:
    """``a -> b: <the comparison's sentence>``."""
    return f"{c.a.value:.1%} -> {c.b.value:.1%}: {paired_sentence(b_name, a_name, c)}"
