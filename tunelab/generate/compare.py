"""Comparing labels: a teacher's against gold labels of the same texts (accuracy, Cohen's kappa, confusion).

The whole teacher-vs-gold loop (label the training texts with a teacher, train one adapter on the teacher's labels
and one on the gold labels of the same texts, compare both on the same dev items) is an experiment of `tunelab run`:
examples/experiments/teacher_vs_gold.yaml (``generate.inputs: train``, ``items: generated``, ``eval_after.compare``;
docs/generate.md). Its generate stage scores the teacher with :func:`agreement`.
"""

from __future__ import annotations

from typing import Sequence

from tunelab.generate.results import LabelAgreement
from tunelab.stats import proportion

__all__ = ["agreement"]


def agreement(gold: Sequence[str], teacher: Sequence[str], labels: Sequence[str]) -> LabelAgreement:
    """Teacher-vs-gold agreement on the same texts: accuracy with its Wilson 95% interval, Cohen's kappa
    ``(po - pe) / (1 - pe)`` (po: observed agreement, pe: the agreement expected from the two label distributions
    alone) and the confusion matrix (rows: gold label, columns: teacher label; labels outside ``labels`` are not
    counted there)."""
    n = len(gold)
    if n != len(teacher):
        raise ValueError("gold and teacher labels differ in length")
    agree = sum(g == t for g, t in zip(gold, teacher))
    idx = {lab: i for i, lab in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for g, t in zip(gold, teacher):
        if g in idx and t in idx:
            m[idx[g]][idx[t]] += 1
    po = agree / n if n else 0.0
    pe = sum((sum(m[i]) / n) * (sum(r[i] for r in m) / n) for i in range(len(labels))) if n else 0.0
    kappa = (po - pe) / (1 - pe) if pe < 1 else (1.0 if po == 1 else 0.0)
    return LabelAgreement(n=n, agree=agree, accuracy=proportion(agree, n), kappa=round(kappa, 4),
                          expected_agreement=round(pe, 4), labels=list(labels), matrix=m)
