"""Statistics for LoRA vs full fine-tuning, paired by seed.

Per task and per layer (or per task for averaged drift and accuracy) each
method gives one value per training seed; LoRA and full fine-tuning are run
with the same seeds, so values are paired by seed:

- :func:`paired_ttest` -- two-sided paired t-test on ``lora - full``
  (``scipy.stats.ttest_rel``).
- :func:`cohens_d_paired` -- ``mean(diff) / sd(diff, ddof=1)``.
- :func:`bonferroni`, :func:`bonferroni_alpha` -- family-wise correction over
  tasks (three GLUE tasks: alpha = 0.05 / 3).
- :func:`bootstrap_ci`, :func:`bootstrap_reduction_ci` -- percentile bootstrap
  with a fixed seed; the reduction CI resamples seed pairs jointly.
- :func:`delta_percent` -- ``100 * (mean(full) - mean(lora)) / mean(full)``.
- :func:`compare_methods` -- all of the above as one JSON-ready dict.

Zero-variance differences (every ``lora - full`` equal, to float64 rounding
of the inputs) are decided, not left to 0/0: all differences 0 ->
``t = 0, p = 1, d = 0`` (no evidence of any difference); all equal and
nonzero -> ``t = d = +-inf, p = 0`` (the limit as the spread of a fixed
nonzero shift goes to 0).

Pitfalls of the study's published code that this module avoids: its p-value
came from a one-sample t-test on per-seed percentage reductions (a different
hypothesis, on a ratio scale, from the paired test of the measured values);
its Cohen's d used ``ddof=0`` (inflating d by ``sqrt(n/(n-1))``, 22% at
n = 3); its bootstrap CIs were never computed.

With three seeds every test has 2 degrees of freedom and a bootstrap has
only 3^3 = 27 distinct resamples: report the per-seed values next to any
p-value or interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import scipy.stats

__all__ = [
    "paired_ttest",
    "cohens_d_paired",
    "bonferroni",
    "bonferroni_alpha",
    "bootstrap_ci",
    "bootstrap_reduction_ci",
    "delta_percent",
    "compare_methods",
]


def _vector(values, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per seed), got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf: {x.tolist()}")
    return x


def _constant_difference(a: np.ndarray, b: np.ndarray) -> float | None:
    """The common value of ``a - b`` if all differences are equal, else None.

    "Equal" means within float64 rounding of the inputs (16 ulps of the
    largest magnitude): 0.1 - 0.2 and 0.3 - 0.4 differ in the last bits, and
    a t statistic of 1e16 from that noise would be meaningless. A common value
    within the same tolerance of 0 is returned as exactly 0.0.
    """
    diff = a - b
    tol = 16 * np.finfo(np.float64).eps * max(float(np.abs(a).max()), float(np.abs(b).max()))
    if float(np.ptp(diff)) > tol:
        return None
    mean = float(diff.mean())
    return 0.0 if abs(mean) <= tol else mean


def _paired(a, b, min_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    a = _vector(a, "a")
    b = _vector(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal lengths, got {a.size} and {b.size}")
    if a.size < min_n:
        raise ValueError(f"need at least {min_n} pairs, got {a.size}")
    return a, b


def paired_ttest(a, b) -> tuple[float, float]:
    """Two-sided paired t-test of ``a - b`` against 0.

    Args:
        a, b: equal-length 1-D sequences, paired by position (seed), n >= 2.

    Returns:
        ``(t, p)``: ``scipy.stats.ttest_rel(a, b)`` with n - 1 degrees of
        freedom. If every difference is identical (to float64 rounding):
        ``(0.0, 1.0)`` when they are all 0, ``(+-inf, 0.0)`` otherwise (see
        the module docstring).

    Raises:
        ValueError: unequal lengths, n < 2, non-finite values.
    """
    a, b = _paired(a, b)
    const = _constant_difference(a, b)
    if const is not None:
        return (0.0, 1.0) if const == 0.0 else (math.copysign(math.inf, const), 0.0)
    res = scipy.stats.ttest_rel(a, b)
    return float(res.statistic), float(res.pvalue)


def cohens_d_paired(a, b) -> float:
    """Cohen's d for paired samples (d_z): ``mean(a - b) / sd(a - b, ddof=1)``.

    Uses the sample standard deviation (ddof=1), as the t statistic does, so
    ``t = d * sqrt(n)``. The study used ddof=0, which inflates d by
    ``sqrt(n / (n - 1))``. Identical differences: 0.0 if all are 0, else
    ``+-inf``.

    Raises:
        ValueError: unequal lengths, n < 2, non-finite values.
    """
    a, b = _paired(a, b)
    const = _constant_difference(a, b)
    if const is not None:
        return 0.0 if const == 0.0 else math.copysign(math.inf, const)
    diff = a - b
    return float(diff.mean() / diff.std(ddof=1))


def bonferroni(p_values, n_tests: int | None = None):
    """Bonferroni-adjusted p-values: ``min(1, p * n_tests)``.

    Args:
        p_values: one p-value or a sequence of them.
        n_tests: size of the family; default the number of p-values given.
            Pass it when adjusting one task's p-value for all tasks
            (``n_tests=3``).

    Returns:
        A float for a scalar input, else a float64 array of the same shape.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    m = p.size if n_tests is None else n_tests
    if m < 1 or m < p.size:
        raise ValueError(f"n_tests must be >= the number of p-values ({p.size}), got {m}")
    adjusted = np.minimum(p * m, 1.0)
    return float(adjusted) if adjusted.ndim == 0 else adjusted


def bonferroni_alpha(n_tests: int, alpha: float = 0.05) -> float:
    """Per-test significance level ``alpha / n_tests`` (0.05 / 3 for three tasks)."""
    if n_tests < 1:
        raise ValueError(f"n_tests must be >= 1, got {n_tests}")
    return alpha / n_tests


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_ci(
    values,
    stat: Callable[..., np.ndarray] = np.mean,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat(values)``.

    Args:
        values: 1-D sample (e.g. one value per seed).
        stat: statistic; called once as ``stat(resamples, axis=1)`` on a
            ``[n_resamples, n]`` array, so it must take ``axis`` (numpy
            reductions do).
        n_resamples: bootstrap resamples (with replacement, size n each).
        confidence: two-sided level; the interval is the
            ``(1-c)/2, (1+c)/2`` percentiles of the resampled statistic.
        seed: seed of ``numpy.random.default_rng``; same seed, same interval.

    Returns:
        ``(low, high)``. A single value gives ``(value, value)``.
    """
    x = _vector(values, "values")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    return _percentile_interval(np.asarray(stat(x[idx], axis=1)), confidence)


def delta_percent(drift_full, drift_lora) -> float:
    """Relative reduction of LoRA vs full fine-tuning, in percent of full.

    ``100 * (mean(drift_full) - mean(drift_lora)) / mean(drift_full)``:
    positive when LoRA drifts less. Means are taken first (ratio of means),
    not the mean of per-seed ratios.

    Raises:
        ValueError: mean of ``drift_full`` is 0 (the ratio is undefined).
    """
    full = _vector(drift_full, "drift_full")
    lora = _vector(drift_lora, "drift_lora")
    if full.mean() == 0.0:
        raise ValueError("delta_percent is undefined: the mean of drift_full is 0")
    return float(100.0 * (full.mean() - lora.mean()) / full.mean())


def bootstrap_reduction_ci(
    drift_full,
    drift_lora,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of :func:`delta_percent`, resampling seed pairs.

    Each resample draws seed indices with replacement and takes the same
    indices from both methods, keeping the pairing.

    Returns:
        ``(low, high)`` in percent.

    Raises:
        ValueError: unequal lengths, or a resample whose full fine-tuning mean
            is 0.
    """
    full, lora = _paired(drift_full, drift_lora, min_n=1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, full.size, size=(n_resamples, full.size))
    full_means = full[idx].mean(axis=1)
    lora_means = lora[idx].mean(axis=1)
    if np.any(full_means == 0.0):
        raise ValueError("delta_percent is undefined in a resample: mean of drift_full is 0")
    return _percentile_interval(100.0 * (full_means - lora_means) / full_means, confidence)


def _json_float(x: float) -> float | None:
    """Plain float for JSON; NaN and +-inf become None (JSON has no inf)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _summary(x: np.ndarray, boot: dict) -> dict:
    """Mean, sd (ddof=1), the values and the bootstrap CI of the mean of one method."""
    return {
        "mean": float(x.mean()),
        "sd": float(x.std(ddof=1)),
        "per_seed": [float(v) for v in x],
        "ci": list(bootstrap_ci(x, **boot)),
    }


def compare_methods(
    lora_values,
    full_values,
    seeds: Sequence[int],
    n_tests: int = 1,
    alpha: float = 0.05,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Everything the report needs to compare LoRA with full fine-tuning.

    Args:
        lora_values, full_values: one value per seed (e.g. drift averaged over
            layers, or one layer's drift, or accuracy), paired by position.
        seeds: the training seeds, in the same order.
        n_tests: Bonferroni family size (3 for three tasks).
        alpha: family-wise significance level.
        n_resamples, confidence, seed: bootstrap settings.

    Returns:
        A JSON-serializable dict (plain floats, ints, bools, lists):

        - ``seeds``, ``n_seeds``
        - ``lora`` / ``full``: ``mean``, ``sd`` (ddof=1),
          ``per_seed`` (values in ``seeds`` order), ``ci`` ([low, high] of the
          mean, percentile bootstrap)
        - ``delta_percent``: ``100 * (mean full - mean lora) / mean full``
          (None if the full mean is 0), ``delta_percent_ci``: seed-paired
          bootstrap interval (None if some resample's full mean is 0)
        - ``t``, ``p``: paired t-test of ``lora - full`` (two-sided, n-1 df)
        - ``n_tests``, ``alpha``, ``p_bonferroni``, ``significant``
          (``p_bonferroni < alpha``)
        - ``cohens_d``: ``mean(lora - full) / sd(lora - full, ddof=1)``
        - ``test``: a one-line description of the test

        Non-finite numbers (t and d when every difference is the same nonzero
        value) are encoded as None; ``p`` then is 0.0 and says which way by
        the sign of ``mean(lora) - mean(full)``.
    """
    lora, full = _paired(lora_values, full_values)
    seeds = [int(s) for s in seeds]
    if len(seeds) != lora.size:
        raise ValueError(f"got {len(seeds)} seeds for {lora.size} values per method")
    boot = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)
    t, p = paired_ttest(lora, full)
    p_adj = bonferroni(p, n_tests)
    # Delta% is undefined when the full fine-tuning mean (overall, or in some
    # resample) is 0: report None rather than inf/NaN.
    try:
        delta = delta_percent(full, lora)
    except ValueError:
        delta = None
    try:
        delta_ci = list(bootstrap_reduction_ci(full, lora, **boot))
    except ValueError:
        delta_ci = None
    return {
        "seeds": seeds,
        "n_seeds": len(seeds),
        "lora": _summary(lora, boot),
        "full": _summary(full, boot),
        "delta_percent": delta,
        "delta_percent_ci": delta_ci,
        "t": _json_float(t),
        "p": float(p),
        "n_tests": int(n_tests),
        "alpha": float(alpha),
        "p_bonferroni": float(p_adj),
        "significant": bool(p_adj < alpha),
        "cohens_d": _json_float(cohens_d_paired(lora, full)),
        "test": "two-sided paired t-test (scipy.stats.ttest_rel) of lora - full, paired by seed",
    }
