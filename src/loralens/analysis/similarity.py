"""Representation similarity: pure arrays in, numbers out.

A representation is an array ``X`` of shape ``[n_examples, d_features]``: one
layer of one model, mean-pooled over real tokens, one row per example. Two
representations are compared row by row, so they must share ``n`` (and the
order of examples); their feature counts may differ except where noted.

Everything is computed in float64, whatever the input dtype.

Measures
--------
- :func:`linear_cka` -- linear centered kernel alignment (Kornblith et al.,
  2019), biased or debiased (Song et al., 2012; Nguyen, Raghu & Kornblith,
  2021). Invariant to orthogonal transforms and isotropic scaling of either
  input, not to arbitrary invertible linear maps.
- :func:`rbf_cka` -- CKA with a Gaussian kernel, bandwidth from the median
  pairwise distance (Kornblith et al., 2019).
- :func:`cosine_similarity` -- mean cosine between paired rows.
- :func:`procrustes_distance` -- orthogonal Procrustes distance (Ding, Denain &
  Steinhardt, 2021).
- :func:`drift` -- ``1 - linear_cka``: the study's drift to the base model.
- ``standardize=True`` (:func:`linear_cka`, :func:`cka_against_base`) -- linear
  CKA of features z-scored per dimension: every dimension weighs the same, so a
  few dimensions of huge variance ("massive activations") cannot decide it.
- :func:`variance_shares` -- the share of a representation's variance held by
  its top-k dimensions: how much a handful of dimensions can decide CKA.

For many comparisons against one base model use :func:`cka_against_base`: it
builds the base model's centered Gram matrix once per layer and reuses it for
every compared model. :func:`gram_linear`, :func:`center_gram` and
:func:`cka_from_grams` expose the same Gram-matrix route; they live in
:mod:`loralens.analysis.similarity_kernels` with the input checks and are re-exported here.

Degenerate inputs
-----------------
No function here returns NaN. A representation that does not vary across
examples (every column constant, so the centered array is zero to float64
precision) raises ``ValueError("... has zero variance ...")``: CKA and
Procrustes are 0/0 there. Rank-deficient but non-constant inputs are fine and
give finite values. Non-finite inputs and mismatched ``n`` raise ``ValueError``
naming the shapes.

A pitfall this module guards against: the study's published code divided
``||Y^T X||_F^2`` by ``||X||_F^2 ||Y||_F^2`` instead of
``||X^T X||_F ||Y^T Y||_F``, which gives about 0.002 for identical inputs; CKA
of identical inputs is 1.

References
----------
- Kornblith, Norouzi, Lee & Hinton (2019), "Similarity of Neural Network
  Representations Revisited", ICML.
- Song, Smola, Gretton, Bedo & Borgwardt (2012), "Feature Selection via
  Dependence Maximization", JMLR (unbiased HSIC estimator).
- Nguyen, Raghu & Kornblith (2021), "Do Wide and Deep Networks Learn the Same
  Things?", ICLR (debiased CKA).
- Ding, Denain & Steinhardt (2021), "Grounding Representation Similarity with
  Statistical Testing", NeurIPS (orthogonal Procrustes distance).
- Davari, Horoi, Natik, Lajoie, Wolf & Belilovsky (2023), "Reliability of CKA
  as a Similarity Measure in Deep Learning", ICLR (CKA follows a few outlier
  dimensions).
- Sun, Chen, Kolter & Liu (2024), "Massive Activations in Large Language
  Models", COLM.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.linalg

from loralens.analysis.similarity_kernels import (
    as_2d, center, center_features, center_gram, centered_gram, check_n, check_pair,
    check_variance, cka_centered, cka_from_grams, gram_linear, gram_rbf, layer_gram,
    standardize_features,
)

__all__ = [
    "linear_cka",
    "drift",
    "gram_linear",
    "gram_rbf",
    "center_gram",
    "cka_from_grams",
    "cka_against_base",
    "rbf_cka",
    "cosine_similarity",
    "procrustes_distance",
    "standardize_features",
    "variance_shares",
]

# --------------------------------------------------------------------------
# Linear CKA
# --------------------------------------------------------------------------


def _debiased_dot(xty: float, rows_x: np.ndarray, rows_y: np.ndarray, n: int) -> float:
    """``n(n-3) * HSIC_u`` from feature-space quantities (centered features).

    With K = Xc Xc^T, L = Yc Yc^T and the diagonals zeroed (K~, L~), the
    unbiased estimator of Song et al. (2012),
        HSIC_u = [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)),
    simplifies, because the columns of Xc and Yc sum to 0, to
        n(n-3) HSIC_u = ||Yc^T Xc||_F^2 - n/(n-2) <r_x, r_y>
                        + sum(r_x) sum(r_y) / ((n-1)(n-2)),
    with r_x = squared row norms of Xc (Kornblith et al.'s reference code).
    """
    return (
        xty
        - n / (n - 2.0) * float(np.dot(rows_x, rows_y))
        + float(rows_x.sum()) * float(rows_y.sum()) / ((n - 1.0) * (n - 2.0))
    )


def _linear_cka_features(Xc: np.ndarray, Yc: np.ndarray, debiased: bool) -> float:
    """Feature-space form: ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``."""
    n = Xc.shape[0]
    xty = float(np.linalg.norm(Yc.T @ Xc)) ** 2
    xtx = float(np.linalg.norm(Xc.T @ Xc)) ** 2
    yty = float(np.linalg.norm(Yc.T @ Yc)) ** 2
    if debiased:
        rx = np.einsum("ij,ij->i", Xc, Xc)
        ry = np.einsum("ij,ij->i", Yc, Yc)
        xty = _debiased_dot(xty, rx, ry, n)
        xtx = _debiased_dot(xtx, rx, rx, n)
        yty = _debiased_dot(yty, ry, ry, n)
    for name, v in (("X", xtx), ("Y", yty)):
        # The debiased self-term equals ||U-centered Gram||_F^2 >= 0; rounding
        # can only push an exact 0 slightly negative.
        if not v > 0.0:
            form = "debiased" if debiased else "biased"
            raise ValueError(
                f"{name} has zero variance under the {form} HSIC estimator; CKA is undefined (0/0)"
            )
    return float(np.clip(xty / np.sqrt(xtx * yty), -1.0, 1.0))


def linear_cka(X, Y, debiased: bool = False, method: str = "auto",
               standardize: bool = False) -> float:
    """Linear CKA between two representations of the same examples.

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``K = Xc Xc^T``,
    ``L = Yc Yc^T`` and ``Xc``, ``Yc`` the feature-centered inputs (Kornblith
    et al. 2019, eq. 5). The biased form equals

        ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F).

    The debiased form replaces HSIC by the unbiased estimator of Song et al.
    (2012) (Nguyen, Raghu & Kornblith 2021), which removes the positive bias
    the biased form has when ``n`` is small relative to ``d``: independent
    Gaussian inputs with ``n=50, d=500`` give about 0.9 biased, about 0
    debiased.

    Args:
        X: ``[n, d1]`` representation (any real dtype; float64 internally).
        Y: ``[n, d2]`` representation of the same ``n`` examples, same order.
        debiased: unbiased HSIC estimator; needs ``n >= 4``.
        method: ``"gram"`` (``[n, n]`` matrices), ``"feature"`` (``[d, d]``
            matrices) or ``"auto"``: Gram form when ``n < max(d1, d2)``, the
            cheaper one. Both give the same value to rounding.
        standardize: z-score each column first (:func:`standardize_features`;
            constant columns drop out), so every dimension weighs the same.

    Returns:
        CKA as a float; 1 for identical inputs. Drift = ``1 - CKA``.

    Raises:
        ValueError: mismatched ``n`` (the message names both shapes), too few
            examples, non-finite input, or zero variance (a constant input).
    """
    # z-scores see the input's own dtype (float32 storage rounding is no variance)
    X0, Y0 = as_2d(X, "X", keep_float32=True), as_2d(Y, "Y", keep_float32=True)
    X, Y = X0.astype(np.float64, copy=False), Y0.astype(np.float64, copy=False)
    check_pair(X, Y)
    n = X.shape[0]
    check_n(n, debiased)
    if standardize:
        Xc, Yc = standardize_features(X0, "X"), standardize_features(Y0, "Y")
    else:
        Xc, Yc = center_features(X, "X"), center_features(Y, "Y")
    if method == "auto":
        method = "gram" if n < max(Xc.shape[1], Yc.shape[1]) else "feature"
    if method == "gram":
        return cka_centered(centered_gram(Xc, debiased), centered_gram(Yc, debiased))
    if method == "feature":
        return float(_linear_cka_features(Xc, Yc, debiased))
    raise ValueError(f"method must be 'auto', 'gram' or 'feature', got {method!r}")


def drift(X, Y, debiased: bool = False) -> float:
    """Representation drift ``1 - linear_cka(X, Y)``: 0 for identical inputs.

    Same arguments and errors as :func:`linear_cka`.
    """
    return 1.0 - linear_cka(X, Y, debiased=debiased)


def cka_against_base(
    base, others, debiased: bool = False, gram_dtype: str = "auto", standardize: bool = False
) -> np.ndarray:
    """Layer-wise linear CKA of several models against one base model.

    The fast path for the study's drift table: the base model's centered Gram
    matrix and its Frobenius norm are computed once per layer and reused for
    every compared model; each compared model costs one
    ``[n, n]`` Gram (a BLAS syrk of its centered ``[n, d]`` layer) and one
    elementwise dot product. Prefer it when ``n < d`` (the study: n <= 750,
    d = 2048); the values equal :func:`linear_cka` pair by pair.

    Args:
        base: ``[n, layers, d]`` pooled hidden states of the base model.
        others: a sequence of ``[n, layers, d_m]`` arrays, or a mapping
            name -> array (rows then follow the mapping's order). Each must
            share ``n`` and ``layers`` with ``base``; ``d_m`` may differ.
        debiased: unbiased HSIC estimator (``n >= 4``).
        gram_dtype: precision of the ``[n, n]`` Gram products. ``"float64"``
            everywhere, or ``"float32"``: each layer is centered in float64
            (see :func:`similarity_kernels.gram_float32`: massive activations do not cost
            precision), rounded to float32 and
            multiplied with BLAS sgemm (about twice dgemm's speed); the Gram
            matrix, its centering and every sum after it are float64. On the
            study's data this changes CKA by ~1e-9 (tested: < 1e-6 against
            the float64 formula). ``"auto"`` (default) picks float32 when
            every input is float32, the way pooled states are stored.

    Returns:
        ``[n_models, layers]`` float64 array of CKA values; drift is
        ``1 - result``.

    Raises:
        ValueError: shape mismatches (named), or a zero-variance layer (the
            message names the model and layer).
    """
    base, models = _stacked_layers(base, others, debiased)
    n_layers = base.shape[1]
    if gram_dtype == "auto":
        all32 = base.dtype == np.float32 and all(a.dtype == np.float32 for _, a in models)
        gram_dtype = "float32" if all32 else "float64"
    if gram_dtype not in ("float32", "float64"):
        raise ValueError(f"gram_dtype must be 'auto', 'float32' or 'float64', got {gram_dtype!r}")
    low = gram_dtype == "float32"
    out = np.empty((len(models), n_layers), dtype=np.float64)
    for layer in range(n_layers):
        # the base model's Gram once per layer, reused for every model
        Kb, norm_b = layer_gram(base[:, layer, :], f"base layer {layer}", low, debiased,
                                standardize)
        for i, (key, arr) in enumerate(models):
            Km, norm_m = layer_gram(arr[:, layer, :], f"model {key!r} layer {layer}", low,
                                    debiased, standardize)
            out[i, layer] = np.vdot(Kb, Km) / (norm_b * norm_m)
    return np.clip(out, -1.0, 1.0, out=out)


def _stacked_layers(base, others, debiased: bool) -> tuple[np.ndarray, list[tuple]]:
    """``base`` as an array and ``others`` as ``[(key, array)]``, shapes checked against it."""
    base = np.asarray(base)
    models = list(others.items()) if isinstance(others, Mapping) else list(enumerate(others))
    if base.ndim != 3:
        raise ValueError(f"base must be 3-D [n, layers, d], got shape {base.shape}")
    n, n_layers, _ = base.shape
    check_n(n, debiased)
    checked = []
    for key, arr in models:
        arr = np.asarray(arr)
        if arr.ndim != 3 or arr.shape[:2] != (n, n_layers):
            raise ValueError(
                f"model {key!r} has shape {arr.shape}; expected [n, layers, d] with "
                f"n={n}, layers={n_layers} to match base shape {base.shape}"
            )
        checked.append((key, arr))
    return base, checked


# --------------------------------------------------------------------------
# Outlier dimensions
# --------------------------------------------------------------------------


def variance_shares(X, ks=(1, 5)) -> dict:
    """Share of the total variance of ``X`` held by its ``k`` dimensions of largest
    variance, for each ``k``.

    Linear CKA weighs each dimension by its variance across examples: when one
    dimension holds most of it (SmolLM2's massive activations), CKA mostly
    compares that dimension. Pair with ``linear_cka(..., standardize=True)``.

    Args:
        X: ``[n, d]`` representation.
        ks: numbers of top dimensions (each at least 1; ``k >= d`` gives 1.0).

    Returns:
        ``{"top<k>": share in [0, 1] for each k, "top_dims": [indices of the
        max(ks) dimensions of largest variance, largest first]}``; variances with
        ddof 0 in float64.

    Raises:
        ValueError: zero variance (every column constant) or non-finite input.
    """
    Xc, mu = center(X, "X")
    var = np.einsum("ij,ij->j", Xc, Xc) / Xc.shape[0]
    check_variance(float(var.sum()) * Xc.shape[0], mu, Xc.shape, "X")
    order = np.argsort(var, kind="stable")[::-1]
    total = float(var.sum())
    out: dict = {}
    for k in ks:
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        out[f"top{int(k)}"] = float(min(var[order[: int(k)]].sum() / total, 1.0))
    out["top_dims"] = [int(i) for i in order[: max(int(k) for k in ks)]]
    return out


# --------------------------------------------------------------------------
# Other measures
# --------------------------------------------------------------------------


def rbf_cka(X, Y, sigma_frac: float = 0.8, debiased: bool = False) -> float:
    """CKA with Gaussian kernels (Kornblith et al. 2019, section 4).

    Args:
        X: ``[n, d1]``; Y: ``[n, d2]`` representations of the same examples.
        sigma_frac: each kernel's bandwidth is ``sigma_frac`` times the median
            pairwise distance of its own representation (see :func:`gram_rbf`).
        debiased: unbiased HSIC estimator (``n >= 4``).

    Returns:
        CKA as a float; 1 for identical inputs.

    Raises:
        ValueError: as :func:`linear_cka`, or a zero median distance.
    """
    X = as_2d(X, "X")
    Y = as_2d(Y, "Y")
    check_pair(X, Y)
    check_n(X.shape[0], debiased)
    return cka_from_grams(gram_rbf(X, sigma_frac), gram_rbf(Y, sigma_frac), debiased)


def cosine_similarity(X, Y) -> float:
    """Mean over paired examples of ``cos(X_i, Y_i)``; no centering.

    Args:
        X, Y: ``[n, d]`` arrays of the same shape (row ``i`` of each is the
            same example in the same feature space, e.g. a fine-tuned model and
            its base).

    Returns:
        Mean cosine in [-1, 1]: 1 for ``Y = X``, -1 for ``Y = -X``.

    Raises:
        ValueError: shapes differ, non-finite input, or a row of zero norm in
            either input (its cosine is undefined; the message counts them).
    """
    X = as_2d(X, "X")
    Y = as_2d(Y, "Y")
    if X.shape != Y.shape:
        raise ValueError(
            "cosine similarity pairs rows feature by feature: "
            f"X has shape {X.shape}, Y has shape {Y.shape}"
        )
    nx = np.linalg.norm(X, axis=1)
    ny = np.linalg.norm(Y, axis=1)
    if not (np.isfinite(nx).all() and np.isfinite(ny).all()):
        raise ValueError("X or Y contains NaN or inf")
    zero = int(np.count_nonzero(nx == 0) + np.count_nonzero(ny == 0))
    if zero:
        raise ValueError(f"{zero} row(s) of X or Y have zero norm; their cosine is undefined")
    cos = np.einsum("ij,ij->i", X, Y) / (nx * ny)
    return float(np.clip(cos, -1.0, 1.0).mean())


def procrustes_distance(X, Y) -> float:
    """Orthogonal Procrustes distance (Ding, Denain & Steinhardt 2021).

    After centering each representation and scaling it to unit Frobenius
    norm,

        d(X, Y) = min_{R orthogonal} ||X R - Y||_F^2 = 2 - 2 ||X^T Y||_*

    where ``||.||_*`` is the nuclear norm (sum of singular values). Feature
    counts may differ (``R`` is then a partial isometry; the formula holds).

    Args:
        X: ``[n, d1]``; Y: ``[n, d2]`` representations of the same examples.

    Returns:
        Distance in [0, 2]: 0 when ``Y`` is an orthogonal transform of ``X``
        (up to translation and scale).

    Raises:
        ValueError: mismatched ``n``, non-finite input, zero variance.
    """
    X = as_2d(X, "X")
    Y = as_2d(Y, "Y")
    check_pair(X, Y)
    check_n(X.shape[0], debiased=False)
    Xc = center_features(X, "X")
    Yc = center_features(Y, "Y")
    Xc /= np.linalg.norm(Xc)
    Yc /= np.linalg.norm(Yc)
    if Xc.shape[0] < Xc.shape[1]:
        # n < d: with Xc^T = Q R (Q [d1, n] orthonormal columns), Xc^T Yc =
        # Q (R Yc) has the singular values of the small [n, d2] matrix R Yc.
        _, R = np.linalg.qr(Xc.T)
        M = R @ Yc
    else:
        M = Xc.T @ Yc
    nuclear = float(scipy.linalg.svdvals(M).sum())
    return float(np.clip(2.0 - 2.0 * nuclear, 0.0, 2.0))
