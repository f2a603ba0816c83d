"""Learned or not: a model's validation interval against the majority-class score.

Expected values are hand computations (Wilson 1927's formula worked on paper) or
counter-examples (a model below the majority; a constant predictor's F1)."""

from __future__ import annotations

import numpy as np
import pytest

from loralens.analysis.learned import (
    accuracy_interval, bootstrap_score_interval, verdict,
)


def test_wilson_interval_of_80_of_100_by_hand():
    # p = 0.8, z = 1.959964, z^2 = 3.841459: centre 0.8 + z^2/200 = 0.819207,
    # half = z sqrt(0.0016 + z^2/40000) = 0.080717, denominator 1 + z^2/100 = 1.038415
    lo, hi = accuracy_interval(0.80, 100)
    assert lo == pytest.approx(0.7112, abs=1e-4) and hi == pytest.approx(0.8666, abs=1e-4)


def test_a_model_below_the_majority_is_not_above_it():
    # the quick run: MRPC accuracy 0.625 on 408 rows, majority class 0.684
    v = verdict("accuracy", 0.625, 408, 0.684)
    assert v["above_majority"] is False and v["interval"] == "95% Wilson"
    assert v["ci"][1] < 0.684 + 0.05


def test_a_model_just_above_the_majority_point_is_not_shown_to_learn():
    # 0.686 vs 0.684: the point is above, the lower bound (about 0.639) is not
    v = verdict("accuracy", 0.686, 408, 0.684)
    assert v["above_majority"] is False and v["ci"][0] == pytest.approx(0.6393, abs=5e-4)


def test_lower_bound_decides_on_either_side():
    assert verdict("accuracy", 0.80, 100, 0.70)["above_majority"] is True    # 0.7112 > 0.70
    assert verdict("accuracy", 0.80, 100, 0.72)["above_majority"] is False   # 0.7112 <= 0.72


def test_f1_without_predictions_says_why():
    v = verdict("f1", 0.81, 408, 0.81)
    assert v["above_majority"] is None and "val_logits.npy" in v["why"]


def test_bootstrap_of_perfect_predictions_is_a_point():
    labels = np.array([0, 1] * 25)
    assert bootstrap_score_interval(labels, labels, "f1") == (1.0, 1.0)


def test_constant_predictor_f1_is_not_above_the_majority():
    # always "1" with 68 of 100 labels 1: F1 = 2*68 / (2*68 + 32) = 0.8095, the majority's own
    labels = np.array([1] * 68 + [0] * 32)
    pred = np.ones(100, dtype=int)
    v = verdict("f1", 0.8095, 100, 136 / 168, pred=pred, labels=labels)
    assert v["above_majority"] is False
    lo, hi = v["ci"]
    assert lo < 136 / 168 < hi and "bootstrap" in v["interval"]


def test_bootstrap_is_seeded_and_near_wilson_for_accuracy():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 100)
    pred = labels.copy()
    pred[:20] = 1 - pred[:20]  # 80 of 100 right
    a = bootstrap_score_interval(pred, labels, "accuracy")
    assert a == bootstrap_score_interval(pred, labels, "accuracy")
    assert a[0] == pytest.approx(0.7112, abs=0.02) and a[1] == pytest.approx(0.8666, abs=0.02)
