"""Benchmark: layer-wise CKA of several models against a base model.

Compares, on one task's arrays at the study's size (750 examples x 2048
features, 22 layers, 6 fine-tuned models plus the base, float32 pooled states):

(a) ``loralens.analysis.similarity.cka_against_base`` as ``loralens drift`` calls it:
    the base model's centered Gram matrix [n, n] is built once per layer and
    reused; each model layer costs one Gram (n^2 d flops) and one elementwise
    dot product. The inputs are float32 (as stored), so the Gram products run
    in float32 after centering in float64 (``gram_dtype="auto"``); everything
    after the products is float64;
(b) a per-pair feature-space implementation, the formula as the study meant
    it: ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` in float64 for
    every (model, layer) pair, recomputing both sides' [d, d] products.

Both compute the same [models, layers] table; the script checks that the
values agree (max |diff| <= 1e-6), then prints the speed-up as its last line.
Where it comes from, printed on the way: the flop ratio of the two routes,
``4 d M / (n (M + 1))`` for M models (9.4x at the study's size n = 750,
d = 2048, M = 6), times what float32 products gain over float64 (about 2x
with BLAS). The fast path with float64 Grams is timed too (``--no-f64``
skips it), so the two factors can be read apart. Time it on an otherwise idle
machine: with other jobs on the cores, multithreaded BLAS loses more on the
fast path's many smaller products.

    python bench/cka.py            # study size, 3 repeats, about 1-2 minutes on 2 cores
    python bench/cka.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from loralens.analysis.similarity import cka_against_base
from loralens.core.timing import time_interleaved


def make_task(n: int, layers: int, d: int, n_models: int, seed: int = 0):
    """Random float32 pooled states with shared structure.

    base = Z W_l + noise; each model adds a model-specific low-rank shift and
    extra noise whose size grows with depth and with the model index, so CKA
    to the base ranges from near 1 (early layers) to well below it.
    """
    rng = np.random.default_rng(seed)
    f32 = np.float32
    k = 32
    Z = rng.standard_normal((n, k), dtype=f32)
    W = rng.standard_normal((layers, k, d), dtype=f32)
    W *= f32(1 / np.sqrt(k))  # in place: a float64 scalar would promote to float64
    base = np.ascontiguousarray((Z @ W).transpose(1, 0, 2))  # [n, layers, d]
    base += 0.5 * rng.standard_normal(base.shape, dtype=f32)
    models = []
    depth = np.linspace(0.1, 1.0, layers, dtype=f32)[None, :, None]
    for m in range(n_models):
        scale = (0.5 + m / max(n_models - 1, 1)) * depth
        Zm = rng.standard_normal((n, 8), dtype=f32)
        V = rng.standard_normal((layers, 8, d), dtype=f32)
        V *= f32(1 / np.sqrt(8))
        shift = np.ascontiguousarray((Zm @ V).transpose(1, 0, 2))
        shift += rng.standard_normal(base.shape, dtype=f32)
        models.append(base + scale * shift)
    assert base.dtype == np.float32 and all(m.dtype == np.float32 for m in models)
    return base, models


def per_pair_feature_space(base: np.ndarray, models: list[np.ndarray]) -> np.ndarray:
    """Baseline: feature-space linear CKA, independently for each (model, layer)."""
    out = np.empty((len(models), base.shape[1]))
    for i, model in enumerate(models):
        for layer in range(base.shape[1]):
            X = base[:, layer, :].astype(np.float64)
            Y = model[:, layer, :].astype(np.float64)
            X -= X.mean(axis=0)
            Y -= Y.mean(axis=0)
            out[i, layer] = np.linalg.norm(Y.T @ X) ** 2 / (
                np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y)
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method")
    parser.add_argument(
        "--no-f64", action="store_true", help="skip timing the fast path with float64 Grams"
    )
    args = parser.parse_args()

    n, layers, d, n_models = (200, 4, 512, 3) if args.quick else (750, 22, 2048, 6)
    repeats = args.repeats
    base, models = make_task(n, layers, d, n_models)
    print(
        f"task: n={n} examples, d={d} features, {layers} layers, "
        f"{n_models} models + base (float32 input)"
    )
    print(f"repeats: {repeats} per method, interleaved, median reported")
    # Timings are only meaningful on an otherwise idle machine.
    print(f"load average before timing: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    sides = {"fast": lambda: cka_against_base(base, models),
             "slow": lambda: per_pair_feature_space(base, models)}
    if not args.no_f64:
        sides["f64"] = lambda: cka_against_base(base, models, gram_dtype="float64")
    timed = time_interleaved(sides, repeats=repeats, keep="last")
    fast, slow = timed.results["fast"][0], timed.results["slow"][0]
    fast_t, slow_t = timed.seconds["fast"], timed.seconds["slow"]

    diff = float(np.max(np.abs(fast - slow)))
    # Arithmetic ceiling: per pair the baseline does Y^T X (2 n d^2 flops) and two
    # syrk products X^T X, Y^T Y (n d^2 each); the fast path does one syrk Gram
    # (n^2 d) per model and layer plus one for the base.
    flop_ratio = (4 * n * d**2 * n_models) / (n**2 * d * (n_models + 1))
    print(f"flop ratio (4 n d^2 per pair vs n^2 d per Gram): {flop_ratio:.1f}x")
    print(f"CKA range: {fast.min():.3f} .. {fast.max():.3f} (mean {fast.mean():.3f})")
    print("fast path (base Gram once per layer) s:", " ".join(f"{t:.3f}" for t in fast_t))
    print("per-pair feature space s:             ", " ".join(f"{t:.3f}" for t in slow_t))
    if not args.no_f64:
        f64 = timed.results["f64"][0]
        d64 = float(np.max(np.abs(f64 - slow)))
        print(
            f"fast path with float64 Grams: median {timed.median('f64'):.2f} s, "
            f"{timed.median('slow') / timed.median('f64'):.1f}x the baseline, "
            f"max |diff| {d64:.1g} (float32 Grams vs float64: "
            f"{float(np.max(np.abs(fast - f64))):.1g})"
        )
    assert diff <= 1e-6, f"fast path and baseline disagree: max |diff| = {diff:.3g}"
    fast_med, slow_med = timed.median("fast"), timed.median("slow")
    print(
        f"speedup: {slow_med / fast_med:.1f}x (fast median {fast_med:.2f} s, "
        f"per-pair feature-space median {slow_med:.2f} s, max |diff| {diff:.1g})"
    )


if __name__ == "__main__":
    main()
