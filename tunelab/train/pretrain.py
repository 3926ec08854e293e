"""Recipe: continued pre-training. Raw text is cut into blocks of ``data.max_seq_len`` tokens, packed into rows
(each block keeps its own positions and attention), and every token is a target. All weights train; the
result is a complete HF model directory in OUT/model, which a later LoRA run can use as its base
(``--model OUT/model``).

Run: ``tunelab train --method pretrain --data reviews.jsonl --out DIR`` (JSONL ``text`` field, .txt, or a
folder of .txt files).
"""

from __future__ import annotations

from tunelab.train import report
from tunelab.train.config import TrainConfig
from tunelab.train.full import save_model
from tunelab.train.loop import fit, load_base_model, save_last, start_run


def run(cfg: TrainConfig, *, resume: bool = False, dry_run: bool = False, log=print, console=None) -> dict:
    r = start_run(cfg, resume=resume, dry_run=dry_run, log=log, console=console)
    report.show_preview(r)
    if dry_run:
        return report.dry_run_summary(r)
    model = load_base_model(r)
    probe = report.ForgettingProbe.create(r)
    probe.measure_before(r, model)
    params = report.parameter_summary(model)
    result = fit(r, model)
    artifact = save_model(r, model) if r.is_main else r.out / "model"
    last = save_last(r, model, result, save_model, artifact)
    probe.measure_after(r, model)
    del model
    return report.finish(r, result, params, probe, artifact=artifact, kind="model", last=last)
