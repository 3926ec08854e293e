"""Metrics over the per-item result rows (:class:`~tunelab.evaluate.results.EvalRow`) of one eval cell (one
variant x model x dataset), and the comparison of every cell to the best one.

A row's ``sample`` is 0..N-1 with repeated sampling; ``correct`` is None without gold. The cell's numbers are a
:class:`~tunelab.evaluate.results.CellStats`, each comparison a :class:`~tunelab.evaluate.results.CellComparison`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Sequence

import numpy as np

from tunelab.evaluate.results import (CellComparison, CellStats, Confusion, EvalRow, LabelScores, LatencyStats,
                                      TokenStats)
from tunelab.stats import Interval, bootstrap_ci, holm_adjust, mcnemar_exact, proportion

__all__ = ["INVALID", "confusion_matrix", "macro_f1", "per_label_scores", "summarize_cell", "compare_to_best"]

INVALID = "(invalid)"  # confusion-matrix column for predictions outside the label set (or none at all)
COMPARABLE = ("accuracy", "macro_f1", "compliance", "json_valid", "schema_valid")


# --------------------------------------------------------------------------------------------------
# label metrics
# --------------------------------------------------------------------------------------------------
def _codes(values: Iterable[Any], labels: Sequence[str]) -> np.ndarray:
    """Label -> index in ``labels``; None or anything outside the set -> len(labels) (invalid)."""
    index = {lab: i for i, lab in enumerate(labels)}
    return np.array([index.get(str(v), len(labels)) if v is not None else len(labels) for v in values],
                    dtype=np.int64)


def _label_counts(g: np.ndarray, p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tp, fp, fn per label, each of shape (B, k), for code arrays g, p of shape (B, n)."""
    ks = np.arange(k)[:, None, None]  # (k, 1, 1)
    gk, pk = g[None] == ks, p[None] == ks  # (k, B, n)
    tp = (gk & pk).sum(-1).T
    fp = (~gk & pk).sum(-1).T
    fn = (gk & ~pk).sum(-1).T
    return tp, fp, fn


def _macro_f1_codes(g: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    """Batched macro-F1 over code arrays of shape (B, n, ...) -> (B,). See :func:`macro_f1`."""
    g, p = g.reshape(g.shape[0], -1), p.reshape(p.shape[0], -1)
    tp, fp, fn = _label_counts(g, p, k)
    denom = 2 * tp + fp + fn  # F1 = 2tp / (2tp + fp + fn)
    present = denom > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros(denom.shape, dtype=float), where=present)
    n_present = present.sum(1)
    return np.divide(f1.sum(1), n_present, out=np.zeros(len(f1)), where=n_present > 0)


def _gold_pairs(gold: Sequence[Any], pred: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    if len(gold) != len(pred):
        raise ValueError(f"gold and pred must have the same length, got {len(gold)} and {len(pred)}")
    pairs = [(g, p) for g, p in zip(gold, pred) if g is not None]
    return [g for g, _ in pairs], [p for _, p in pairs]


def macro_f1(gold: Sequence[Any], pred: Sequence[Any], labels: Sequence[str]) -> float:
    """Unweighted mean over labels of F1 = 2·tp / (2·tp + fp + fn).

    Averaged over the labels that occur in gold or in the predictions (a label that is neither has no
    defined F1). Predictions outside ``labels`` (or None) count as wrong: a false negative for the gold
    label, a false positive for none. Items with gold None are skipped.
    """
    g, p = _gold_pairs(gold, pred)
    if not g:
        return 0.0
    return float(_macro_f1_codes(_codes(g, labels)[None], _codes(p, labels)[None], len(labels))[0])


def confusion_matrix(gold: Sequence[Any], pred: Sequence[Any], labels: Sequence[str]) -> list[list[int]]:
    """Counts with rows = gold label (``labels``), columns = predicted label (``labels`` + ``(invalid)``).

    Shape len(labels) x (len(labels) + 1): the last column counts predictions that are None or outside
    the label set. Items whose gold is None or outside the set are skipped.
    """
    g, p = _gold_pairs(gold, pred)
    k = len(labels)
    gc, pc = _codes(g, labels), _codes(p, labels)
    keep = gc < k
    m = np.zeros((k, k + 1), dtype=np.int64)
    np.add.at(m, (gc[keep], pc[keep]), 1)
    return m.tolist()


def per_label_scores(gold: Sequence[Any], pred: Sequence[Any], labels: Sequence[str]) -> dict[str, dict]:
    """Precision, recall, F1 and support (gold count) per label; 0.0 where a ratio is undefined."""
    g, p = _gold_pairs(gold, pred)
    tp, fp, fn = (x[0] for x in _label_counts(_codes(g, labels)[None], _codes(p, labels)[None], len(labels)))
    out = {}
    for i, lab in enumerate(labels):
        prec = tp[i] / (tp[i] + fp[i]) if tp[i] + fp[i] else 0.0
        rec = tp[i] / (tp[i] + fn[i]) if tp[i] + fn[i] else 0.0
        f1 = 2 * tp[i] / (2 * tp[i] + fp[i] + fn[i]) if 2 * tp[i] + fp[i] + fn[i] else 0.0
        out[lab] = {"precision": float(prec), "recall": float(rec), "f1": float(f1), "support": int(tp[i] + fn[i])}
    return out


# --------------------------------------------------------------------------------------------------
# one cell
# --------------------------------------------------------------------------------------------------
def _wilson(flags: Sequence[bool], confidence: float) -> Interval:
    return proportion(int(sum(bool(f) for f in flags)), len(flags), confidence)


def _by_item(rows: Sequence[EvalRow]) -> dict[str, list[EvalRow]]:
    items: dict[str, list[EvalRow]] = defaultdict(list)
    for r in rows:
        items[r.item_id].append(r)
    return items


def _pass_rates(rows: Sequence[EvalRow], field: str = "correct") -> dict[str, float]:
    """Per item: the fraction of its samples where ``field`` is true (rows with ``field`` None skipped)."""
    rates = {}
    for item, rs in _by_item(rows).items():
        vals = [bool(v) for r in rs if (v := getattr(r, field)) is not None]
        if vals:
            rates[item] = sum(vals) / len(vals)
    return rates


def _n_samples(rows: Sequence[EvalRow]) -> int:
    return max((r.sample for r in rows), default=0) + 1


def _percentile(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else 0.0


def summarize_cell(rows: Sequence[EvalRow], task: str, labels: list[str] | None, *, confidence: float = 0.95,
                   n_boot: int = 2000, seed: int = 0) -> CellStats:
    """All metrics of one cell, each with a ``confidence`` interval.

    - accuracy: over rows with ``correct`` not None (omitted if there are none). One sample per item:
      proportion with a Wilson interval. Repeated sampling: the mean per-item pass rate with a bootstrap
      interval over items (samples of one item are not independent), plus ``pass_rate`` per item and
      ``flaky_items`` (0 < pass rate < 1).
    - macro_f1 (label tasks with labels and gold): bootstrap over items, all samples of an item together.
    - compliance (Wilson over rows); for json tasks also json_valid (Wilson over ``json_parsed``) and
      schema_valid (= compliance).
    - confusion (rows gold, columns predicted + ``(invalid)``) and per_label, over all rows with gold.
    - tokens; latency over the rows that were not served from the cache (all rows if all were); cached.
    """
    if not rows:
        raise ValueError("summarize_cell needs at least one result row")
    items = _by_item(rows)
    n_samples = _n_samples(rows)
    out: dict[str, Any] = {"n_items": len(items), "n_samples": n_samples}
    metrics: dict[str, Interval] = {}

    scored = [r for r in rows if r.correct is not None]
    if scored:
        if n_samples == 1:
            metrics["accuracy"] = _wilson([r.correct for r in scored], confidence)
        else:
            rates = _pass_rates(scored)
            metrics["accuracy"] = bootstrap_ci(np.array(list(rates.values())), n_boot=n_boot, seed=seed,
                                               confidence=confidence)
            out["pass_rate"] = rates
            out["flaky_items"] = sum(0.0 < v < 1.0 for v in rates.values())

    if task == "label" and labels:
        gold_rows = [r for r in rows if r.gold is not None]
        if gold_rows:
            gold = [r.gold for r in gold_rows]
            pred = [r.prediction for r in gold_rows]
            metrics["macro_f1"] = _macro_f1_ci(gold_rows, labels, n_samples, confidence, n_boot, seed)
            out["confusion"] = Confusion(labels=[*labels, INVALID], matrix=confusion_matrix(gold, pred, labels))
            out["per_label"] = {k: LabelScores(**v) for k, v in per_label_scores(gold, pred, labels).items()}

    metrics["compliance"] = _wilson([r.complied for r in rows], confidence)
    if task == "json":
        metrics["json_valid"] = _wilson([bool(r.complied if r.json_parsed is None else r.json_parsed) for r in rows],
                                        confidence)
        metrics["schema_valid"] = metrics["compliance"]
    out["metrics"] = metrics

    pt = np.array([r.prompt_tokens for r in rows])
    ct = np.array([r.completion_tokens for r in rows])
    out["tokens"] = TokenStats(prompt_mean=float(pt.mean()), completion_mean=float(ct.mean()),
                               prompt_total=int(pt.sum()), completion_total=int(ct.sum()))
    fresh = [r for r in rows if not r.cached] or list(rows)
    lat = np.array([r.latency_ms for r in fresh])
    out["latency_ms"] = LatencyStats(mean=float(lat.mean()), p50=_percentile(lat, 50), p95=_percentile(lat, 95),
                                     measured=len(fresh))
    out["cached"] = sum(r.cached for r in rows)
    return CellStats(**out)


def _macro_f1_ci(gold_rows: list[EvalRow], labels: list[str], n_samples: int, confidence: float,
                 n_boot: int, seed: int) -> Interval:
    """Macro-F1 with a bootstrap CI over items; with balanced repeats the samples of an item move together."""
    k = len(labels)
    items = _by_item(gold_rows)
    sizes = {len(rs) for rs in items.values()}
    if n_samples > 1 and len(sizes) == 1:  # (n_items, S): resample items, keep their samples
        ordered = [sorted(rs, key=lambda r: r.sample) for rs in items.values()]
        g = np.stack([_codes([r.gold for r in rs], labels) for rs in ordered])
        p = np.stack([_codes([r.prediction for r in rs], labels) for rs in ordered])
    else:
        g = _codes([r.gold for r in gold_rows], labels)
        p = _codes([r.prediction for r in gold_rows], labels)
    return bootstrap_ci((g, p), lambda gb, pb: _macro_f1_codes(gb, pb, k), n_boot=n_boot, seed=seed,
                        confidence=confidence)


# --------------------------------------------------------------------------------------------------
# comparison across cells
# --------------------------------------------------------------------------------------------------
def _outcome_field(metric: str) -> str:
    return {"compliance": "complied", "schema_valid": "complied", "json_valid": "json_parsed"}.get(metric, "correct")


def _metric_value(rows: Sequence[EvalRow], metric: str, labels: Sequence[str] | None = None) -> float | None:
    """The point value of ``metric`` for one cell (as summarize_cell computes it), None if undefined."""
    if metric == "macro_f1":
        gold_rows = [r for r in rows if r.gold is not None]
        if not gold_rows:
            return None
        if labels is None:  # the labels seen in gold or predicted
            labels = sorted({str(r.gold) for r in gold_rows}
                            | {str(r.prediction) for r in gold_rows if r.prediction is not None})
        return macro_f1([r.gold for r in gold_rows], [r.prediction for r in gold_rows], labels)
    field = _outcome_field(metric)
    rates = _pass_rates(rows, field)
    if not rates:
        return None
    if _n_samples(rows) > 1:
        return float(np.mean(list(rates.values())))
    vals = [bool(v) for r in rows if (v := getattr(r, field)) is not None]
    return sum(vals) / len(vals)


def _item_outcomes(rows: Sequence[EvalRow], field: str) -> dict[str, bool]:
    """Per item one binary outcome: sample 0, or the majority (pass rate > 1/2) with repeated sampling."""
    if _n_samples(rows) == 1:
        return {r.item_id: bool(v) for r in rows if (v := getattr(r, field)) is not None}
    return {item: rate > 0.5 for item, rate in _pass_rates(rows, field).items()}


def compare_to_best(cells: dict[str, list[EvalRow]], metric: str = "accuracy", *, alpha: float = 0.05,
                    labels: Sequence[str] | None = None) -> dict[str, CellComparison]:
    """Compare every cell to the best one by ``metric`` with an exact McNemar test, Holm-adjusted.

    The best cell is the one with the highest metric value (first wins ties). Each other cell is paired
    with it on the items both scored (by item_id; one outcome per item: sample 0, or the per-item
    majority with repeats). The test is on correctness (``complied`` for compliance/schema_valid,
    ``json_parsed`` for json_valid). ``diff`` = cell value - best value (<= 0, a fraction);
    ``lost`` = items the best got right and this cell wrong, ``gained`` the reverse. The Holm correction runs
    over all comparisons; ``significant`` = p_holm < alpha. The best gets ``vs: None``. Cells where the
    metric is undefined (e.g. no gold) are left out. ``labels`` (macro_f1 only) defaults to the labels
    seen in each cell's gold and predictions.
    """
    if metric not in COMPARABLE:
        raise ValueError(f"cannot compare on metric {metric!r}; use one of {', '.join(COMPARABLE)}")
    values = {name: v for name, rows in cells.items() if (v := _metric_value(rows, metric, labels)) is not None}
    if not values:
        return {}
    best = max(values, key=lambda name: values[name])  # max keeps the first of equal values
    field = _outcome_field(metric)
    best_out = _item_outcomes(cells[best], field)
    out = {best: CellComparison(vs=None, diff=0.0, p_value=1.0, p_holm=1.0, significant=False, lost=0, gained=0,
                                n=len(best_out))}
    others = [name for name in values if name != best]
    tests = {}
    for name in others:
        mine = _item_outcomes(cells[name], field)
        common = [i for i in best_out if i in mine]
        tests[name] = (mcnemar_exact([best_out[i] for i in common], [mine[i] for i in common]), len(common))
    for name, p in zip(others, holm_adjust([tests[n][0].p_value for n in others])):
        test, n = tests[name]
        out[name] = CellComparison(vs=best, diff=values[name] - values[best], p_value=test.p_value, p_holm=p,
                                   significant=bool(p < alpha), lost=test.b, gained=test.c, n=n)
    return out
