"""Recipe: full fine-tuning. Every weight trains (fp32 master weights, bf16 autocast); the result is a complete
HF model directory (safetensors + tokenizer + chat template + the PromptSpec used) in OUT/model.

    load base -> forgetting probe (before) -> fit -> OUT/model -> probe, eval, report

Continued pre-training (tunelab.train.pretrain) is this same recipe over raw-text data.

Run: ``tunelab train --method full --prompt SPEC.yaml --data FILE.jsonl --out DIR``.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.train import report
from tunelab.train.config import TrainConfig
from tunelab.train.loop import fit, save_last
from tunelab.train.modeling import load_base_model
from tunelab.train.session import TrainSession, start_session


def save_model(run: TrainSession, model, target: Path | None = None) -> Path:
    """A complete HF model directory that `tunelab eval --model DIR` and every HF tool load."""
    target = target or run.out / "model"
    target.mkdir(parents=True, exist_ok=True)
    unwrapped = run.accelerator.unwrap_model(model)
    unwrapped.config.use_cache = True
    unwrapped.save_pretrained(str(target), safe_serialization=True)
    run.tokenizer.save_pretrained(str(target))
    report.write_inference_files(run, target)
    return target


def run(cfg: TrainConfig, *, resume: bool = False, dry_run: bool = False, log=print, console=None) -> dict:
    r = start_session(cfg, resume=resume, dry_run=dry_run, log=log, console=console)
    report.show_preview(r)
    if dry_run:
        return report.dry_run_summary(r)
    model = load_base_model(r)
    probe = report.ForgettingProbe.create(r)
    probe.measure_before(r, model)
    params = report.parameter_summary(model)
    what = "continued pre-training" if cfg.method == "pretrain" else "full fine-tuning"
    r.log(f"{what}: {params['trainable']:,} trainable parameters")
    result = fit(r, model)
    artifact = save_model(r, model) if r.is_main else r.out / "model"
    last = save_last(r, model, result, save_model, artifact)
    probe.measure_after(r, model)
    del model
    return report.finish(r, result, params, probe, artifact=artifact, kind="model", last=last)
