"""The confidence of a teacher's label, from the log probabilities of its answer tokens (docs/generate.md,
"Pseudo-labelling unlabelled text").

- ``top_logprobs`` (preferred): when the server sent the first answer token's most likely alternatives and that
  first token tells the labels apart (stripped and lower-cased, it is a prefix of the chosen label and of no other
  label of the set), the confidence is the probability mass of the first-token candidates that are a prefix of the
  chosen label divided by the mass of those that are a prefix of any label of the set (candidates: the top
  alternatives plus the chosen token; stripped, case-insensitive; an empty one counts for none).
- ``sequence``: otherwise ``exp(sum of the logprobs of all answer tokens)``, the teacher's probability of the answer
  text it gave.
- ``votes``: with ``sampling.samples > 1``, the winning label's share of the valid votes.

A repaired answer's confidence is that of the answer that was kept (the last one). No logprobs: None.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

__all__ = ["label_confidence", "confidence_summary", "HIST_BINS"]

HIST_BINS = 10


def label_confidence(logprobs: Sequence[dict[str, Any]] | None, label: str,
                     labels: Sequence[str]) -> tuple[float | None, str | None]:
    """(confidence, method) of ``label`` from the answer's token logprobs (``client.token_logprobs`` shape);
    (None, None) without logprobs."""
    if not logprobs:
        return None, None
    first = logprobs[0]
    lab = label.strip().lower()
    others = [x.strip().lower() for x in labels if x.strip().lower() != lab]
    tok = str(first.get("token") or "").strip().lower()
    top = first.get("top")
    if top and tok and lab.startswith(tok) and not any(o.startswith(tok) for o in others):
        cands: dict[str, float] = {str(t): float(lp) for t, lp in top}
        cands.setdefault(str(first.get("token") or ""), float(first["logprob"]))
        num = den = 0.0
        for t, lp in cands.items():
            s = t.strip().lower()
            if not s:
                continue
            p = math.exp(lp)
            if lab.startswith(s):
                num += p
            if lab.startswith(s) or any(o.startswith(s) for o in others):
                den += p
        if den > 0:
            return num / den, "top_logprobs"
    return math.exp(sum(float(t["logprob"]) for t in logprobs)), "sequence"


def _q(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile of sorted ``xs``."""
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def confidence_summary(values: Sequence[float | None], methods: Sequence[str | None] = ()) -> dict[str, Any]:
    """n, how many are null, mean, quantiles (min, p10, p25, p50, p75, p90, max; linear interpolation) and a
    histogram of ten bins of width 0.1 (the last one holds 1.0)."""
    xs = sorted(v for v in values if v is not None)
    counts = [0] * HIST_BINS
    for v in xs:
        counts[min(HIST_BINS - 1, int(v * HIST_BINS))] += 1
    out: dict[str, Any] = {"n": len(values), "null": len(values) - len(xs),
                           "mean": round(sum(xs) / len(xs), 6) if xs else None, "quantiles": None,
                           "histogram": {"edges": [round(i / HIST_BINS, 2) for i in range(HIST_BINS + 1)],
                                         "counts": counts},
                           "methods": dict(Counter(m for m in methods if m))}
    if xs:
        out["quantiles"] = {name: round(_q(xs, q), 6) for name, q in
                            (("min", 0.0), ("p10", 0.1), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p90", 0.9),
                             ("max", 1.0))}
    return out
