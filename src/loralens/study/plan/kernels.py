"""Dry run: the work that is not model FLOPs, priced by timing the stages' own kernels here.

Two stages spend their time outside the model's forward and backward passes:

* weights: per trained model and analysed matrix, :func:`~loralens.analysis.weights.measures.matrix_measures`
  (two symmetric eigenproblems in float64), and once per matrix of the base its thin SVD
  (:func:`~loralens.analysis.weights.measures.base_svd`, cached for the stage);
* drift: per model and hidden state, the similarity measures against the base
  (:func:`~loralens.analysis.drift.measures.layer_similarities`: four linear CKAs,
  cosine, Procrustes, RBF CKA) and the variance profile; per pair of seeds of a study
  method and tested state, the seed floor's measures.

The counts come from the config and the model's shapes (:func:`count_weights`,
:func:`count_drift`, called by :mod:`loralens.study.plan.work` as the stages pick their
matrices and states); :func:`time_kernels` times each distinct kernel once on random
arrays of its shape (after one untimed call; a drift kernel on a few states and divided,
since its cost is linear in them), on one thread where the stage uses one. Random data
costs what real data costs here: the eigensolvers' and SVD's work depends on the shape,
not on the values (a rank-deficient change is still a full eigenproblem).

A kernel is a tuple ``(name, shape)``: ``("matrix", (out, in))``, ``("base_svd", (out,
in))``, ``("drift_state", (n, d))``, ``("drift_pair", (n, d))``.
"""

from __future__ import annotations

import time
from typing import Iterable, Sequence

import numpy as np

MATRIX, BASE_SVD, DRIFT_STATE, DRIFT_PAIR = "matrix", "base_svd", "drift_state", "drift_pair"
KERNEL_WORDS = {MATRIX: "intruders and spectrum of one tuned matrix",
                BASE_SVD: "thin SVD of one base matrix",
                DRIFT_STATE: "one model's drift measures at one hidden state",
                DRIFT_PAIR: "one pair of seeds' seed floor at one hidden state"}
DRIFT_STATES_TIMED = 3  # hidden states a drift kernel is timed on (then divided)


def count_weights(cfg, linear: dict[str, tuple[int, int]]) -> dict[tuple, int]:
    """Kernel calls of the weights stage over every task: each model's analysed matrices
    (:func:`~loralens.analysis.weights.analyzer.analysed`, as the stage picks them) and the
    base's SVD of each matrix any method analyses (once: the stage caches them).

    ``linear``: the backbone's linear layers, name -> weight shape ``(out, in)``."""
    from loralens.analysis.weights.analyzer import analysed

    calls: dict[tuple, int] = {}
    bases: set[str] = set()
    for method in cfg.methods:
        names = [n for n, *_ in analysed(cfg, method, list(linear))]
        bases.update(names)
        for n in names:
            key = (MATRIX, tuple(linear[n]))
            calls[key] = calls.get(key, 0) + len(cfg.seeds) * len(cfg.tasks)
    for n in bases:
        key = (BASE_SVD, tuple(linear[n]))
        calls[key] = calls.get(key, 0) + 1
    return calls


def count_drift(cfg, n_examples: int, n_states: int, hidden: int) -> dict[tuple, int]:
    """Kernel calls of the drift stage for one task of ``n_examples`` extracted rows: every
    trained model at every hidden state (and the base's variance profile, priced as one
    more model), and every pair of seeds of the study's two methods at the tested states
    (``drift.layers``)."""
    from loralens.analysis.drift.measures import drift_states
    from loralens.models.methods import PAIR

    models = len(cfg.methods) * len(cfg.seeds)
    tested = len(drift_states(cfg.drift.layers, n_states))
    k = len(cfg.seeds)
    pairs = sum(k * (k - 1) // 2 for m in PAIR if m in cfg.methods)
    calls = {(DRIFT_STATE, (n_examples, hidden)): (models + 1) * n_states}
    if pairs:
        calls[(DRIFT_PAIR, (n_examples, hidden))] = pairs * tested
    return calls


def add_calls(into: dict[tuple, int], calls: dict[tuple, int]) -> None:
    """Add ``calls`` to ``into`` (kernel -> calls)."""
    for key, v in calls.items():
        into[key] = into.get(key, 0) + v


def _timed(fn) -> float:
    fn()  # untimed: first-call allocations, LAPACK workspace queries
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _matrix(shape: Sequence[int], seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32) * 0.02


def time_kernel(key: tuple) -> float:
    """Seconds of one call of ``key`` (see the module docstring), measured here."""
    name, shape = key
    if name in (MATRIX, BASE_SVD):
        from loralens.analysis.weights.measures import base_svd, matrix_measures, one_thread

        w0 = _matrix(shape, 0)
        w = w0 + _matrix(shape, 1) * 0.01
        with one_thread():  # as Analyzer.analyze computes them
            if name == BASE_SVD:
                return _timed(lambda: base_svd(w0))
            b = base_svd(w0)
            return _timed(lambda: matrix_measures(w, w0, b))
    if name in (DRIFT_STATE, DRIFT_PAIR):
        from loralens.analysis.drift.measures import (drift_measures_only, layer_similarities,
                                                      variance_profile)

        n, d = shape
        rng = np.random.default_rng(0)
        s = DRIFT_STATES_TIMED
        base = rng.standard_normal((n, s, d), dtype=np.float32)
        other = base + 0.3 * rng.standard_normal((n, s, d), dtype=np.float32)
        if name == DRIFT_STATE:
            def fn():
                layer_similarities(base, {"m": other}, [])
                variance_profile(other, [], "m")
        else:
            def fn():
                drift_measures_only(base, {"m": other}, [], "")
        return _timed(fn) / s
    raise ValueError(f"unknown kernel {name!r}")


def time_kernels(keys: Iterable[tuple]) -> dict[tuple, float]:
    """:func:`time_kernel` of each distinct key."""
    return {key: time_kernel(key) for key in sorted(set(keys))}


def kernel_text(key: tuple) -> str:
    name, shape = key
    dims = "x".join(map(str, shape))
    return (f"{KERNEL_WORDS[name]} ({dims}" + (" examples x hidden)" if name in (DRIFT_STATE, DRIFT_PAIR)
                                                else ")"))
