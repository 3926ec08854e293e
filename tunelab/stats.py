"""The statistics of every comparison tunelab reports: intervals, paired tests, multiple-comparison correction
and the words a verdict is given in.

One module for eval (prompt variants), train (before/after), generate (teacher labels) and run (tuned models
against the best prompt), so the same comparison gives the same interval and verdict everywhere. Pure
functions over plain sequences / numpy arrays; scipy does the distributions. Every interval is an
:class:`Interval` (point estimate plus ``[low, high]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import stats as _st

__all__ = ["Interval", "McNemarResult", "PairedComparison", "wilson_interval", "proportion", "bootstrap_ci",
           "mcnemar_exact", "paired_bootstrap_diff", "paired_comparison", "holm_adjust", "with_holm", "verdict",
           "format_p", "format_interval", "format_diff", "paired_sentence"]

# A statistic for the bootstrap: takes the resampled arrays, each of shape (B, n, ...) (B resamples of the
# n units along the first axis), and returns shape (B,).
Statistic = Callable[..., np.ndarray]


class Interval(BaseModel):
    """A point estimate with a confidence interval (JSON: ``{"value", "low", "high"}``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return self.model_dump()


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test on paired binary outcomes.

    ``b``: pairs where A is right and B wrong; ``c``: A wrong and B right; ``statistic`` = min(b, c).
    """

    b: int
    c: int
    statistic: int
    p_value: float

    @property
    def n_discordant(self) -> int:
        return self.b + self.c


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(_st.norm.ppf(1.0 - (1.0 - confidence) / 2.0))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    With p = k/n and z the two-sided normal quantile::

        centre = (p + z²/2n) / (1 + z²/n)
        half   = z / (1 + z²/n) * sqrt(p(1-p)/n + z²/4n²)
        [centre - half, centre + half]

    Unlike the normal (Wald) interval it stays inside [0, 1] and behaves at p = 0 or 1 and small n.
    ``n = 0`` gives the uninformative (0.0, 1.0).
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    z = _z(confidence)
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def proportion(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """k/n with its Wilson interval (n = 0: value 0.0 in the uninformative [0, 1])."""
    low, high = wilson_interval(successes, n, confidence)
    return Interval(value=successes / n if n else 0.0, low=low, high=high)


def _mean_stat(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).mean(axis=1)


def bootstrap_ci(data: Sequence | np.ndarray | tuple[Sequence | np.ndarray, ...],
                 statistic: Statistic | None = None, *, n_boot: int = 2000, seed: int = 0,
                 confidence: float = 0.95, vectorized: bool = True) -> Interval:
    """Percentile bootstrap confidence interval for any statistic, resampling units (items) with replacement.

    ``data`` is one array or a tuple of arrays that share their first axis (e.g. ``(gold, pred)``); the
    same resampled rows are taken from each, so pairs stay together. A whole index matrix of shape
    (n_boot, n) is drawn at once, and ``statistic(*arrays)`` is called on arrays of shape (n_boot, n, ...)
    and must return shape (n_boot,). ``statistic=None`` is the mean. With ``vectorized=False`` the
    statistic is called once per resample on arrays of shape (1, n, ...) instead (slow, for statistics
    that cannot work on a batch).

    The point estimate is the statistic of the original data; the interval is the
    ((1-c)/2, (1+c)/2) quantiles of the resampled statistics.
    """
    arrays = tuple(np.asarray(a) for a in (data if isinstance(data, tuple) else (data,)))
    n = len(arrays[0])
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one item")
    if any(len(a) != n for a in arrays):
        raise ValueError(f"all arrays must have the same length, got {[len(a) for a in arrays]}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    _z(confidence)  # validates
    if statistic is None:
        if len(arrays) != 1:
            raise ValueError("give a statistic when passing several arrays")
        statistic = _mean_stat
    value = float(np.asarray(statistic(*(a[None] for a in arrays))).reshape(-1)[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # (B, n)
    if vectorized:
        boots = np.asarray(statistic(*(a[idx] for a in arrays)), dtype=float).reshape(-1)
    else:
        boots = np.array([float(np.asarray(statistic(*(a[row][None] for a in arrays))).reshape(-1)[0])
                          for row in idx])
    if boots.shape != (n_boot,):
        raise ValueError(f"statistic must return one value per resample, shape ({n_boot},), got {boots.shape}")
    alpha = 1.0 - confidence
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return Interval(value=value, low=float(low), high=float(high))


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> McNemarResult:
    """Exact (binomial) two-sided McNemar test for two classifiers scored on the same items.

    Only discordant pairs carry information: b = #(A right, B wrong), c = #(A wrong, B right). Under
    H0 (equal accuracy) b ~ Binomial(b + c, 1/2), so::

        p = min(1, 2 * P[X <= min(b, c)]),  X ~ Binomial(b + c, 1/2)

    which equals ``scipy.stats.binomtest(b, b + c, 0.5).pvalue``. p = 1.0 when b + c = 0.
    """
    a = np.asarray(a_correct, dtype=bool)
    bb = np.asarray(b_correct, dtype=bool)
    if a.shape != bb.shape or a.ndim != 1:
        raise ValueError(f"a_correct and b_correct must be 1-D and the same length, got {a.shape} and {bb.shape}")
    b = int(np.sum(a & ~bb))
    c = int(np.sum(~a & bb))
    k = min(b, c)
    p = 1.0 if b + c == 0 else min(1.0, 2.0 * float(_st.binom.cdf(k, b + c, 0.5)))
    return McNemarResult(b=b, c=c, statistic=k, p_value=p)


def paired_bootstrap_diff(a_scores: Sequence[float], b_scores: Sequence[float], *, n_boot: int = 2000,
                          seed: int = 0, confidence: float = 0.95) -> Interval:
    """Mean paired difference mean(a_i - b_i) with a percentile bootstrap CI over items.

    For per-item scores that are not binary (e.g. pass rates over repeated samples), where McNemar
    does not apply. An interval that excludes 0 means the difference is significant at 1 - confidence.
    """
    a = np.asarray(a_scores, dtype=float)
    b = np.asarray(b_scores, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a_scores and b_scores must be 1-D and the same length, got {a.shape} and {b.shape}")
    return bootstrap_ci(a - b, n_boot=n_boot, seed=seed, confidence=confidence)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values (controls the family-wise error rate).

    With the m p-values sorted ascending p_(1) <= ... <= p_(m)::

        p̃_(i) = max_{j <= i} min(1, (m - j + 1) * p_(j))

    returned in the input order. Reject H_i when p̃_i < alpha. NaNs are passed through and not counted.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    if m:
        order = ok[np.argsort(p[ok], kind="stable")]
        scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
        out[order] = np.maximum.accumulate(scaled)
    return [float(x) for x in out]


# --------------------------------------------------------------------------------------------------
# one paired comparison: B against A on the same items
# --------------------------------------------------------------------------------------------------
class PairedComparison(BaseModel):
    """B against A on the items both scored, one binary outcome (right / wrong) per item.

    ``a``, ``b``: each side's accuracy with its Wilson interval; ``diff``: mean(b_i - a_i) with a percentile
    bootstrap interval over items; ``gained``: items A got wrong and B right, ``lost``: the reverse (the
    discordant pairs of the exact McNemar test, whose p-value is ``p_value``). ``p_holm`` is set when the
    comparison is one of a family (:func:`with_holm`); ``significant`` is (p_holm or p_value) < alpha.
    ``n = 0`` (no common item) leaves the intervals None.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int
    a: Interval | None = None
    b: Interval | None = None
    diff: Interval | None = None
    gained: int = 0
    lost: int = 0
    p_value: float = 1.0
    p_holm: float | None = None
    alpha: float = 0.05
    significant: bool = False

    @property
    def p(self) -> float:
        """The p-value a verdict is taken on: Holm-adjusted when part of a family."""
        return self.p_value if self.p_holm is None else self.p_holm

    @property
    def verdict(self) -> str:
        return verdict(self.diff.value if self.diff is not None else None, self.significant) if self.n else "-"


def paired_comparison(a: Mapping[str, bool], b: Mapping[str, bool], *, confidence: float = 0.95, seed: int = 0,
                      n_boot: int = 2000) -> PairedComparison:
    """B against A (per item id: right or wrong) on the ids both have, in sorted order, so that the same two
    sets of outcomes give the same interval whichever order a caller holds them in."""
    ids = sorted(set(a) & set(b))
    alpha = round(1.0 - confidence, 10)
    if not ids:
        return PairedComparison(n=0, alpha=alpha)
    xa = np.array([bool(a[i]) for i in ids])
    xb = np.array([bool(b[i]) for i in ids])
    test = mcnemar_exact(xa, xb)
    diff = paired_bootstrap_diff(xb.astype(float), xa.astype(float), n_boot=n_boot, seed=seed,
                                 confidence=confidence)
    n = len(ids)
    return PairedComparison(n=n, a=proportion(int(xa.sum()), n, confidence), b=proportion(int(xb.sum()), n, confidence),
                            diff=diff, gained=test.c, lost=test.b, p_value=test.p_value, alpha=alpha,
                            significant=bool(test.p_value < alpha))


def with_holm(comparisons: Sequence[PairedComparison]) -> list[PairedComparison]:
    """The comparisons of one family with Holm-adjusted p-values; ``significant`` follows the adjusted ones.
    Comparisons without items (n = 0) are left out of the family and returned as they are."""
    scored = [i for i, c in enumerate(comparisons) if c.n]
    adjusted = holm_adjust([comparisons[i].p_value for i in scored])
    out = list(comparisons)
    for i, p in zip(scored, adjusted):
        out[i] = comparisons[i].model_copy(update={"p_holm": p, "significant": bool(p < comparisons[i].alpha)})
    return out


# --------------------------------------------------------------------------------------------------
# the words
# --------------------------------------------------------------------------------------------------
def verdict(diff: float | None, significant: bool | None, *, best: bool = False) -> str:
    """The one word (or two) for a comparison in every table: ``best``, ``better (significant)``,
    ``worse (significant)``, ``tie`` (no difference), ``not significant``, or ``-`` (nothing compared)."""
    if best:
        return "best"
    if diff is None:
        return "-"
    if significant:
        return "better (significant)" if diff > 0 else "worse (significant)"
    return "tie" if diff == 0 else "not significant"


def format_p(p: float | None) -> str:
    """A p-value as tables print it: three significant digits, ``<0.001`` below that, ``-`` for none."""
    if p is None or p != p:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3g}"


def format_interval(m: Interval | None) -> str:
    """A proportion and its interval in percent, as every table prints it: ``62.5 [55.1, 69.4]`` (``-`` for none)."""
    return "-" if m is None else f"{m.value * 100:.1f} [{m.low * 100:.1f}, {m.high * 100:.1f}]"


def format_diff(d: Interval | None) -> str:
    """A difference of proportions in points with its interval: ``+2.0 [-1.5, +5.5]`` (``-`` for none)."""
    return "-" if d is None else f"{d.value * 100:+.1f} [{d.low * 100:+.1f}, {d.high * 100:+.1f}]"


def paired_sentence(b_name: str, a_name: str, c: PairedComparison, *, test: str = "McNemar") -> str:
    """One sentence for B against A: ``B beats A by 4.0 points (+4.0 [+1.0, +7.5], McNemar p=0.01, n=200)`` or
    ``B vs A: -1.0 points [-3.5, +1.5], not significant (McNemar p=0.6, n=200)``. With Holm, p is the adjusted."""
    if not c.n or c.diff is None:
        return f"{b_name} vs {a_name}: no items in common"
    d = c.diff
    ps = format_p(c.p)
    ps = ps if ps.startswith("<") else f"={ps}"
    ci = f"[{d.low * 100:+.1f}, {d.high * 100:+.1f}]"
    label = f"{test} p{ps}" + (" (Holm)" if c.p_holm is not None else "") + f", n={c.n}"
    if c.significant:
        word = "beats" if d.value > 0 else "is worse than"
        return f"{b_name} {word} {a_name} by {abs(d.value) * 100:.1f} points ({d.value * 100:+.1f} {ci}, {label})"
    return f"{b_name} vs {a_name}: {d.value * 100:+.1f} points {ci}, not significant ({label})"
