"""Recipe: full fine-tuning. Every weight trains (fp32 master weights, bf16 autocast); the result is a complete
HF model directory (safetensors + tokenizer + chat template + the PromptSpec used) in OUT/model.

    load base -> forgetting probe (before) -> freeze what trainable: leaves out -> fit -> OUT/model -> probe, eval, report

Continued pre-training (tunelab.train.pretrain) is this same recipe over raw-text data.

Run: ``tunelab train --method full --prompt SPEC.yaml --data FILE.jsonl --out DIR``.
"""

from __future__ import annotations

from tunelab.train.artifacts import save_last, save_model
from tunelab.train.config import TrainConfig
from tunelab.train.forgetting import ForgettingProbe
from tunelab.train.freeze import apply_trainable
from tunelab.train.loop import fit
from tunelab.train.modeling import count_parameters, load_base_model
from tunelab.train.preview import dry_run_summary, show_preview
from tunelab.train.finish import finish
from tunelab.train.results import TrainDryRun, TrainReport
from tunelab.train.session import start_session


def run(cfg: TrainConfig, *, resume: bool = False, dry_run: bool = False, force: bool = False, log=print,
        console=None) -> TrainReport | TrainDryRun | None:
    """Train (or, with ``dry_run``, only plan); the report, None on processes other than the main one."""
    r = start_session(cfg, resume=resume, dry_run=dry_run, force=force, log=log, console=console)
    show_preview(r)
    if dry_run:
        return dry_run_summary(r)
    model = load_base_model(r)
    probe = ForgettingProbe.create(r)
    probe.measure_before(r, model)
    apply_trainable(model, cfg.trainable, r.model_path, log=r.log)
    params = count_parameters(model)
    what = "continued pre-training" if cfg.method == "pretrain" else "full fine-tuning"
    r.log(f"{what}: {params['trainable']:,} trainable parameters")
    # under FSDP the probe measures the sharded model before the first step (every process; the weights as loaded)
    result = fit(r, model, on_prepared=(lambda lm: probe.measure_before(r, model, lm)) if r.fsdp else None)
    artifact = save_model(r, model)  # written by the main process (under FSDP gathered from every one)
    last = save_last(r, model, result, save_model, artifact)
    probe.measure_after(r, model, result.loss_module)
    del model
    return finish(r, result, params, probe, artifact=artifact, kind="model", last=last)
