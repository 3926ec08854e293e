"""Statistics for comparing prompt variants: intervals, paired tests and multiple-comparison correction.

Pure functions over plain sequences / numpy arrays. Every interval is returned as an :class:`Interval`
(point estimate plus ``[low, high]``) so callers can report ``value [low, high]`` the same way everywhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats as _st

__all__ = ["Interval", "McNemarResult", "wilson_interval", "bootstrap_ci", "mcnemar_exact",
           "paired_bootstrap_diff", "holm_adjust"]

# A statistic for the bootstrap: takes the resampled arrays, each of shape (B, n, ...) (B resamples of the
# n units along the first axis), and returns shape (B,).
Statistic = Callable[..., np.ndarray]


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


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
    return Interval(value, float(low), float(high))


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
