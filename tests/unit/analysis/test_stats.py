"""Paired statistics: hand-computed cases, scipy agreement, the study's pitfalls."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats

from loralens.analysis.stats import (
    bonferroni, bonferroni_alpha, bootstrap_ci, bootstrap_reduction_ci, cohens_d_paired,
    compare_methods, delta_percent, distinct_resamples, exact_mcnemar, paired_ttest,
    wilson_interval, zero_spread,
)

# a - b = [1, 2, 3]: mean 2, sd (ddof=1) = sqrt(((-1)^2 + 0 + 1^2) / 2) = 1,
# d = 2 / 1 = 2, t = 2 / (1 / sqrt(3)) = 2 sqrt(3) = 3.4641, df = 2.
# With 2 df the t CDF is 1/2 + t / (2 sqrt(2 + t^2)), so the two-sided
# p = 1 - t / sqrt(2 + t^2) = 1 - 3.4641 / sqrt(14) = 0.074180.
A = [3.0, 5.0, 7.0]
B = [2.0, 3.0, 4.0]


def test_paired_ttest_by_hand():
    t, p = paired_ttest(A, B)
    assert t == pytest.approx(2 * math.sqrt(3))
    assert p == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14))
    assert p == pytest.approx(0.074180, abs=1e-6)
    t_rev, p_rev = paired_ttest(B, A)
    assert (t_rev, p_rev) == pytest.approx((-t, p))


def test_paired_ttest_matches_scipy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 30):
        a = rng.normal(size=n)
        b = a + rng.normal(0.3, 1.0, size=n)
        ref = scipy.stats.ttest_rel(a, b)
        assert paired_ttest(a, b) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-12)


def test_cohens_d_uses_ddof_1():
    # a - b = [1, 2, 3]: mean 2, sd (ddof 1) 1 -> d = 2 (header comment)
    assert cohens_d_paired(A, B) == pytest.approx(2.0)
    assert cohens_d_paired(B, A) == pytest.approx(-2.0)  # the sign follows the order
    # the study's ddof=0 value: sd = sqrt(2/3) = 0.8165, d = sqrt(6) = 2.449 -- 22% larger
    assert cohens_d_paired(A, B) != pytest.approx(math.sqrt(6))
    # another hand case: a - b = [0.1, 0.3], mean 0.2, sd = sqrt(0.02) -> d = sqrt(2)
    assert cohens_d_paired([0.5, 0.9], [0.4, 0.6]) == pytest.approx(math.sqrt(2))


def test_zero_spread_is_undefined_never_significant():
    # all differences 0, or all equal and nonzero: t = 0/0 or c/0, no test at all
    for a, b in (([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]), ([1.5, 2.5, 3.5], [1.0, 2.0, 3.0]),
                 ([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])):
        assert zero_spread(a, b)
        t, p = paired_ttest(a, b)
        assert math.isnan(t) and math.isnan(p)
        assert math.isnan(cohens_d_paired(a, b))
    # accuracies on a 1/20 grid: 12/20 - 11/20 = 14/20 - 13/20 = ... up to float rounding
    lora, full = [12 / 20, 14 / 20, 16 / 20], [11 / 20, 13 / 20, 15 / 20]
    assert len({x - y for x, y in zip(lora, full)}) > 1  # not bit-identical differences
    assert zero_spread(lora, full)
    out = compare_methods(lora, full, [42, 1337, 2024], n_tests=3)
    json.dumps(out, allow_nan=False)
    assert out["zero_spread"] is True and out["significant"] is False
    assert out["p"] is None and out["p_bonferroni"] is None and out["t"] is None
    assert out["cohens_d"] is None and "zero spread" in out["note"]
    assert out["lora"]["mean"] == pytest.approx(0.7)  # the description stays
    # a tiny but real spread is a test again
    assert not zero_spread([0.6, 0.7, 0.8], [0.55, 0.65, 0.7501])


def test_input_errors():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_ttest([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2"):
        paired_ttest([1], [2])
    with pytest.raises(ValueError, match="NaN"):
        cohens_d_paired([1, np.nan], [1, 2])
    with pytest.raises(ValueError, match="mean of drift_full is 0"):
        delta_percent([0.0, 0.0], [0.1, 0.2])


def test_study_pitfall_one_sample_test_on_reductions_is_a_different_test():
    full = [0.10, 0.50, 0.90]
    lora = [0.05, 0.40, 0.80]
    # Paired: lora - full = [-0.05, -0.10, -0.10], mean -0.0833, sd 0.02887,
    # t = -5.0, p = 1 - 5 / sqrt(27) = 0.0377.
    t, p = paired_ttest(lora, full)
    assert t == pytest.approx(-5.0)
    assert p == pytest.approx(1 - 5 / math.sqrt(27))
    # The study: one-sample t-test of per-seed reductions [50, 20, 11.1] %
    # against 0: t = 2.30, p = 0.148 -- not significant where the paired test is.
    reductions = [100 * (f - lo) / f for f, lo in zip(full, lora)]
    study = scipy.stats.ttest_1samp(reductions, 0.0)
    assert study.pvalue == pytest.approx(0.148, abs=1e-3)
    assert p < 0.05 < study.pvalue


def test_bonferroni():
    np.testing.assert_allclose(bonferroni([0.01, 0.02, 0.5]), [0.03, 0.06, 1.0])
    assert bonferroni(0.02, n_tests=3) == pytest.approx(0.06)
    assert bonferroni(0.9, n_tests=3) == 1.0  # capped
    assert isinstance(bonferroni(0.02, n_tests=3), float)
    assert bonferroni_alpha(3) == pytest.approx(0.05 / 3)
    with pytest.raises(ValueError):
        bonferroni([0.1, 0.2], n_tests=1)
    with pytest.raises(ValueError):
        bonferroni(1.5)


def test_bootstrap_ci_reproducible_and_contains_mean():
    values = np.random.default_rng(1).normal(0.3, 0.05, size=12)
    ci = bootstrap_ci(values, seed=3)
    assert ci == bootstrap_ci(values, seed=3)
    assert ci != bootstrap_ci(values, seed=4)
    low, high = ci
    assert low < values.mean() < high
    assert bootstrap_ci(values, stat=np.median, n_resamples=500, confidence=0.9)[0] < np.median(values)
    assert bootstrap_ci([0.42]) == (0.42, 0.42)


def test_delta_percent_and_its_paired_bootstrap():
    full = [0.20, 0.25, 0.30]
    lora = [0.10, 0.15, 0.14]
    # means 0.25 and 0.13: 100 * 0.12 / 0.25 = 48 %
    assert delta_percent(full, lora) == pytest.approx(48.0)
    low, high = bootstrap_reduction_ci(full, lora, seed=0)
    assert low <= 48.0 <= high
    assert (low, high) == bootstrap_reduction_ci(full, lora, seed=0)
    # resampling pairs jointly: with lora = full / 2 every resample gives 50 %
    assert bootstrap_reduction_ci(full, np.divide(full, 2)) == pytest.approx((50.0, 50.0))


def test_compare_methods_is_complete_and_json_ready():
    seeds = [42, 1337, 2024]
    lora = [0.10, 0.15, 0.14]
    full = [0.20, 0.25, 0.30]
    out = compare_methods(lora, full, seeds, n_tests=3)
    json.dumps(out, allow_nan=False)  # plain types only, no NaN/inf
    assert out["seeds"] == seeds and out["n_seeds"] == 3
    assert out["lora"]["per_seed"] == lora and out["full"]["per_seed"] == full
    assert out["lora"]["mean"] == pytest.approx(0.13)
    assert out["full"]["sd"] == pytest.approx(0.05)
    assert out["delta_percent"] == pytest.approx(48.0)
    t, p = scipy.stats.ttest_rel(lora, full)
    assert out["t"] == pytest.approx(t) and out["p"] == pytest.approx(p)
    assert out["p_bonferroni"] == pytest.approx(min(1.0, 3 * p))
    assert out["significant"] == (3 * p < 0.05)
    # lora - full = [-0.10, -0.10, -0.16]: mean -0.12, sd sqrt(0.0012) -> d = -3.4641
    assert out["cohens_d"] == pytest.approx(-0.12 / math.sqrt(0.0012))
    assert out["sign"] == "lora - full" and out["bootstrap_distinct_resamples"] == 10
    # the paper's drift convention: full - lora, positive when full drifts more
    rev = compare_methods(lora, full, seeds, n_tests=3, sign="full - lora")
    assert rev["cohens_d"] == pytest.approx(0.12 / math.sqrt(0.0012))
    assert rev["t"] == pytest.approx(-t) and rev["p"] == pytest.approx(p)
    for key in ("lora", "full"):
        low, high = out[key]["ci"]
        assert low <= out[key]["mean"] <= high
    assert out["delta_percent_ci"][0] <= 48.0 <= out["delta_percent_ci"][1]
    for v in (out["t"], out["p"], out["cohens_d"], out["lora"]["mean"]):
        assert type(v) is float

    # identical nonzero shifts: zero spread, undefined (never p = 0)
    same = compare_methods([0.1, 0.2, 0.3], [0.2, 0.3, 0.4], seeds)
    json.dumps(same, allow_nan=False)
    assert same["t"] is None and same["cohens_d"] is None and same["p"] is None
    assert same["significant"] is False and same["zero_spread"] is True

    with pytest.raises(ValueError, match="seeds"):
        compare_methods(lora, full, seeds[:2])


def test_distinct_resamples_counts_multisets():
    # enumerate every resample of n labelled values; count distinct multisets
    import itertools

    for n in (1, 2, 3, 4):
        seen = {tuple(sorted(r)) for r in itertools.product(range(n), repeat=n)}
        assert distinct_resamples(n) == len(seen)
    assert distinct_resamples(3) == 10
    # the bootstrap of three values really takes only 10 distinct means
    means = np.unique(np.round(np.array([1.0, 10.0, 100.0])[
        np.random.default_rng(0).integers(0, 3, size=(5000, 3))].mean(axis=1), 9))
    assert means.size == 10


def test_exact_mcnemar_matches_binomial_test():
    for b, c in ((0, 0), (0, 5), (3, 10), (10, 3), (7, 7), (1, 30), (120, 90)):
        ref = 1.0 if b + c == 0 else scipy.stats.binomtest(b, b + c, 0.5).pvalue
        assert exact_mcnemar(b, c) == pytest.approx(ref, rel=1e-12)
    # by hand: b=0, c=5 -> 2 * 0.5^5 = 0.0625
    assert exact_mcnemar(0, 5) == pytest.approx(0.0625)
    with pytest.raises(ValueError):
        exact_mcnemar(-1, 2)


def test_wilson_interval_matches_scipy_and_formula():
    for k, n in ((0, 10), (3, 10), (10, 10), (181, 277), (300, 408)):
        ref = scipy.stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-12)
    # RTE: 277 rows, accuracy ~0.65 -> the interval spans about +-5.5 points
    lo, hi = wilson_interval(180, 277)
    assert 0.10 < hi - lo < 0.12
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
