"""stats.rank_trend: Spearman's rho per seed, averaged, with a permutation p over the
orderings of each seed's values (issue 27.4c: a trend over ranks tested across seeds, not
read off two seeds). Expected values computed by hand in the comments."""

import math

import pytest

from loralens.analysis import stats


def test_two_seeds_both_increasing_hits_the_smallest_exact_p():
    # 3 ranks: 3! = 6 orderings per seed, 36 joint ones; only (increasing, increasing) has
    # mean rho = 1 (one-sided p = 1/36), and (decreasing, decreasing) mean rho = -1 too
    # (two-sided p = 2/36)
    v = {42: {1: 0.1, 8: 0.2, 64: 0.9}, 1337: {1: 0.0, 8: 0.5, 64: 0.6}}
    r = stats.rank_trend(v, alternative="greater")
    assert r["rho"] == pytest.approx(1.0)
    assert r["rho_per_seed"] == {"42": pytest.approx(1.0), "1337": pytest.approx(1.0)}
    assert r["p"] == pytest.approx(1 / 36)
    assert r["exact"] is True and r["orderings"] == 36 and r["ranks"] == [1, 8, 64]
    assert stats.rank_trend(v)["p"] == pytest.approx(2 / 36)
    assert stats.rank_trend(v, alternative="less")["p"] == pytest.approx(1.0)


def test_partial_trend_by_hand():
    # per seed, rho over 3 orderings = 1 - sum(d^2)/4: 1 (x1), 0.5 (x2), -0.5 (x2), -1 (x1).
    # seed 42 increasing (1), seed 7 [1, 3, 2] (sum d^2 = 2: rho 0.5): mean 0.75, sum 1.5.
    # joint sums >= 1.5: (1, 1) 1 + (1, .5) 2 + (.5, 1) 2 = 5 of 36; |sum| >= 1.5: 10 of 36
    v = {42: {1: 1.0, 2: 2.0, 4: 3.0}, 7: {1: 1.0, 2: 3.0, 4: 2.0}}
    r = stats.rank_trend(v, alternative="greater")
    assert r["rho"] == pytest.approx(0.75)
    assert r["rho_per_seed"]["7"] == pytest.approx(0.5)
    assert r["p"] == pytest.approx(5 / 36)
    assert stats.rank_trend(v)["p"] == pytest.approx(10 / 36)


def test_reading_monotonic_off_two_seeds_is_not_significant_at_two_ranks():
    # 2 ranks, 2 seeds, both increasing: 2! x 2! = 4 orderings, p (two-sided) = 2/4
    r = stats.rank_trend({1: {1: 0.1, 64: 0.2}, 2: {1: 0.3, 64: 0.4}})
    assert r["rho"] == pytest.approx(1.0) and r["p"] == pytest.approx(0.5)


def test_constant_seed_is_undefined_and_short_seed_left_out():
    r = stats.rank_trend({1: {1: 0.5, 8: 0.5, 64: 0.5}, 2: {1: 0.1, 8: 0.2, 64: 0.3}})
    assert r["rho"] is None and r["p"] is None
    r = stats.rank_trend({1: {8: 0.5}, 2: {1: 0.1, 8: 0.2, 64: 0.3}}, alternative="greater")
    assert r["n_seeds"] == 1 and r["p"] == pytest.approx(1 / 6)
    assert stats.rank_trend({})["p"] is None


def test_monte_carlo_agrees_with_the_exact_value(monkeypatch):
    monkeypatch.setattr(stats, "EXACT_TREND_LIMIT", 1)  # force the random orderings
    v = {42: {1: 0.1, 8: 0.2, 64: 0.9}, 1337: {1: 0.0, 8: 0.5, 64: 0.6}}
    r = stats.rank_trend(v, alternative="greater", draws=20_000, seed=3)
    assert r["exact"] is False
    assert math.isclose(r["p"], 1 / 36, abs_tol=0.005)
    with pytest.raises(ValueError, match="alternative"):
        stats.rank_trend(v, alternative="up")
