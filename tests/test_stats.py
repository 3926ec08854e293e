import time

import numpy as np
import pytest
from scipy.stats import binomtest

from tunelab.stats import (Interval, bootstrap_ci, holm_adjust, mcnemar_exact, paired_bootstrap_diff,
                                    wilson_interval)


# -- Wilson ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, n, expected", [
    (8, 10, (0.4902, 0.9433)),    # textbook (Newcombe 1998 / Agresti & Coull style tables)
    (0, 10, (0.0, 0.2775)),
    (10, 10, (0.7225, 1.0)),
    (81, 263, (0.2553, 0.3662)),  # Newcombe (1998), example (a)
])
def test_wilson_known_values(k, n, expected):
    low, high = wilson_interval(k, n)
    assert (low, high) == pytest.approx(expected, abs=1e-4)


def test_wilson_edges_and_confidence():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    l95, h95 = wilson_interval(30, 100)
    l99, h99 = wilson_interval(30, 100, confidence=0.99)
    assert l99 < l95 < 0.3 < h95 < h99
    with pytest.raises(ValueError, match="need 0 <= successes <= n"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
        wilson_interval(1, 10, confidence=1.5)


# -- McNemar -----------------------------------------------------------------------------------------
def test_mcnemar_matches_scipy_binomtest():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.random(60) < 0.7
        b = rng.random(60) < 0.55
        res = mcnemar_exact(a.tolist(), b.tolist())
        assert res.b == int(np.sum(a & ~b)) and res.c == int(np.sum(~a & b))
        assert res.statistic == min(res.b, res.c)
        if res.b + res.c:
            assert res.p_value == pytest.approx(binomtest(res.b, res.b + res.c, 0.5).pvalue, rel=1e-12)


def test_mcnemar_hand_example_and_edges():
    # b = 4 (A right, B wrong), c = 1: p = 2 * P[X <= 1 | Bin(5, .5)] = 2 * 6/32
    res = mcnemar_exact([1, 1, 1, 1, 0, 1], [0, 0, 0, 0, 1, 1])
    assert (res.b, res.c, res.n_discordant) == (4, 1, 5)
    assert res.p_value == pytest.approx(0.375)
    assert mcnemar_exact([True, False], [True, False]).p_value == 1.0  # no discordant pairs
    assert mcnemar_exact([], []).p_value == 1.0
    with pytest.raises(ValueError, match="same length"):
        mcnemar_exact([True], [True, False])


# -- bootstrap ---------------------------------------------------------------------------------------
def test_bootstrap_mean_contains_estimate_narrows_and_is_deterministic():
    rng = np.random.default_rng(1)
    small, large = rng.random(50), rng.random(2000)
    ci_s, ci_l = bootstrap_ci(small), bootstrap_ci(large)
    for ci, x in ((ci_s, small), (ci_l, large)):
        assert isinstance(ci, Interval)
        assert ci.value == pytest.approx(x.mean())
        assert ci.low < ci.value < ci.high
    assert ci_l.high - ci_l.low < ci_s.high - ci_s.low
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    assert bootstrap_ci(small, seed=3) != bootstrap_ci(small, seed=4)
    assert bootstrap_ci(small, confidence=0.99).high > ci_s.high


def test_bootstrap_paired_statistic_and_speed():
    rng = np.random.default_rng(2)
    gold = rng.integers(0, 3, 1000)
    pred = np.where(rng.random(1000) < 0.8, gold, rng.integers(0, 3, 1000))

    def accuracy(g, p):  # (B, n) -> (B,)
        return (g == p).mean(axis=1)

    t0 = time.perf_counter()
    ci = bootstrap_ci((gold, pred), accuracy, n_boot=2000)
    assert time.perf_counter() - t0 < 1.0
    assert ci.value == pytest.approx((gold == pred).mean())
    assert ci.low < ci.value < ci.high
    slow = bootstrap_ci((gold, pred), accuracy, n_boot=200, vectorized=False)
    fast = bootstrap_ci((gold, pred), accuracy, n_boot=200)
    assert slow == fast  # same index matrix, same answer


def test_bootstrap_errors():
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="same length"):
        bootstrap_ci(([1, 2], [1]), lambda a, b: a.mean(1))
    with pytest.raises(ValueError, match="one value per resample"):
        bootstrap_ci([1.0, 2.0], lambda a: a)


def test_bootstrap_coverage_sanity():
    # a 90% interval for the mean of Bernoulli(0.3) samples should cover 0.3 in roughly 90% of trials
    rng = np.random.default_rng(5)
    hits = 0
    for trial in range(200):
        x = (rng.random(200) < 0.3).astype(float)
        ci = bootstrap_ci(x, n_boot=500, seed=trial, confidence=0.9)
        hits += ci.low <= 0.3 <= ci.high
    assert 0.8 <= hits / 200 <= 0.97


def test_paired_bootstrap_diff():
    rng = np.random.default_rng(3)
    a = rng.random(300)
    b = a - 0.1 + rng.normal(0, 0.05, 300)
    d = paired_bootstrap_diff(a, b)
    assert d.value == pytest.approx(np.mean(a - b))
    assert 0 < d.low < d.value < d.high
    same = paired_bootstrap_diff(a, a)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="the same length"):
        paired_bootstrap_diff([0.1, 0.2], [0.1])


# -- Holm --------------------------------------------------------------------------------------------
def test_holm_hand_computed():
    # sorted: .005 (x4 = .02), .01 (x3 = .03), .03 (x2 = .06), .04 (x1 = .04 -> monotone .06)
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm_adjust([0.02]) == pytest.approx([0.02])
    assert holm_adjust([]) == []
    out = holm_adjust([0.01, float("nan"), 0.02])
    assert out[0] == pytest.approx(0.02) and np.isnan(out[1]) and out[2] == pytest.approx(0.02)


# -- one paired comparison, its family and its words ----------------------------------------------
def test_paired_comparison_by_hand():
    from tunelab.stats import paired_comparison, proportion

    ids = [f"i{k}" for k in range(20)]
    a = {i: k < 14 for k, i in enumerate(ids)}                   # 14 right
    b = {i: 3 <= k < 12 or k >= 18 for k, i in enumerate(ids)}   # 11 right
    b["extra"] = True                                            # only in b: not paired
    c = paired_comparison(a, b)
    assert c.n == 20 and (c.gained, c.lost) == (2, 5)           # b right where a wrong / the reverse
    assert c.a == proportion(14, 20) and c.b == proportion(11, 20)
    assert c.diff.value == pytest.approx(-0.15) and c.diff.low <= -0.15 <= c.diff.high
    assert c.p_value == pytest.approx(binomtest(2, 7, 0.5).pvalue) and not c.significant
    # the order a caller holds the items in does not change the interval
    rev = paired_comparison(dict(reversed(list(a.items()))), dict(reversed(list(b.items()))))
    assert rev == c
    assert paired_comparison({"x": True}, {"y": True}).n == 0


def test_paired_comparison_confidence_and_significance():
    from tunelab.stats import paired_comparison

    a = {str(i): False for i in range(40)}
    b = {str(i): i < 30 for i in range(40)}
    c = paired_comparison(a, b, confidence=0.99)
    assert c.alpha == pytest.approx(0.01) and c.significant and c.verdict == "better (significant)"
    wide, narrow = paired_comparison(a, b, confidence=0.99).diff, paired_comparison(a, b, confidence=0.8).diff
    assert wide.low < narrow.low and narrow.high < wide.high


def test_with_holm_adjusts_the_family():
    from tunelab.stats import paired_comparison, with_holm

    a = {str(i): False for i in range(12)}
    strong = paired_comparison(a, {str(i): i < 9 for i in range(12)})   # p = 2/512
    weak = paired_comparison(a, {str(i): i < 5 for i in range(12)})     # p = 1/16: not significant alone
    empty = paired_comparison(a, {})
    out = with_holm([weak, strong, empty])
    assert out[0].p_holm == pytest.approx(holm_adjust([weak.p_value, strong.p_value])[0])
    assert out[1].p_holm == pytest.approx(2 * strong.p_value) and out[1].significant
    assert out[2] is empty and out[2].p_holm is None


def test_verdict_words_and_sentence():
    from tunelab.stats import format_p, paired_comparison, paired_sentence, verdict

    assert [verdict(0.1, True), verdict(-0.1, True), verdict(0.0, False), verdict(-0.02, False),
            verdict(None, None), verdict(-0.3, True, best=True)] == [
        "better (significant)", "worse (significant)", "tie", "not significant", "-", "best"]
    assert (format_p(0.0004), format_p(0.01234), format_p(None), format_p(float("nan"))) == \
        ("<0.001", "0.0123", "-", "-")
    a = {str(i): False for i in range(40)}
    c = paired_comparison(a, {str(i): i < 30 for i in range(40)})
    assert paired_sentence("tuned", "base", c).startswith("tuned beats base by 75.0 points (+75.0 [")
    assert "McNemar p<0.001, n=40" in paired_sentence("tuned", "base", c)
    same = paired_comparison(a, a)
    assert paired_sentence("x", "y", same) == "x vs y: +0.0 points [+0.0, +0.0], not significant (McNemar p=1, n=40)"
