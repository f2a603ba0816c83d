"""Classification metrics from predicted and true class ids: accuracy, F1 (binary F1 of
class 1 for two classes, macro F1 for more) and Matthews correlation (any number of
classes), pure numpy.
"""

from __future__ import annotations

import math

import numpy as np


def f1_binary(pred: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    tp = int(((pred == positive) & (labels == positive)).sum())
    fp = int(((pred == positive) & (labels != positive)).sum())
    fn = int(((pred != positive) & (labels == positive)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def f1_macro(pred: np.ndarray, labels: np.ndarray) -> float:
    """The unweighted mean of per-class F1 over the classes that occur in ``labels`` or
    ``pred`` (scikit-learn's ``f1_score(average="macro")``)."""
    classes = np.union1d(np.unique(labels), np.unique(pred))
    return float(np.mean([f1_binary(pred, labels, int(c)) for c in classes]))


def matthews(pred: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin 2004, the R_K
    statistic; equal to the phi coefficient for two classes); 0 where it is undefined
    (one class predicted or present), as scikit-learn returns."""
    pred, labels = np.asarray(pred, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    n = len(labels)
    p = np.bincount(pred, minlength=num_labels).astype(float)
    t = np.bincount(labels, minlength=num_labels).astype(float)
    c = float((pred == labels).sum())
    denominator = math.sqrt((n * n - float(p @ p)) * (n * n - float(t @ t)))
    return 0.0 if denominator == 0 else (c * n - float(p @ t)) / denominator


def scores(pred: np.ndarray, labels: np.ndarray, num_labels: int) -> dict:
    """{"accuracy", "f1", "mcc"} of predicted class ids against true ones."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    f1 = f1_binary(pred, labels) if num_labels <= 2 else f1_macro(pred, labels)
    return {"accuracy": float((pred == labels).mean()), "f1": f1,
            "mcc": matthews(pred, labels, num_labels)}
