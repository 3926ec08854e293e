"""The results of `tunelab generate`: ``stats.json`` (what was kept and dropped and why, requests, tokens, cost,
latency, contamination) and the dry-run estimate. The runner writes them; the CLI, `tunelab run`'s generate stage
and the teacher-vs-gold comparison read them, all through these models.

Schema 2 (tunelab 0.1 wrote schema 1, without the field): the pipeline-specific sections (``items``,
``samples_per_item``, ``agreement_with_gold``, ``teacher_accuracy``, the self-instruct counts, ``batch_ingested``,
``batch_input``) are always present, null where they do not apply.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from tunelab.results import Result, Versioned
from tunelab.stats import Interval

__all__ = ["TeacherInfo", "DropCounts", "RequestCounts", "TokenCounts", "Latency", "Agreement", "Accuracy",
           "LabelAgreement", "ConfidenceSummary", "BalanceCounts", "TeacherLabels", "GenerateStats", "GenerateDryRun"]


class TeacherInfo(Result):
    model: str
    endpoint: str
    price_per_1m: dict[str, float] | None = None


class DropCounts(Result):
    total: int
    by_reason: dict[str, int]
    examples: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)


class RequestCounts(Result):
    answers_used: int
    from_journal: int
    from_cache: int
    fetched: int
    failed: dict[str, int]
    http_sent: int
    retries: dict[str, int]
    repairs_asked: int
    repairs_ok: int


class TokenCounts(Result):
    prompt: int
    completion: int
    all_answers_prompt: int
    all_answers_completion: int


class Latency(Result):
    n: int
    mean: float | None = None
    p50: float | None = None
    p95: float | None = None
    max: float | None = None


class Agreement(Result):
    """How often the teacher's label matched the gold label an input carried."""

    n: int
    agree: int
    rate: float


class Accuracy(Result):
    """How often the teacher's answer matched the gold answer an input carried."""

    n: int
    correct: int
    rate: float


class LabelAgreement(Result):
    """A teacher's labels against gold labels of the same texts: accuracy (Wilson interval), Cohen's kappa (agreement
    beyond what the two label distributions give by chance, ``expected_agreement``) and the confusion matrix (rows:
    gold label, columns: the teacher's)."""

    n: int
    agree: int
    accuracy: Interval
    kappa: float
    expected_agreement: float
    labels: list[str]
    matrix: list[list[int]]


class ConfidenceSummary(Result):
    """Label confidences (tunelab.generate.confidence): how many, how many null (no logprobs), the mean, quantiles
    (min, p10, p25, p50, p75, p90, max) and a histogram of ten 0.1-wide bins; ``methods`` counts how each was
    computed (top_logprobs, sequence, votes)."""

    n: int
    null: int
    mean: float | None = None
    quantiles: dict[str, float] | None = None
    histogram: dict[str, list[float]]
    methods: dict[str, int]


class BalanceCounts(Result):
    """``quality.balance: equal``: rows per label before and after balancing (``target`` each)."""

    target: int
    before: dict[str, int]
    after: dict[str, int]


class TeacherLabels(Result):
    """The label pipeline's teacher labels: of the ``inputs``, ``labelled`` got a label in the set; ``kept`` of them
    passed every gate (min_confidence, dedup, contamination, balance); ``keep_rate`` = kept / inputs. With gold labels,
    the teacher's agreement with them over all labelled inputs and over the kept rows (the accuracy of the training
    labels)."""

    inputs: int
    labelled: int
    kept: int
    keep_rate: float
    min_confidence: float | None = None
    balance: str = "none"
    logprobs_requested: bool
    confidence: ConfidenceSummary       # all labelled inputs
    confidence_kept: ConfidenceSummary  # the kept rows
    per_label: dict[str, int]           # kept rows per label
    balance_counts: BalanceCounts | None = None
    agreement_all: Agreement | None = None
    agreement_kept: Agreement | None = None
    warning: str | None = None


class GenerateStats(Versioned):
    SCHEMA: ClassVar[int] = 2

    name: str
    pipeline: str
    config: str
    tunelab: str
    teacher: TeacherInfo
    sampling: dict[str, Any]
    inputs: int | None = None
    excluded_inputs: int | None = None       # label, respond: skipped as in data.exclude
    kept: int
    dropped: DropCounts
    pending: int
    stopped: str | None = None
    requests: RequestCounts
    tokens: TokenCounts
    cost_usd: float | None = None
    budget: dict[str, Any]
    latency_ms: Latency
    wall_s: float
    items: int | None = None                  # label, respond
    samples_per_item: int | None = None       # respond
    agreement_with_gold: Agreement | None = None  # label, kept rows with a gold label
    teacher_labels: TeacherLabels | None = None   # label: confidence, threshold, balance, agreement all vs kept
    teacher_accuracy: Accuracy | None = None      # respond, inputs with a gold answer
    seed_tasks: int | None = None             # self-instruct
    rounds: int | None = None
    candidates: int | None = None
    target: int | None = None
    reached_target: bool | None = None
    contamination: dict[str, Any] | None = None
    outputs: dict[str, str]
    batch_ingested: dict[str, int] | None = None
    batch_input: list[str] | None = None

    @property
    def data_path(self) -> str:
        return self.outputs["data"]


class GenerateDryRun(Result):
    """What a run would send (`tunelab generate --dry-run`): nothing is sent and nothing is written."""

    dry_run: bool = True
    pipeline: str
    teacher: str
    endpoint: str
    requests_to_send: int
    already_done: int
    prompt_tokens_est: int
    max_completion_tokens: int
    max_cost_usd: float | None = None
    note: str | None = None
