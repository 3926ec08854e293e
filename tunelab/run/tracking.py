"""Optional experiment tracking: the run's headline numbers and loss curves to MLflow and/or TensorBoard,
when those packages are installed (``tracking: [mlflow, tensorboard]`` in the experiment). A tracker that is
not installed is skipped with one line in the run log; tunelab never installs or requires one."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

from tunelab.run.results import RunSummary
from tunelab.run.util import read_jsonl


def _metrics(summary: RunSummary) -> dict[str, float]:
    m: dict[str, float] = {}
    for p in summary.prompts or []:
        if p.accuracy:
            m[f"prompt/{p.variant}/accuracy"] = p.accuracy.value
    for x in summary.methods:
        if x.accuracy:
            m[f"tuned/{x.name}/accuracy"] = x.accuracy.value
        if x.evaluated:
            m[f"tuned/{x.name}/diff_vs_best"] = x.vs_best.diff.value
            m[f"tuned/{x.name}/p_vs_best"] = x.vs_best.p_value
    for c in summary.cost.stages:
        if c.wall_s is not None:
            m[f"cost/{c.stage}/wall_s"] = c.wall_s
    return m


def _losses(out: Path, summary: RunSummary) -> dict[str, list[dict]]:
    return {x.name: read_jsonl(out / "train" / x.name / "metrics.jsonl") for x in summary.methods}


def log_tracking(trackers: list[str], out: Path, summary: RunSummary, log: Callable[[str], None]) -> None:
    for t in trackers:
        try:
            if t == "mlflow":
                if importlib.util.find_spec("mlflow") is None:
                    log("tracking: mlflow is not installed; skipped")
                    continue
                _mlflow(out, summary)
                log("tracking: logged to mlflow")
            elif t == "tensorboard":
                if importlib.util.find_spec("tensorboard") is None:
                    log("tracking: tensorboard is not installed; skipped")
                    continue
                _tensorboard(out, summary)
                log(f"tracking: TensorBoard events in {out / 'tensorboard'}")
        except Exception as e:  # noqa: BLE001 - tracking must never fail a finished run
            log(f"tracking: {t} failed ({type(e).__name__}: {e}); the run itself is complete")


def _mlflow(out: Path, summary: RunSummary) -> None:
    import mlflow

    mlflow.set_experiment(summary.name)
    with mlflow.start_run(run_name=out.name):
        params: dict[str, Any] = {"model": summary.model, "limit": summary.limit}
        for x in summary.methods:
            for k in ("lr", "epochs", "lora_r", "method"):
                params[f"{x.name}.{k}"] = getattr(x.train, k) if x.train else None
        mlflow.log_params({k: str(v) for k, v in params.items()})
        mlflow.log_metrics(_metrics(summary))
        for name, hist in _losses(out, summary).items():
            for h in hist:
                mlflow.log_metric(f"train/{name}/loss", h["loss"], step=h["step"])
        for f in ("summary.json", "report.html"):
            if (out / f).is_file():
                mlflow.log_artifact(str(out / f))


def _tensorboard(out: Path, summary: RunSummary) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(out / "tensorboard"))
    try:
        for k, v in _metrics(summary).items():
            w.add_scalar(k, v, 0)
        for name, hist in _losses(out, summary).items():
            for h in hist:
                w.add_scalar(f"train/{name}/loss", h["loss"], h["step"])
    finally:
        w.close()
