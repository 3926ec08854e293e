"""The results of an eval: one row per item, sample and cell (``results.jsonl``) and the summary of every cell
(``summary.json``). The eval runner writes them, and the eval report, `tunelab run`, the before/after eval of
training and the CLI table read them, all through these models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Iterable

from pydantic import Field

from tunelab.data.io import read_jsonl, write_jsonl
from tunelab.results import Result, Versioned
from tunelab.stats import Interval, verdict

__all__ = ["EvalRow", "CellStats", "Cell", "CellComparison", "Best", "EvalSummary", "Confusion", "LabelScores",
           "TokenStats", "LatencyStats", "DryRunPlan", "read_rows", "write_rows"]


# --------------------------------------------------------------------------------------------------
# one row: an item answered by one cell (variant x model), one sample
# --------------------------------------------------------------------------------------------------
class EvalRow(Result):
    """One answer. ``correct`` is None without a gold answer; ``scores`` (label -> log-probability) only when the
    labels were scored (``loglik``); ``parse_error``/``finish_reason`` only when the answer was generated;
    ``json_parsed`` only for json tasks."""

    variant: str
    model: str
    dataset: str
    item_id: str
    input: Any = None
    gold: Any = None
    prompt_hash: str = ""
    sample: int = 0
    raw_output: str | None = None
    prediction: Any = None
    correct: bool | None = None
    complied: bool = False
    scores: dict[str, float] | None = None
    parse_error: str | None = None
    finish_reason: str | None = None
    json_parsed: bool | None = None
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0

    @property
    def cell(self) -> tuple[str, str]:
        return (self.variant, self.model)


def read_rows(path: str | os.PathLike) -> list[EvalRow]:
    """The rows of a results.jsonl ([] when the file does not exist)."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for r in read_jsonl(p):
        line = r.pop("_line", None)
        try:
            out.append(EvalRow.model_validate(r))
        except ValueError as e:
            from tunelab.errors import DataError

            raise DataError(f"not an eval result row ({str(e).splitlines()[1].strip()})", where=f"{p}:{line}") \
                from None
    return out


def write_rows(path: str | os.PathLike, rows: Iterable[EvalRow]) -> None:
    write_jsonl(path, (r.model_dump(mode="json") for r in rows))


# --------------------------------------------------------------------------------------------------
# one cell's statistics
# --------------------------------------------------------------------------------------------------
class Confusion(Result):
    """Rows: gold label; columns: predicted label, the last one ``(invalid)``."""

    labels: list[str]
    matrix: list[list[int]]


class LabelScores(Result):
    precision: float
    recall: float
    f1: float
    support: int


class TokenStats(Result):
    prompt_mean: float
    completion_mean: float
    prompt_total: int
    completion_total: int


class LatencyStats(Result):
    mean: float
    p50: float
    p95: float
    measured: int


class CellComparison(Result):
    """A cell against the best cell of the eval on ``metric``'s outcome per item: ``diff`` = this cell's metric
    minus the best's (<= 0), exact McNemar on the items both scored (``lost``: the best right and this cell wrong,
    ``gained``: the reverse), Holm over every comparison of the eval. The best cell has ``vs`` None."""

    vs: str | None
    diff: float
    p_value: float
    p_holm: float
    significant: bool
    lost: int
    gained: int
    n: int

    @property
    def p(self) -> float:
        return self.p_holm

    @property
    def verdict(self) -> str:
        return verdict(self.diff, self.significant)


class CellStats(Result):
    """Every metric of one cell with its interval (``metrics``: accuracy, macro_f1, compliance, json_valid,
    schema_valid, whichever apply), and what answering cost."""

    n_items: int
    n_samples: int
    metrics: dict[str, Interval]
    pass_rate: dict[str, float] | None = None
    flaky_items: int | None = None
    confusion: Confusion | None = None
    per_label: dict[str, LabelScores] | None = None
    tokens: TokenStats
    latency_ms: LatencyStats
    cached: int = 0


class Cell(CellStats):
    """One variant x model of an eval."""

    variant: str
    model: str
    mode: str
    spec_hash: str
    wall_s: float
    prompt_preview: str | None = None
    comparison: CellComparison | None = None

    @property
    def key(self) -> str:
        return f"{self.variant} @ {self.model}"


class Best(Result):
    variant: str
    model: str
    metric: str
    value: float


class EvalSummary(Versioned):
    """summary.json of an eval. Schema 2 (tunelab 0.1 wrote schema 1, without this field): the comparison to the
    best cell names its discordant counts ``lost``/``gained``/``n`` (were ``b``/``c``/``n_paired``)."""

    SCHEMA: ClassVar[int] = 2

    title: str
    description: str | None = None
    created: str
    dataset: str
    dataset_path: str
    n_items: int
    task: str
    labels: list[str] | None = None
    metric: str
    cells: list[Cell]
    best: Best | None = None
    notes: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    environment: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def upgrade(cls, data: dict[str, Any], found: int) -> dict[str, Any]:
        for c in data.get("cells") or []:
            comp = c.get("comparison")
            if isinstance(comp, dict) and "b" in comp:
                comp["lost"], comp["gained"], comp["n"] = comp.pop("b"), comp.pop("c"), comp.pop("n_paired")
        return data

    def is_best(self, cell: Cell) -> bool:
        return self.best is not None and (cell.variant, cell.model) == (self.best.variant, self.best.model)

    def cell_verdict(self, cell: Cell) -> str:
        if self.is_best(cell):
            return "best"
        return cell.comparison.verdict if cell.comparison is not None else "-"

    @property
    def best_cell(self) -> Cell | None:
        return next((c for c in self.cells if self.is_best(c)), None)

    @property
    def confidence(self) -> float:
        return float(self.config.get("confidence", 0.95))


class DryRunPlan(Result):
    """What one cell would cost, before anything runs (`tunelab eval --dry-run`)."""

    variant: str
    model: str
    mode: str
    items: int
    samples: int
    prompt_tokens: int
    max_output_tokens: int
    cost_usd: float | None = None
