"""The results of a training run: one row of ``metrics.jsonl`` per optimizer step, and ``report.json`` (what was
trained, how fast, the loss, the forgetting probe and the before/after eval). A run writes them; the train page,
`tunelab run`'s train stage and the CLI read them, all through these models.

Schema 2 (tunelab 0.1 wrote schema 1, without the field): the before/after comparisons are
:class:`tunelab.stats.PairedComparison` (``a`` = before, ``b`` = after; were ``before``/``after`` floats with
``*_ci`` pairs, a normal-approximation ``diff_ci`` and ``mcnemar_p``). Older files are upgraded on read.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from tunelab.results import Result, Versioned
from tunelab.stats import PairedComparison

__all__ = ["StepMetrics", "ParameterCount", "DataSummary", "MfuEstimate", "MemoryEstimate", "LossSummary", "ForgettingResult",
           "BeforeAfter", "TrainReport", "TrainDryRun"]


class StepMetrics(Result):
    """One optimizer step (a line of metrics.jsonl)."""

    step: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float | None = None
    tokens: int
    targets: int
    tok_s: float
    elapsed_s: float
    prompt_loss: float | None = None


class ParameterCount(Result):
    total: int
    trainable: int
    trainable_share: float


class DataSummary(Result):
    """The training data after tokenisation: counts and lengths in tokens (``sources``: one entry per file when
    several are mixed)."""

    path: str
    format: str
    examples: int
    tokens: int
    target_tokens: int
    target_share: float
    dropped_too_long: int
    length_mean: float
    length_p50: int
    length_p95: int
    length_max: int
    sources: list[dict[str, Any]] = Field(default_factory=list)


class MfuEstimate(Result):
    estimate: float | None
    flops_per_token: int
    reference_flops: int
    reference: str


class MemoryEstimate(Result):
    """The run's peak memory estimated before loading (tunelab.train.memory), in GiB: ``total_gb`` = the larger of
    training (weights + grads + optimizer + the larger of weight casts + activations and the optimizer step's
    temporaries) and loading, + the runtime. ``device``: where
    it is counted (GPU memory on cuda, process memory on cpu); ``offloaded_gb``: what optim.offload keeps in CPU
    memory instead."""

    total_gb: float
    tensors_gb: float
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    optimizer_step_gb: float = 0.0
    weight_casts_gb: float
    activations_gb: float
    load_gb: float
    runtime_gb: float
    offloaded_gb: float = 0.0
    parameters: int
    trained_parameters: int
    micro_batch_tokens: int
    device: str
    budget_gb: float | None = None


class LossSummary(Result):
    first: float | None = None
    last: float | None = None
    last10_mean: float | None = None


class ForgettingResult(Result):
    """Perplexity on general text the task does not train, before and (when measured) after training."""

    data: str
    examples: int
    target_tokens: int
    nll_before: float
    perplexity_before: float
    nll_after: float | None = None
    perplexity_after: float | None = None
    perplexity_change_pct: float | None = None


class BeforeAfter(Result):
    """The same eval on the base model (a) and the trained one (b), per prompt variant; with a weight average also
    the last weights (a) against the average (b) in ``ema``. ``error`` says why the eval could not run (the trained
    artifact is saved regardless)."""

    config: str | None = None
    items: int | None = None
    metric: str | None = None
    wall_s: float | None = None
    variants: dict[str, PairedComparison] = Field(default_factory=dict)
    ema: dict[str, PairedComparison] | None = None
    error: str | None = None


class TrainReport(Versioned):
    """report.json of a training run."""

    SCHEMA: ClassVar[int] = 2

    name: str
    method: str
    base_model: str
    artifact: str
    artifact_kind: str
    out: str
    ema_decay: float | None = None
    last_weights: str | None = None
    parameters: ParameterCount
    data: DataSummary
    steps: int
    resumed_from: int | None = None
    processes: int
    tokens: int
    target_tokens: int
    train_seconds: float
    tok_s: float
    peak_rss_gb: float
    peak_rss_gb_with_eval: float
    autocast: str | None = None
    device: str
    mfu: MfuEstimate
    memory: MemoryEstimate | None = None
    loss: LossSummary
    history: list[StepMetrics]
    forgetting: ForgettingResult | None = None
    eval: BeforeAfter | None = None
    config: dict[str, Any]
    environment: dict[str, Any]

    @classmethod
    def upgrade(cls, data: dict[str, Any], found: int) -> dict[str, Any]:
        ev = data.get("eval")
        if isinstance(ev, dict):
            for key in ("variants", "ema"):
                if isinstance(ev.get(key), dict):
                    ev[key] = {v: _before_after_v1(c) for v, c in ev[key].items()}
        return data


def _before_after_v1(c: dict[str, Any]) -> dict[str, Any]:
    if "before" not in c:
        return c
    iv = lambda v, ci: {"value": v, "low": ci[0], "high": ci[1]}  # noqa: E731
    return {"n": c["n"], "a": iv(c["before"], c["before_ci"]), "b": iv(c["after"], c["after_ci"]),
            "diff": iv(c["diff"], c["diff_ci"]), "gained": c["gained"], "lost": c["lost"], "p_value": c["mcnemar_p"],
            "significant": c["significant"]}


class TrainDryRun(Result):
    """What `tunelab train --dry-run` prints: the plan and the first example, nothing trained."""

    dry_run: bool = True
    method: str
    model: str
    data: dict[str, Any]
    format: str
    steps: int
    steps_per_epoch: int
    warmup_steps: int
    memory: MemoryEstimate | None = None
    attention: str | None = None  # train.attention as resolved for the device
    compile: bool | None = None   # train.compile as resolved
    first_example: dict[str, Any]
