"""The results of `tunelab run`: the state of every stage (``run.json``), each stage's small result, the eval of the
tuned models (``eval_after/summary.json``) and the run's headline (``summary.json``). The stages write them, and
the summary, the report, `tunelab compare` and tracking read them, all through these models.

Schema 2 (tunelab 0.1 wrote schema 1, without the field): paired comparisons are
:class:`tunelab.stats.PairedComparison` (intervals as ``{value, low, high}``; were ``a``/``b_acc`` floats and
``diff``/``diff_low``/``diff_high``), each stage result names its stage (``stage``), and the eval_after result keeps
its methods under ``methods``. Older files are upgraded on read.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Field

from tunelab.evaluate.results import TokenStats
from tunelab.generate.results import LabelAgreement
from tunelab.results import Result, Versioned
from tunelab.stats import Interval, PairedComparison, proportion
from tunelab.train.results import ForgettingResult

__all__ = ["VsBaseline", "PairComparison", "StageCost", "EvalStageResult", "GenerateStageResult", "VocabStageResult", "TrainStageResult",
           "MethodHeadline", "EvalAfterStageResult", "ServeAnswer", "SmokeTest", "ServeStageResult", "StageResult",
           "StageRecord", "RunState", "MethodEval", "EvalAfterSummary", "StageBrief", "DatasetInfo", "PromptRow",
           "BestPrompt", "MethodRow", "RunVerdict", "StageCostRow", "RunCost", "RunSummary"]


class VsBaseline(PairedComparison):
    """A tuned model (B) against a baseline (A) named by ``baseline``."""

    baseline: str


class PairComparison(VsBaseline):
    """One tuned model (``model``, B) against another (``baseline``, A) on the same items (eval_after.compare)."""

    model: str


# --------------------------------------------------------------------------------------------------
# run.json: one record per stage
# --------------------------------------------------------------------------------------------------
class StageCost(Result):
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    tokens: int = 0
    teacher_usd: float | None = None


class EvalStageResult(Result):
    stage: Literal["eval"] = "eval"
    best: str | None
    n_items: int
    task: str
    accuracy: dict[str, Interval | None]


class GenerateStageResult(Result):
    stage: Literal["generate"] = "generate"
    data: str
    kept: int | None = None
    dropped: int | None = None
    teacher: str | None = None
    cost_usd: float | None = None
    agreement: LabelAgreement | None = None  # generate.inputs: train: the kept labels against the withheld gold


class VocabStageResult(Result):
    """The vocab stage: the extended model and its tokens per text before and after."""

    stage: Literal["vocab"] = "vocab"
    model: str
    added: int
    vocab_size: int
    tokens_per_text_before: float
    tokens_per_text_after: float
    texts: int
    seconds: float


class TrainStageResult(Result):
    stage: Literal["train"] = "train"
    method: str
    artifact: str
    kind: Literal["adapter", "model"]
    base_model: str | None = None  # what it started from: the experiment's model, the vocab stage's, an earlier one's
    prompt: str | None
    prompt_hash: str | None
    data: str
    examples: int | None = None
    steps: int
    resumed_from: int | None = None
    tokens: int = 0
    train_seconds: float | None = None
    tok_s: float | None = None
    peak_rss_gb: float | None = None
    trainable: int | None = None
    total_params: int | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    lr: float
    epochs: float
    lora_r: int | None = None
    forgetting: ForgettingResult | None = None

    def started_from(self, experiment_model: str) -> str:
        """The model its artifact belongs on (an adapter's base): what it started from, the experiment's model for
        a result written before ``base_model`` was recorded."""
        return self.base_model or experiment_model


class MethodHeadline(Result):
    accuracy: Interval | None = None
    vs_best: VsBaseline


class EvalAfterStageResult(Result):
    stage: Literal["eval_after"] = "eval_after"
    methods: dict[str, MethodHeadline]
    pairs: list[PairComparison] = Field(default_factory=list)


class ServeAnswer(Result):
    model: str
    answer: str | None
    finish_reason: str | None = None
    completion_tokens: int | None = None
    latency_s: float


class SmokeTest(Result):
    ok: bool
    served_models: list[str]
    prompt: str
    item_id: str
    gold: Any = None
    answers: list[ServeAnswer]


class ServeStageResult(Result):
    stage: Literal["serve"] = "serve"
    mode: Literal["smoke", "command"]
    commands: list[str]
    smoke: SmokeTest | None = None


StageResult = Annotated[Union[EvalStageResult, GenerateStageResult, VocabStageResult, TrainStageResult,
                              EvalAfterStageResult, ServeStageResult], Field(discriminator="stage")]


class StageRecord(Result):
    """A stage's entry in run.json: where it stands, what this invocation did, what its result depends on."""

    status: Literal["running", "done", "interrupted", "failed"]
    hash: str
    started: str | None = None
    finished: str | None = None
    action: Literal["ran", "resumed", "cached", "skipped"] | None = None
    output_hash: str | None = None
    result: StageResult | None = None
    cost: StageCost | None = None
    error: str | None = None


class RunState(Versioned):
    """run.json, rewritten atomically after every change."""

    SCHEMA: ClassVar[int] = 2

    name: str | None = None
    experiment: str | None = None
    tunelab: str | None = None
    created: str | None = None
    updated: str | None = None
    limit: int | None = None
    invocations: int = 0
    stage_order: list[str] = Field(default_factory=list)
    stages: dict[str, StageRecord] = Field(default_factory=dict)

    @classmethod
    def upgrade(cls, data: dict[str, Any], found: int) -> dict[str, Any]:
        for key, rec in (data.get("stages") or {}).items():
            res = rec.get("result") if isinstance(rec, dict) else None
            if not isinstance(res, dict) or "stage" in res:
                continue
            kind = key.split("/")[0]
            if kind == "eval_after":
                res = {"methods": {n: {**m, "vs_best": paired_v1(m.get("vs_best") or {})} for n, m in res.items()}}
            rec["result"] = {"stage": kind, **res}
        return data


# --------------------------------------------------------------------------------------------------
# eval_after/summary.json: the tuned models on the eval items
# --------------------------------------------------------------------------------------------------
class MethodEval(Result):
    method: str
    prompt: str
    prompt_hash: str
    artifact: str
    metrics: dict[str, Interval]
    n_items: int
    tokens: TokenStats
    vs_best: VsBaseline
    vs_before: VsBaseline


class EvalAfterSummary(Versioned):
    SCHEMA: ClassVar[int] = 2

    best_prompt: str
    confidence: float
    methods: dict[str, MethodEval]
    pairs: list[PairComparison] = Field(default_factory=list)

    @classmethod
    def upgrade(cls, data: dict[str, Any], found: int) -> dict[str, Any]:
        for m in (data.get("methods") or {}).values():
            for k in ("vs_best", "vs_before"):
                if isinstance(m.get(k), dict):
                    m[k] = paired_v1(m[k], 1 - float(data.get("confidence", 0.95)))
        return data


# --------------------------------------------------------------------------------------------------
# summary.json: the run's headline
# --------------------------------------------------------------------------------------------------
class StageBrief(Result):
    status: str | None = None
    action: str | None = None
    hash: str | None = None


class DatasetInfo(Result):
    name: str
    path: str
    n_items: int
    task: str
    labels: list[str] | None = None


class PromptRow(Result):
    """One prompt on the base model against the best one (the eval stage's cells)."""

    variant: str
    mode: str
    accuracy: Interval | None = None
    macro_f1: Interval | None = None
    compliance: Interval | None = None
    prompt_tokens_mean: float
    completion_tokens_mean: float
    ms_per_item: float
    spec_hash: str | None = None
    diff_vs_best: float | None = None
    p_value: float | None = None
    p_holm: float | None = None
    significant: bool | None = None
    verdict: str
    is_best: bool


class BestPrompt(Result):
    variant: str
    accuracy: Interval | None = None


class MethodRow(Result):
    """One tuned model: how it trained, and how it scored against the best prompt and the base model."""

    name: str
    method: str | None = None
    train: TrainStageResult | None = None
    prompt: str | None = None
    accuracy: Interval | None = None
    macro_f1: Interval | None = None
    compliance: Interval | None = None
    vs_best: VsBaseline | None = None
    vs_before: VsBaseline | None = None
    sentence: str | None = None

    @property
    def evaluated(self) -> bool:
        return self.vs_best is not None and self.vs_best.n > 0

    @property
    def verdict(self) -> str:
        return self.vs_best.verdict if self.evaluated else "not evaluated"


class RunVerdict(Result):
    text: str
    tuning_wins: bool | None = None
    tuning_loses: bool | None = None
    best_method: str | None = None
    diff: float | None = None
    train_wall_s: float | None = None


class StageCostRow(Result):
    stage: str
    status: str | None = None
    action: str | None = None
    wall_s: float | None = None
    tokens: int | None = None
    peak_rss_mb: float | None = None
    teacher_usd: float | None = None


class RunCost(Result):
    stages: list[StageCostRow]
    total_wall_s: float
    total_tokens: int
    peak_rss_mb: float
    teacher_usd: float | None = None
    train_wall_s: float


class RunSummary(Versioned):
    SCHEMA: ClassVar[int] = 2

    name: str
    description: str | None = None
    created: str
    experiment: str
    model: str
    limit: int | None = None
    metric: str = "accuracy"
    stages: dict[str, StageBrief] = Field(default_factory=dict)
    dataset: DatasetInfo | None = None
    prompts: list[PromptRow] | None = None
    best_prompt: BestPrompt | None = None
    methods: list[MethodRow] = Field(default_factory=list)
    pairs: list[PairComparison] = Field(default_factory=list)  # eval_after.compare: tuned models head to head
    teacher: GenerateStageResult | None = None                  # the generate stage (agreement with gold, if scored)
    verdict: RunVerdict
    cost: RunCost
    serve: ServeStageResult | None = None

    @classmethod
    def upgrade(cls, data: dict[str, Any], found: int) -> dict[str, Any]:
        for m in data.get("methods") or []:
            for k in ("vs_best", "vs_before"):
                if isinstance(m.get(k), dict):
                    m[k] = paired_v1(m[k])
            if isinstance(m.get("train"), dict):
                m["train"] = {"stage": "train", **m["train"]}
        if isinstance(data.get("serve"), dict):
            data["serve"] = {"stage": "serve", **data["serve"]}
        return data


def paired_v1(d: dict[str, Any], alpha: float = 0.05) -> dict[str, Any]:
    """A schema-1 paired comparison of `tunelab run` ({n, a, b_acc, diff, diff_low, diff_high, p_value, p_holm,
    significant, lost, gained[, baseline]}) in the PairedComparison shape; the accuracies' Wilson intervals are
    recomputed from the rates and n."""
    if "diff_low" not in d:
        return d
    n = int(d.get("n") or 0)
    out: dict[str, Any] = {"n": n, "gained": d.get("gained", 0), "lost": d.get("lost", 0),
                           "p_value": d.get("p_value", 1.0), "p_holm": d.get("p_holm"), "alpha": round(alpha, 10),
                           "significant": bool(d.get("significant"))}
    if "baseline" in d:
        out["baseline"] = d["baseline"]
    if n:
        out["a"] = proportion(round(d["a"] * n), n).model_dump()
        out["b"] = proportion(round(d["b_acc"] * n), n).model_dump()
        out["diff"] = {"value": d["diff"], "low": d["diff_low"], "high": d["diff_high"]}
    return out
