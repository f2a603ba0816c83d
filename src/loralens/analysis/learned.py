"""Did a model learn its task? Its validation score's 95% interval against the majority class.

A model whose interval's lower bound is at or below the majority-class score (the score
of always predicting the training split's most frequent label) is *not shown to have
learned the task*; this includes models scoring below the majority. Comparisons that
involve such a model (drift, weight change, forgetting) compare models that may not have
learned anything, and the report says so wherever they appear.

Intervals: accuracy gets the Wilson score interval of ``k`` correct out of ``n``
(:func:`stats.wilson_interval`); F1 and MCC, which are not proportions, get a percentile
bootstrap over the validation examples (fixed seed), from the model's per-example
predictions (``val_logits.npy``) and the labels.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from loralens.analysis import stats
from loralens.training.metrics import scores

log = logging.getLogger(__name__)

CONFIDENCE = 0.95
N_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
PROPORTIONS = ("accuracy",)   # metrics whose interval is Wilson's; the rest: bootstrap


def accuracy_interval(accuracy: float, n: int, confidence: float = CONFIDENCE
                      ) -> tuple[float, float]:
    """Wilson interval of an accuracy measured on ``n`` examples (``k = round(accuracy n)``)."""
    k = int(round(float(accuracy) * int(n)))
    return stats.wilson_interval(k, int(n), confidence)


def bootstrap_score_interval(pred, labels, metric: str, num_labels: int = 2,
                             n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                             seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric`` (``f1``, ``mcc``, ``accuracy``: as
    :func:`training.metrics.scores` computes it) resampling the validation examples.

    Args:
        pred, labels: predicted and true class ids, one per validation example.
        metric: a key of ``scores(...)``.
        seed: seed of ``numpy.random.default_rng``: the same inputs give the same interval.

    Returns:
        ``(low, high)``, the ``(1-c)/2`` and ``(1+c)/2`` percentiles of the resampled metric.
    """
    pred, labels = np.asarray(pred, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if pred.shape != labels.shape or pred.ndim != 1 or pred.size == 0:
        raise ValueError(f"need two equal-length 1-D arrays, got {pred.shape} and {labels.shape}")
    if metric not in scores(pred[:1], labels[:1], num_labels):
        raise ValueError(f"unknown metric {metric!r}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, pred.size, size=(n_resamples, pred.size))
    vals = np.array([scores(pred[i], labels[i], num_labels)[metric] for i in idx])
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(vals, [tail, 100.0 - tail])
    return float(low), float(high)


def verdict(metric: str, value: float | None, n: int | None, majority: float | None,
            pred=None, labels=None, num_labels: int = 2) -> dict:
    """One model's score, its 95% interval and whether it is above the majority class.

    Returns ``{"metric", "value", "ci", "interval", "majority", "above_majority", "why"}``:
    ``above_majority`` is True when the interval's lower bound exceeds ``majority``, False
    when it is at or below it, None when no interval could be computed (``why`` says why).
    """
    out = {"metric": metric, "value": value, "ci": None, "interval": "", "majority": majority,
           "above_majority": None, "why": ""}
    if value is None or not math.isfinite(float(value)):
        out["why"] = f"no validation {metric}"
        return out
    if metric in PROPORTIONS:
        if not n:
            out["why"] = "no validation row count"
            return out
        out["ci"], out["interval"] = list(accuracy_interval(value, n)), "95% Wilson"
    elif pred is None or labels is None:
        out["why"] = ("no per-example predictions (val_logits.npy) and labels: no "
                      f"interval for {metric}")
        return out
    else:
        out["ci"] = list(bootstrap_score_interval(pred, labels, metric, num_labels))
        out["interval"] = (f"95% percentile bootstrap over validation examples "
                           f"({N_RESAMPLES} resamples, seed {BOOTSTRAP_SEED})")
    if majority is None or not math.isfinite(float(majority)):
        out["why"] = "no majority-class score"
        return out
    out["above_majority"] = bool(out["ci"][0] > float(majority))
    return out
