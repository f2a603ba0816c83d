"""Paired statistics: hand-computed cases, scipy agreement, the study's pitfalls."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats

from loralens.stats import (
    bonferroni,
    bonferroni_alpha,
    bootstrap_ci,
    bootstrap_reduction_ci,
    cohens_d_paired,
    compare_methods,
    delta_percent,
    paired_ttest,
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
    assert cohens_d_paired(A, B) == pytest.approx(2.0)
    # the study's ddof=0 value: sd = sqrt(2/3) = 0.8165, d = 2.449 -- 22% larger
    diff = np.subtract(A, B)
    study_d = diff.mean() / diff.std(ddof=0)
    assert study_d == pytest.approx(math.sqrt(6))
    assert cohens_d_paired(A, B) != pytest.approx(study_d)
    # and t = d * sqrt(n)
    assert paired_ttest(A, B)[0] == pytest.approx(cohens_d_paired(A, B) * math.sqrt(3))


def test_zero_variance_differences():
    # all differences 0: no evidence of a difference
    assert paired_ttest([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == (0.0, 1.0)
    assert cohens_d_paired([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 0.0
    # all differences equal and nonzero: the limit of a vanishing spread
    assert paired_ttest([1.5, 2.5, 3.5], [1.0, 2.0, 3.0]) == (math.inf, 0.0)
    assert paired_ttest([1.0, 2.0, 3.0], [1.5, 2.5, 3.5]) == (-math.inf, 0.0)
    assert cohens_d_paired([1.0, 2.0, 3.0], [1.5, 2.5, 3.5]) == -math.inf


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
    assert out["cohens_d"] == pytest.approx(cohens_d_paired(lora, full))
    for key in ("lora", "full"):
        low, high = out[key]["ci"]
        assert low <= out[key]["mean"] <= high
    assert out["delta_percent_ci"][0] <= 48.0 <= out["delta_percent_ci"][1]
    for v in (out["t"], out["p"], out["cohens_d"], out["lora"]["mean"]):
        assert type(v) is float

    # identical nonzero shifts: t and d are infinite -> None, p = 0
    same = compare_methods([0.1, 0.2, 0.3], [0.2, 0.3, 0.4], seeds)
    json.dumps(same, allow_nan=False)
    assert same["t"] is None and same["cohens_d"] is None and same["p"] == 0.0

    with pytest.raises(ValueError, match="seeds"):
        compare_methods(lora, full, seeds[:2])
