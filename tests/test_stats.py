"""spo.stats against scipy.stats and against hand-computed figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats")

from spo import stats  # noqa: E402

# scipy takes a confidence level, not a quantile: the level whose normal quantile is exactly our 1.96.
LEVEL_196 = 2 * scipy_stats.norm.cdf(1.96) - 1


def test_t_quantiles_match_scipy():
    for df in range(1, 150):
        assert stats.t_quantile(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-12), df
    assert stats.t_quantile(4, level=0.9) == pytest.approx(scipy_stats.t.ppf(0.95, 4), rel=1e-12)
    assert stats.t_quantile(1) == pytest.approx(12.706204736174705, rel=1e-12)  # the textbook table's 12.706
    with pytest.raises(ValueError):
        stats.t_quantile(0)


def test_mean_interval_small_n_is_student_t():
    x = [0.1, 0.4, 0.35, 0.8]
    got = stats.mean_interval(x)
    lo, hi = scipy_stats.t.interval(0.95, 3, loc=np.mean(x), scale=scipy_stats.sem(x))
    assert got.method == "t" and got.n == 4 and got.estimate == pytest.approx(0.4125, rel=1e-15)
    assert (got.low, got.high) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    # by hand: sd = 0.28975..., t(0.975, 3) = 3.18245
    assert got.half_width == pytest.approx(3.182446305284263 * np.std(x, ddof=1) / 2, rel=1e-12)


def test_mean_interval_large_n_is_normal_196_as_before():
    x = np.random.default_rng(0).normal(size=stats.LARGE_N)
    got = stats.mean_interval(x)
    # exactly the figure the project printed before the stats module (1.96 sd / sqrt(n))
    assert got.method == "normal" and got.half_width == 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    lo, hi = scipy_stats.norm.interval(LEVEL_196, loc=x.mean(), scale=scipy_stats.sem(x))
    assert (got.low, got.high) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    assert stats.mean_interval(x[:-1]).method == "t"


def test_mean_interval_edge_cases_and_bounds():
    assert stats.mean_interval([]).n == 0 and math.isnan(stats.mean_interval([]).estimate)
    one = stats.mean_interval([0.3])
    assert (one.estimate, one.low, one.high, one.half_width, one.method) == (0.3, 0.3, 0.3, 0.0, "none")
    # n = 2 alignment values 1, 0: t(0.975, 1) = 12.7 makes mean +- 6.35; the range of the score keeps it in [0, 1]
    got = stats.mean_interval([1.0, 0.0], bounds=(0.0, 1.0))
    assert (got.low, got.high) == (0.0, 1.0) and got.half_width == pytest.approx(12.706204736174705 * 0.5)
    same = stats.mean_interval([2.0, 2.0, 2.0])
    assert (same.low, same.high) == (2.0, 2.0)


def test_paired_difference_by_hand_and_scipy():
    a = np.array([0.61, 0.52, 0.70, 0.44, 0.58])
    b = np.array([0.50, 0.49, 0.62, 0.47, 0.51])
    got = stats.paired_difference(a, b)
    d = a - b
    lo, hi = scipy_stats.t.interval(0.95, 4, loc=d.mean(), scale=scipy_stats.sem(d))
    assert got.estimate == pytest.approx(0.052, rel=1e-12)
    assert (got.low, got.high) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    # scipy's paired t-test agrees on significance: p < 0.05 exactly when 0 is outside the interval
    p = scipy_stats.ttest_rel(a, b).pvalue
    assert (p < 0.05) == (not got.contains(0.0))
    # alignment (0/1) differences live in [-1, 1]
    clipped = stats.paired_difference([1, 0], [0, 0], bounds=(0, 1))
    assert (clipped.low, clipped.high) == (-1.0, 1.0)
    with pytest.raises(ValueError):
        stats.paired_difference([1, 2], [1])


@pytest.mark.parametrize("k,n", [(0, 4), (1, 4), (3, 4), (4, 4), (7, 16), (50, 100), (999, 1000)])
def test_wilson_matches_scipy(k, n):
    got = stats.wilson_interval(k, n)
    ref = scipy_stats.binomtest(k, n).proportion_ci(method="wilson", confidence_level=LEVEL_196)
    assert got.low == pytest.approx(ref.low, rel=1e-12, abs=1e-15)
    assert got.high == pytest.approx(ref.high, rel=1e-12, abs=1e-15)
    assert 0.0 <= got.low <= got.estimate <= got.high <= 1.0 and got.method == "wilson"


def test_wilson_by_hand_and_ties():
    # 3 of 4: centre (0.75 + 1.96^2 / 8) / (1 + 1.96^2 / 4) = 0.627525..., the interval 0.3006 .. 0.9544
    got = stats.wilson_interval(3, 4)
    z2 = 1.96 ** 2
    centre = (0.75 + z2 / 8) / (1 + z2 / 4)
    half = 1.96 / (1 + z2 / 4) * math.sqrt(0.75 * 0.25 / 4 + z2 / 64)
    assert (got.low, got.high) == (pytest.approx(centre - half, rel=1e-15), pytest.approx(centre + half, rel=1e-15))
    assert got.low == pytest.approx(0.30064, abs=1e-5) and got.high == pytest.approx(0.95441, abs=1e-5)
    # a tie counts as half a win
    ties = stats.proportion_interval([1.0, 0.5, 0.5, 0.0])
    assert ties.estimate == 0.5 and ties.as_pair() == stats.wilson_interval(2.0, 4).as_pair()
    assert math.isnan(stats.wilson_interval(0, 0).estimate)
    with pytest.raises(ValueError):
        stats.wilson_interval(5, 4)


def test_proportion_half_width_is_the_wald_figure():
    assert stats.proportion_half_width(0.5, 2) == 1.96 * math.sqrt(0.25 / 2)
    assert math.isnan(stats.proportion_half_width(0.5, 0)) and math.isnan(stats.proportion_half_width(float("nan"), 3))


def test_mean_summary_fields():
    s = stats.mean_summary([0.2, 0.4, 0.9])
    assert set(s) == {"n", "mean", "std", "ci95", "ci95_half_width", "interval"} and s["interval"] == "t"
    assert s["ci95"][0] <= s["mean"] <= s["ci95"][1]
    p = stats.mean_summary([1, 1, 1, 0], proportion=True)
    assert p["interval"] == "wilson" and p["ci95"] == stats.wilson_interval(3, 4).as_pair() and p["ci95"][1] <= 1.0
