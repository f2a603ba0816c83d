"""Property-based tests (Hypothesis) of the statistics: degenerate, zero-spread, tiny and
huge inputs give a JSON-ready result with every number finite or None (or a ValueError),
never NaN, inf or another exception; p-values and intervals stay in their ranges."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loralens.analysis import stats
from tests.helpers.properties import examples

FAST = settings(max_examples=examples(200), deadline=3000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

value = st.one_of(st.floats(-1e3, 1e3), st.sampled_from([0.0, 1.0, 0.5, 1e-12, -1e-12, 0.1,
                                                         0.2, 0.3, 1e300, -1e300]))
pairs = st.integers(1, 6).flatmap(lambda n: st.tuples(st.lists(value, min_size=n, max_size=n),
                                                      st.lists(value, min_size=n, max_size=n)))


def finite_or_none(obj) -> bool:
    if isinstance(obj, dict):
        return all(finite_or_none(v) for v in obj.values())
    if isinstance(obj, list):
        return all(finite_or_none(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


@FAST
@given(pair=pairs, sign=st.sampled_from(stats.SIGNS), n_tests=st.integers(1, 40))
@example(pair=([0.1, 0.2, 0.3], [0.0, 0.1, 0.2]), sign="lora - full", n_tests=1)  # rounding
@example(pair=([1e300, 1e300, -1e300], [0.0, 0.0, 0.0]), sign="lora - full", n_tests=1)
@example(pair=([0.5, 0.5], [0.5, 0.5]), sign="full - lora", n_tests=3)
@example(pair=([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]), sign="full - lora", n_tests=3)
def test_compare_methods_is_json_ready_and_in_range(pair, sign, n_tests):
    lora, full = pair
    seeds = list(range(len(lora)))
    try:
        out = stats.compare_methods(lora, full, seeds, n_tests=n_tests, n_resamples=200,
                                    sign=sign)
    except ValueError as e:
        assert len(lora) < 2 and "at least 2" in str(e)
        return
    json.dumps(out, allow_nan=False)  # no NaN or inf anywhere
    assert finite_or_none(out)
    if out["zero_spread"]:
        assert out["p"] is None and out["significant"] is False and out["note"]
    else:
        assert 0.0 <= out["p"] <= 1.0 and out["p"] <= out["p_bonferroni"] <= 1.0
    for m in ("lora", "full"):
        if out[m]["ci"] is not None and out[m]["mean"] is not None:
            lo, hi = out[m]["ci"]
            assert lo <= hi


@FAST
@given(pair=pairs)
def test_paired_statistics_are_defined_nan_for_zero_spread_or_a_value_error(pair):
    a, b = pair
    with np.errstate(all="ignore"):
        try:
            t, p = stats.paired_ttest(a, b)
            d = stats.cohens_d_paired(a, b)
        except ValueError:
            assert len(a) < 2
            return
    if stats.zero_spread(a, b):
        assert math.isnan(t) and math.isnan(p) and math.isnan(d)
    else:
        assert 0.0 <= p <= 1.0 and not math.isnan(t) and not math.isnan(d)


@FAST
@given(values=st.lists(value, min_size=1, max_size=6), confidence=st.floats(0.01, 0.99))
def test_bootstrap_ci_contains_nothing_outside_the_values(values, confidence):
    with np.errstate(all="ignore"):
        lo, hi = stats.bootstrap_ci(values, n_resamples=100, confidence=confidence)
    assert min(values) - 1e-9 * abs(min(values)) <= lo <= hi <= max(values) + 1e-9 * abs(
        max(values))


@FAST
@given(values=st.lists(st.one_of(value, st.sampled_from([math.nan, math.inf])), max_size=4))
def test_non_finite_or_empty_values_are_value_errors(values):
    if values and all(math.isfinite(v) for v in values):
        return
    with pytest.raises(ValueError, match="NaN or inf|is empty"):
        stats.bootstrap_ci(values, n_resamples=10)


@FAST
@given(b=st.integers(-3, 10**6), c=st.integers(-3, 10**6), k=st.integers(-2, 10**6),
       n=st.integers(-2, 10**6), confidence=st.floats(-1, 2))
def test_mcnemar_and_wilson_are_in_range_or_a_value_error(b, c, k, n, confidence):
    try:
        p = stats.exact_mcnemar(b, c)
        assert 0.0 <= p <= 1.0
    except ValueError:
        assert min(b, c) < 0
    try:
        lo, hi = stats.wilson_interval(k, n, confidence)
    except ValueError:
        assert not (n >= 1 and 0 <= k <= n and 0 < confidence < 1)
        return
    assert 0.0 <= lo <= k / n <= hi <= 1.0


# ---- the failing examples Hypothesis found, kept as explicit tests


def test_tiny_differences_are_tested_not_nan():
    """Differences near 1e-241 squared to 0: ttest_rel gave t = 0/0 = NaN although the
    differences are not equal. t is scale-free: t = 0, p = 1 for differences +x, -x."""
    a, b = [0.0, -2.2617709156083436e-241], [-2.2617709156083436e-241, 0.0]
    assert not stats.zero_spread(a, b)
    assert stats.paired_ttest(a, b) == pytest.approx((0.0, 1.0))
    assert stats.cohens_d_paired(a, b) == 0.0
    # the same data scaled to ordinary magnitudes gives the same t, p and d
    a2, b2 = [0.1, 0.3, 0.2], [0.0, 0.1, 0.15]
    tiny = [x * 1e-250 for x in a2], [x * 1e-250 for x in b2]
    assert stats.paired_ttest(*tiny) == pytest.approx(stats.paired_ttest(a2, b2), rel=1e-12)
    assert stats.cohens_d_paired(*tiny) == pytest.approx(stats.cohens_d_paired(a2, b2))


def test_huge_values_give_a_finite_sd_not_inf():
    """1e300 values overflowed numpy's std to inf, which JSON cannot hold."""
    out = stats.compare_methods([1e300, 1e300, -1e300], [0.0, 0.0, 0.0], [1, 2, 3],
                                n_resamples=50)
    assert out["lora"]["sd"] == pytest.approx(2e300 / math.sqrt(3))
    json.dumps(out, allow_nan=False)


def test_delta_percent_beyond_float_range_is_undefined():
    with pytest.raises(ValueError, match="float64's range"):
        stats.delta_percent([1e-12, 1e-12], [1e300, 1e300])
    out = stats.compare_methods([1e300, 1e300], [1e-12, 2e-12], [1, 2], n_resamples=50)
    assert out["delta_percent"] is None and out["delta_percent_ci"] is None


def test_wilson_interval_contains_the_observed_proportion_exactly():
    """At k = 0 rounding put the lower bound at 2.2e-17 > 0 = k/n."""
    assert stats.wilson_interval(0, 5)[0] == 0.0
    assert stats.wilson_interval(5, 5)[1] == 1.0
