"""Statistics for LoRA vs full fine-tuning: paired by seed, and paired by example.

Per task and per layer (or per task for averaged drift and accuracy) each
method gives one value per training seed; LoRA and full fine-tuning are run
with the same seeds, so values are paired by seed:

- :func:`paired_ttest` -- two-sided paired t-test on ``a - b``
  (``scipy.stats.ttest_rel``).
- :func:`cohens_d_paired` -- ``mean(a - b) / sd(a - b, ddof=1)``.
- :func:`bonferroni`, :func:`bonferroni_alpha` -- family-wise correction over
  the tests of one family (the caller says which tests that is).
- :func:`bootstrap_ci`, :func:`bootstrap_reduction_ci` -- percentile bootstrap
  with a fixed seed; the reduction CI resamples seed pairs jointly.
- :func:`distinct_resamples` -- how many different resamples a bootstrap of
  n values can draw at all.
- :func:`delta_percent` -- ``100 * (mean(full) - mean(lora)) / mean(full)``.
- :func:`compare_methods` -- all of the above as one JSON-ready dict.
- :func:`rank_trend` -- a trend over an ordered factor (LoRA's rank) across seeds:
  Spearman's rho per seed, averaged, with an exact permutation p over the orderings of
  each seed's values.

The evaluation set has its own uncertainty, which seed statistics do not show;
for two classifiers scored on the same examples:

- :func:`exact_mcnemar` -- exact (binomial) McNemar test on the discordant
  examples.
- :func:`wilson_interval` -- Wilson score interval of one accuracy.

Zero spread (every paired difference equal, to float64 rounding of the
inputs) is undefined, never significant: the t statistic is ``c / 0`` (or
``0 / 0``) and says nothing about a population. :func:`paired_ttest` and
:func:`cohens_d_paired` return NaN there, and :func:`compare_methods` reports
``p = None``, ``significant = False``, ``zero_spread = True``. With
accuracies on a 1/n grid, three seeds, or a method whose drift is 0 by
construction, it happens; an earlier version reported ``p = 0``
("significant") for it.

Pitfalls of the study's published code that this module avoids: its p-value
came from a one-sample t-test on per-seed percentage reductions (a different
hypothesis, on a ratio scale, from the paired test of the measured values);
its Cohen's d used ``ddof=0`` (inflating d by ``sqrt(n/(n-1))``, 22% at
n = 3); its bootstrap CIs were never computed.

With three seeds every test has 2 degrees of freedom, and a bootstrap of
three values can draw only ``C(5, 3) = 10`` distinct resamples (multisets),
however many it is asked for: report the per-seed values next to any p-value
or interval.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import scipy.stats

__all__ = [
    "paired_ttest",
    "cohens_d_paired",
    "zero_spread",
    "bonferroni",
    "bonferroni_alpha",
    "holm",
    "CORRECTIONS",
    "adjust_p",
    "bootstrap_ci",
    "bootstrap_reduction_ci",
    "distinct_resamples",
    "delta_percent",
    "compare_methods",
    "exact_mcnemar",
    "wilson_interval",
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


def _scaled_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a - b`` divided by its largest magnitude. t, p and Cohen's d do not depend on the
    scale, and scaled values square without underflow (differences near 1e-200 gave a
    variance of 0, so t = 0/0) or overflow (near 1e200: an infinite variance)."""
    diff = a - b
    if not np.isfinite(diff).all():  # a - b beyond float64's range: halve both first
        diff = a / 2 - b / 2
    scale = float(np.abs(diff).max())
    return diff / scale if scale > 0 else diff


def _sd(x: np.ndarray) -> float:
    """Sample standard deviation (ddof=1), computed on ``x`` scaled as above."""
    scale = float(np.abs(x).max())
    return 0.0 if scale == 0 else scale * float((x / scale).std(ddof=1))


def _paired(a, b, min_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    a = _vector(a, "a")
    b = _vector(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal lengths, got {a.size} and {b.size}")
    if a.size < min_n:
        raise ValueError(f"need at least {min_n} pairs, got {a.size}")
    return a, b


def zero_spread(a, b) -> bool:
    """Whether every paired difference ``a - b`` is the same (to float64 rounding of the
    inputs): the paired t-test and Cohen's d are then undefined."""
    a, b = _paired(a, b)
    return _constant_difference(a, b) is not None


def paired_ttest(a, b) -> tuple[float, float]:
    """Two-sided paired t-test of ``a - b`` against 0.

    Args:
        a, b: equal-length 1-D sequences, paired by position (seed), n >= 2.

    Returns:
        ``(t, p)``: ``scipy.stats.ttest_rel(a, b)`` with n - 1 degrees of
        freedom. Zero spread (every difference identical, to float64
        rounding): ``(nan, nan)``, undefined (module docstring).

    Raises:
        ValueError: unequal lengths, n < 2, non-finite values.
    """
    a, b = _paired(a, b)
    if _constant_difference(a, b) is not None:
        return math.nan, math.nan
    res = scipy.stats.ttest_1samp(_scaled_difference(a, b), 0.0)  # = ttest_rel(a, b)
    return float(res.statistic), float(res.pvalue)


def cohens_d_paired(a, b) -> float:
    """Cohen's d for paired samples (d_z): ``mean(a - b) / sd(a - b, ddof=1)``.

    Uses the sample standard deviation (ddof=1), as the t statistic does, so
    ``t = d * sqrt(n)``. The study used ddof=0, which inflates d by
    ``sqrt(n / (n - 1))``. Positive when ``a`` is larger; the caller states
    the order. Zero spread (identical differences): NaN.

    Raises:
        ValueError: unequal lengths, n < 2, non-finite values.
    """
    a, b = _paired(a, b)
    if _constant_difference(a, b) is not None:
        return math.nan
    diff = _scaled_difference(a, b)
    return float(diff.mean() / diff.std(ddof=1))


def bonferroni(p_values, n_tests: int | None = None):
    """Bonferroni-adjusted p-values: ``min(1, p * n_tests)``.

    Args:
        p_values: one p-value or a sequence of them.
        n_tests: size of the family; default the number of p-values given.
            Pass it when adjusting one p-value for a family of tests made
            elsewhere (e.g. one per task and measure).

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
    """Per-test significance level ``alpha / n_tests``."""
    if n_tests < 1:
        raise ValueError(f"n_tests must be >= 1, got {n_tests}")
    return alpha / n_tests


def _family_p(p_values, n_tests: int | None) -> tuple[np.ndarray, int]:
    """p-values as float64 (NaN = undefined, allowed) and the family size ``m``."""
    p = np.atleast_1d(np.asarray(p_values, dtype=np.float64))
    if p.ndim != 1:
        raise ValueError(f"p-values must be 1-D, got shape {p.shape}")
    defined = p[~np.isnan(p)]
    if np.any((defined < 0) | (defined > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    m = p.size if n_tests is None else int(n_tests)
    if m < 1 or m < p.size:
        raise ValueError(f"n_tests must be >= the number of p-values ({p.size}), got {m}")
    return p, m


def holm(p_values, n_tests: int | None = None) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979): the family-wise error rate of
    Bonferroni, never less power (each adjusted p is at most Bonferroni's).

    Sorted ascending, the i-th smallest (i = 1..m) is multiplied by ``m - i + 1``;
    adjusted values are made monotone (running maximum) and capped at 1.

    Args:
        p_values: the family's p-values; NaN marks a test that is undefined (zero
            spread): it stays in the family (counted in ``m``), ranks last (as p = 1,
            which changes no other test's multiplier) and its adjusted value is NaN.
        n_tests: the declared family size ``m`` (default: the number given). Tests of
            the family not given (not computed yet) count as p = 1, ranked last: the
            adjusted values given are then at least what the whole family would give.

    Returns:
        A float64 array in the input's order.
    """
    p, m = _family_p(p_values, n_tests)
    filled = np.where(np.isnan(p), 1.0, p)
    order = np.argsort(filled, kind="stable")
    steps = (m - np.arange(p.size)) * filled[order]
    adjusted_sorted = np.minimum(np.maximum.accumulate(steps), 1.0)
    out = np.empty(p.size)
    out[order] = adjusted_sorted
    out[np.isnan(p)] = np.nan
    return out


CORRECTIONS = ("holm", "bonferroni")


def adjust_p(p_values, method: str, n_tests: int | None = None) -> np.ndarray:
    """Family-wise adjusted p-values by ``method`` (:data:`CORRECTIONS`): :func:`holm` or
    :func:`bonferroni`; NaN (undefined) stays NaN and counts in ``n_tests``."""
    if method not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {method!r}")
    p, m = _family_p(p_values, n_tests)
    if method == "holm":
        return holm(p, m)
    return np.minimum(p * m, 1.0)  # NaN * m stays NaN


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


def distinct_resamples(n: int) -> int:
    """Distinct bootstrap resamples of ``n`` values: multisets of size n from n items,
    ``C(2n - 1, n)`` (1, 3, 10, 35, 126 for n = 1..5). A percentile interval from
    three seeds rests on 10 distinct values of the statistic, whatever
    ``n_resamples`` is."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.comb(2 * n - 1, n)


def delta_percent(drift_full, drift_lora) -> float:
    """Relative reduction of LoRA vs full fine-tuning, in percent of full.

    ``100 * (mean(drift_full) - mean(drift_lora)) / mean(drift_full)``:
    positive when LoRA drifts less. Means are taken first (ratio of means),
    not the mean of per-seed ratios.

    Raises:
        ValueError: mean of ``drift_full`` is 0, or the ratio beyond float64's range
            (undefined).
    """
    full = _vector(drift_full, "drift_full")
    lora = _vector(drift_lora, "drift_lora")
    if full.mean() == 0.0:
        raise ValueError("delta_percent is undefined: the mean of drift_full is 0")
    with np.errstate(over="ignore"):
        delta = float(100.0 * (full.mean() - lora.mean()) / full.mean())
    if not math.isfinite(delta):
        raise ValueError("delta_percent is undefined: the ratio exceeds float64's range")
    return delta


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
    with np.errstate(over="ignore", invalid="ignore"):
        ratios = 100.0 * (full_means - lora_means) / full_means
    if not np.isfinite(ratios).all():
        raise ValueError("delta_percent is undefined in a resample: the ratio exceeds "
                         "float64's range")
    return _percentile_interval(ratios, confidence)


def _json_float(x: float) -> float | None:
    """Plain float for JSON; NaN and +-inf become None (JSON has no inf)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _summary(x: np.ndarray, boot: dict) -> dict:
    """Mean, sd (ddof=1), the values and the bootstrap CI of the mean of one method."""
    return {
        "mean": _json_float(x.mean()),  # None only beyond float64's range
        "sd": _json_float(_sd(x)),
        "per_seed": [float(v) for v in x],
        "ci": list(bootstrap_ci(x, **boot)),
    }


SIGNS = ("lora - full", "full - lora")


def _checked_pairs(lora_values, full_values, seeds: Sequence[int],
                   sign: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Validated ``(lora, full, seeds)`` for :func:`compare_methods`."""
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}")
    lora, full = _paired(lora_values, full_values)
    seeds = [int(s) for s in seeds]
    if len(seeds) != lora.size:
        raise ValueError(f"got {len(seeds)} seeds for {lora.size} values per method")
    return lora, full, seeds


def _reduction_fields(full: np.ndarray, lora: np.ndarray, boot: dict) -> dict:
    """``delta_percent`` and its seed-paired bootstrap CI, each None where undefined."""
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
    return {"delta_percent": delta, "delta_percent_ci": delta_ci}


def _paired_test_fields(lora: np.ndarray, full: np.ndarray, sign: str, n_tests: int,
                        alpha: float) -> dict:
    """Paired t-test, Bonferroni and Cohen's d of the ``sign`` difference; on zero
    spread p, p_bonferroni and d are None, not significant, and ``note`` says why."""
    a, b = (lora, full) if sign == "lora - full" else (full, lora)
    t, p = paired_ttest(a, b)
    spread_is_zero = math.isnan(p)
    note = None
    if spread_is_zero:
        difference = float((a - b).mean())
        note = (f"zero spread: every paired difference ({sign}) is {difference:.4g}, "
                "so t, p and Cohen's d are undefined; not significant")
    p_corrected = None if spread_is_zero else bonferroni(p, n_tests)
    return {
        "sign": sign,
        "t": _json_float(t),
        "p": None if spread_is_zero else float(p),
        "n_tests": int(n_tests),
        "alpha": float(alpha),
        "p_bonferroni": None if spread_is_zero else float(p_corrected),
        "significant": False if spread_is_zero else bool(p_corrected < alpha),
        "cohens_d": _json_float(cohens_d_paired(a, b)),
        "zero_spread": spread_is_zero,
        "note": note,
        "test": f"two-sided paired t-test (scipy.stats.ttest_rel) of {sign}, paired by seed",
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
    sign: str = "lora - full",
) -> dict:
    """Everything the report needs to compare LoRA with full fine-tuning.

    Args:
        lora_values, full_values: one value per seed (e.g. drift averaged over
            layers, or one layer's drift, or accuracy), paired by position.
        seeds: the training seeds, in the same order.
        n_tests: Bonferroni family size: the number of tests in the family
            this one belongs to (the caller knows the family).
        alpha: family-wise significance level.
        n_resamples, confidence, seed: bootstrap settings.
        sign: the paired difference ``t`` and Cohen's d are computed on:
            ``"lora - full"`` (scores: positive when LoRA scores higher) or
            ``"full - lora"`` (drift, as the paper: positive when full
            fine-tuning drifts more). p does not depend on it.

    Returns:
        A JSON-serializable dict (plain floats, ints, bools, lists, None):

        - ``seeds``, ``n_seeds``
        - ``lora`` / ``full``: ``mean``, ``sd`` (ddof=1),
          ``per_seed`` (values in ``seeds`` order), ``ci`` ([low, high] of the
          mean, percentile bootstrap)
        - ``delta_percent``: ``100 * (mean full - mean lora) / mean full``
          (None if the full mean is 0), ``delta_percent_ci``: seed-paired
          bootstrap interval (None if some resample's full mean is 0)
        - ``bootstrap_distinct_resamples``: :func:`distinct_resamples` of
          ``n_seeds`` (10 for three seeds)
        - ``sign``; ``t``, ``p``: paired t-test of that difference
          (two-sided, n-1 df)
        - ``n_tests``, ``alpha``, ``p_bonferroni``, ``significant``
          (``p_bonferroni < alpha``)
        - ``cohens_d``: ``mean(diff) / sd(diff, ddof=1)`` of that difference
        - ``zero_spread``: every paired difference is the same; then ``t``,
          ``p``, ``p_bonferroni`` and ``cohens_d`` are None, ``significant``
          is False and ``note`` says why
        - ``note``: None, or why a statistic is undefined
        - ``test``: a one-line description of the test
    """
    lora, full, seeds = _checked_pairs(lora_values, full_values, seeds, sign)
    boot = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)
    return {
        "seeds": seeds,
        "n_seeds": len(seeds),
        "lora": _summary(lora, boot),
        "full": _summary(full, boot),
        **_reduction_fields(full, lora, boot),
        "bootstrap_distinct_resamples": distinct_resamples(len(seeds)),
        **_paired_test_fields(lora, full, sign, n_tests, alpha),
    }


# --------------------------------------------------------------------------- per example

def exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar test: p of ``b`` discordant examples one way and ``c``
    the other, under H0 that either way is equally likely.

    Args:
        b: examples classifier 1 gets right and classifier 2 wrong.
        c: examples classifier 2 gets right and classifier 1 wrong.

    Returns:
        ``min(1, 2 * P(X <= min(b, c)))`` with ``X ~ Binomial(b + c, 1/2)`` (the
        exact conditional test; equals ``scipy.stats.binomtest(b, b + c).pvalue``).
        No discordant example (``b + c = 0``): 1.0, the two agree on every example.
    """
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * scipy.stats.binom.cdf(min(b, c), n, 0.5)))


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (no continuity correction).

    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``p = k/n``
    and ``z`` the normal quantile of ``(1 + confidence) / 2`` (Wilson 1927). Unlike
    ``p -+ z sqrt(p(1-p)/n)`` it stays inside [0, 1] and is not empty at k = 0 or n.
    """
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = float(scipy.stats.norm.ppf(0.5 + confidence / 2.0))
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    denom = 1 + z * z / n
    # the interval contains k/n (exactly: rounding gave a lower bound of 2e-17 at k = 0)
    return max(0.0, min(p, (centre - half) / denom)), min(1.0, max(p, (centre + half) / denom))


def paired_t_detectable_dz(n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The standardized paired difference ``d_z = mean(a - b) / sd(a - b)`` that a two-sided
    paired t-test of ``n`` pairs at level ``alpha`` detects with probability ``power``.

    Power is ``P(T' > t_crit)`` with ``T'`` noncentral t (``n - 1`` df, noncentrality
    ``d_z sqrt(n)``) and ``t_crit`` the two-sided critical value; the other tail (below
    ``-t_crit``, under 1e-3 of the power here) is left out, so this is a hair conservative.
    Three seeds at alpha = 0.05: about 3.26 sds; ten: about 1.0.
    """
    from scipy.optimize import brentq

    if n < 2:
        raise ValueError(f"need at least 2 pairs, got {n}")
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"alpha and power must be in (0, 1), got {alpha}, {power}")
    import warnings

    df = n - 1
    crit = float(scipy.stats.t.isf(alpha / 2, df))
    with warnings.catch_warnings():  # far tails (1 df, tiny alpha): series converge slowly
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(brentq(lambda d: scipy.stats.nct.sf(crit, df, d * math.sqrt(n)) - power,
                            1e-9, 1e6))


# --------------------------------------------------------------------------- trend over ranks

EXACT_TREND_LIMIT = 200_000  # most joint orderings enumerated; beyond, a seeded Monte Carlo
TREND_DRAWS = 20_000


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho of two vectors (average ranks for ties); NaN when either is constant."""
    rx, ry = scipy.stats.rankdata(x), scipy.stats.rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry / den) if den > 0 else math.nan


def rank_trend(values: dict, alternative: str = "two-sided", draws: int = TREND_DRAWS,
               seed: int = 0) -> dict:
    """A trend of a measure over an ordered factor (LoRA's rank) across seeds.

    ``values``: seed -> {rank: value} (a seed may miss ranks; a seed with fewer than two
    is left out). The statistic is Spearman's rho between rank and value within each
    seed, averaged over seeds (one rho per seed: the seeds are the replicates, the ranks
    of one seed are not). Its null distribution comes from permuting the values over the
    ranks within each seed independently (under "no trend" every ordering of a seed's
    values is equally likely): exact where each seed has at most
    :data:`EXACT_TREND_LIMIT` orderings (up to 8 ranks), as the convolution of the seeds'
    rho distributions (6 ranks x 2 seeds: 720² = 518,400 joint orderings from two
    enumerations of 720), else ``draws`` seeded random orderings (p = (1 + hits) /
    (1 + draws)). ``alternative``:
    ``two-sided`` (|mean rho| at least the observed), ``greater`` or ``less``. Ties within
    a seed get average ranks. A seed whose values are all equal has no defined rho: the
    result is then ``rho`` None and ``p`` None (undefined, as a zero-spread t-test).

    Returns ``{rho, rho_per_seed, p, n_seeds, ranks, exact, alternative, orderings}``.
    Three ranks, two seeds, both increasing: rho = 1, p = 1/36 (greater) or 2/36
    (two-sided), the smallest it can be with 3! orderings per seed."""
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative: {alternative!r} is not two-sided, greater or less")
    seeds = sorted(s for s in values if len(values[s]) >= 2)
    out = {"n_seeds": len(seeds), "alternative": alternative,
           "ranks": sorted({r for s in seeds for r in values[s]}),
           "rho": None, "rho_per_seed": {}, "p": None, "exact": None, "orderings": None}
    if not seeds:
        return out
    per = []
    for s in seeds:
        ranks = sorted(values[s])
        x = np.asarray(ranks, dtype=np.float64)
        y = np.asarray([values[s][r] for r in ranks], dtype=np.float64)
        per.append((x, y))
        out["rho_per_seed"][str(s)] = _json_float(_spearman(x, y))
    rhos = np.array([_spearman(x, y) for x, y in per])
    if not np.isfinite(rhos).all():
        return out
    observed = float(rhos.mean())
    out["rho"] = observed
    total = math.prod(math.factorial(len(x)) for x, _ in per)
    out["orderings"] = total
    tol = 1e-9
    if all(math.factorial(len(x)) <= EXACT_TREND_LIMIT for x, _ in per):
        # exact: the sum of independent per-seed rhos, by convolving their distributions
        dist = {0.0: 1.0}
        for x, y in per:
            counts: dict[float, float] = {}
            n = len(x)
            for perm in itertools.permutations(range(n)):
                rho = round(_spearman(x, y[list(perm)]), 9)
                counts[rho] = counts.get(rho, 0.0) + 1.0
            k = float(math.factorial(n))
            nxt: dict[float, float] = {}
            for a, pa in dist.items():
                for b, cb in counts.items():
                    key = round(a + b, 9)
                    nxt[key] = nxt.get(key, 0.0) + pa * cb / k
            dist = nxt
        total_obs = observed * len(per)
        if alternative == "greater":
            p = sum(v for k_, v in dist.items() if k_ >= total_obs - tol)
        elif alternative == "less":
            p = sum(v for k_, v in dist.items() if k_ <= total_obs + tol)
        else:
            p = sum(v for k_, v in dist.items() if abs(k_) >= abs(total_obs) - tol)
        out["exact"] = True
    else:
        rng = np.random.default_rng(seed)
        sims = np.zeros(draws)
        for x, y in per:
            sims += np.array([_spearman(x, rng.permutation(y)) for _ in range(draws)])
        sims /= len(per)
        if alternative == "greater":
            hits = int((sims >= observed - tol).sum())
        elif alternative == "less":
            hits = int((sims <= observed + tol).sum())
        else:
            hits = int((np.abs(sims) >= abs(observed) - tol).sum())
        p = (1 + hits) / (1 + draws)
        out["exact"] = False
    out["p"] = float(min(1.0, p))
    return out

