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

For many comparisons against one base model use :func:`cka_against_base`: it
builds the base model's centered Gram matrix once per layer and reuses it for
every compared model. :func:`gram_linear`, :func:`center_gram` and
:func:`cka_from_grams` expose the same Gram-matrix route.

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
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.linalg

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
]

_EPS = np.finfo(np.float64).eps


# --------------------------------------------------------------------------
# Input checks and centering
# --------------------------------------------------------------------------


def _as_2d(X, name: str, keep_float32: bool = False) -> np.ndarray:
    X = np.asarray(X)
    if not (keep_float32 and X.dtype == np.float32):
        X = X.astype(np.float64, copy=False)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n_examples, d_features], got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {X.shape}")
    return X


def _check_pair(X: np.ndarray, Y: np.ndarray) -> None:
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of examples (rows): "
            f"X has shape {X.shape}, Y has shape {Y.shape}"
        )


def _check_n(n: int, debiased: bool) -> None:
    if debiased and n < 4:
        raise ValueError(
            f"debiased CKA needs n >= 4 examples (its HSIC divides by n(n-3)), got n={n}"
        )
    if n < 2:
        raise ValueError(f"CKA needs at least 2 examples, got n={n}")


def _center(X, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(X - mean(X, axis=0), mean)`` as float64, without checks."""
    # float32 input is centered straight into a float64 array (one pass, no
    # intermediate float64 copy); the mean is accumulated in float64.
    X = _as_2d(X, name, keep_float32=True)
    mu = X.mean(axis=0, dtype=np.float64)
    return np.subtract(X, mu, dtype=np.float64), mu


def _check_variance(sq: float, mu: np.ndarray, shape: tuple, name: str) -> None:
    """Raise if ``sq = ||Xc||_F^2`` is non-finite or zero to float64 precision."""
    if not np.isfinite(sq):
        raise ValueError(f"{name} contains NaN or inf (shape {shape})")
    # ||X||_F^2 = ||Xc||_F^2 + n ||mu||^2. Centering a constant column leaves
    # rounding noise of relative size about n * eps, not exact zeros, so treat
    # anything below that as "no variance".
    scale = sq + shape[0] * float(np.dot(mu, mu))
    if sq <= (shape[0] * _EPS) ** 2 * scale:
        raise ValueError(
            f"{name} has zero variance across examples (every feature is constant, "
            f"shape {shape}); CKA/Procrustes are undefined (0/0)"
        )


def _center_features(X, name: str) -> np.ndarray:
    """Subtract column means; float64 copy of shape ``[n, d]``.

    Raises ``ValueError`` when the result is zero to float64 precision (every
    column constant across examples) or when the input is not finite.
    """
    Xc, mu = _center(X, name)
    _check_variance(float(np.vdot(Xc, Xc)), mu, Xc.shape, name)
    return Xc


# --------------------------------------------------------------------------
# Gram matrices
# --------------------------------------------------------------------------


def gram_linear(X) -> np.ndarray:
    """Linear Gram matrix of the feature-centered representation.

    Args:
        X: ``[n, d]`` representation.

    Returns:
        ``Xc @ Xc.T`` with ``Xc = X - mean(X, axis=0)``, shape ``[n, n]``,
        float64. This equals ``H (X X^T) H`` with ``H = I - 11^T/n``: already
        centered for the biased estimator (centering features first avoids the
        cancellation that centering a raw Gram matrix suffers when features
        have large means). Pass it to :func:`cka_from_grams`.
    """
    Xc = _center_features(X, "X")
    # numpy dispatches A @ A.T to BLAS syrk (half the flops of a general product).
    return Xc @ Xc.T


def gram_rbf(X, sigma_frac: float = 0.8) -> np.ndarray:
    """Gaussian (RBF) Gram matrix ``exp(-||x_i - x_j||^2 / (2 sigma^2))``.

    Args:
        X: ``[n, d]`` representation.
        sigma_frac: bandwidth as a fraction of the median pairwise Euclidean
            distance between distinct examples (``sigma = sigma_frac * median``),
            following Kornblith et al. (2019), who use 0.8. Their reference
            code takes the median over all n^2 entries, the zero diagonal
            included; this takes it over the ``n(n-1)/2`` pairs ``i < j``.

    Returns:
        ``[n, n]`` float64 kernel matrix (not centered).

    Raises:
        ValueError: zero variance, or a median pairwise distance of 0 (more
            than half of the pairs of examples identical).
    """
    if not sigma_frac > 0:
        raise ValueError(f"sigma_frac must be > 0, got {sigma_frac}")
    Xc = _center_features(X, "X")  # distances are unchanged by centering
    G = Xc @ Xc.T
    sq_norms = np.diag(G)
    sq_dist = np.maximum(sq_norms[:, None] + sq_norms[None, :] - 2.0 * G, 0.0)
    np.fill_diagonal(sq_dist, 0.0)
    median = float(np.median(np.sqrt(sq_dist[np.triu_indices_from(sq_dist, k=1)])))
    if median <= 0.0:
        raise ValueError(
            f"median pairwise distance of X (shape {Xc.shape}) is 0: more than half of "
            f"the pairs of examples are identical, so the RBF bandwidth is undefined"
        )
    sigma = sigma_frac * median
    return np.exp(-sq_dist / (2.0 * sigma**2))


def center_gram(K, debiased: bool = False) -> np.ndarray:
    """Center a symmetric Gram matrix for the HSIC estimator.

    Args:
        K: ``[n, n]`` symmetric Gram matrix.
        debiased: False: ``H K H`` (biased HSIC, Gretton et al. 2005).
            True: U-centering (Szekely & Rizzo 2014), the form under which
            ``<K_u, L_u>_F = n(n-3) * HSIC_u(K, L)``, the unbiased estimator of
            Song et al. (2012) -- see :func:`cka_from_grams`.

    Returns:
        New ``[n, n]`` float64 array; the input is not modified.
    """
    K = np.array(K, dtype=np.float64, copy=True)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"a Gram matrix must be square [n, n], got shape {K.shape}")
    n = K.shape[0]
    if not debiased:
        K -= K.mean(axis=0, keepdims=True)
        K -= K.mean(axis=1, keepdims=True)
        return K
    _check_n(n, debiased=True)
    # U-centering (as in Kornblith et al.'s reference code): zero the diagonal,
    # subtract row/column sums / (n-2), add back the total / ((n-1)(n-2)).
    np.fill_diagonal(K, 0.0)
    means = K.sum(axis=0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    K -= means[:, None]
    K -= means[None, :]
    np.fill_diagonal(K, 0.0)
    return K


def _frobenius(Kc: np.ndarray, name: str) -> float:
    """Frobenius norm of a centered Gram: sqrt(HSIC(K, K)) up to a constant factor."""
    norm = float(np.sqrt(np.vdot(Kc, Kc)))
    if not np.isfinite(norm):
        raise ValueError(f"{name} contains NaN or inf")
    if norm == 0.0:
        raise ValueError(
            f"{name} has zero variance: its centered Gram matrix is 0, so CKA is undefined (0/0)"
        )
    return norm


def _cka_centered(Kc: np.ndarray, Lc: np.ndarray) -> float:
    cka = np.vdot(Kc, Lc) / (_frobenius(Kc, "K") * _frobenius(Lc, "L"))
    # Cauchy-Schwarz bounds CKA by 1; clip the last-ulp rounding (1 + 2e-16).
    return float(np.clip(cka, -1.0, 1.0))


def cka_from_grams(K, L, debiased: bool = False) -> float:
    """CKA from two Gram matrices: ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``.

    Args:
        K, L: ``[n, n]`` symmetric Gram matrices of the same examples, e.g.
            from :func:`gram_linear` or :func:`gram_rbf`. Raw or already
            centered: centering is idempotent.
        debiased: use the unbiased HSIC estimator (Song et al. 2012), computed
            through U-centered Grams; needs ``n >= 4``.

    Returns:
        CKA as a float: in [0, 1] for the biased form; the debiased form can be
        slightly negative (it is near 0 for independent representations).

    Raises:
        ValueError: mismatched shapes, ``n < 4`` when debiased, or a Gram
            matrix whose centered form is 0 (zero variance).
    """
    K = np.asarray(K, dtype=np.float64)
    L = np.asarray(L, dtype=np.float64)
    if K.shape != L.shape:
        raise ValueError(f"K and L must have the same shape, got {K.shape} and {L.shape}")
    _check_n(K.shape[0], debiased)
    return _cka_centered(center_gram(K, debiased), center_gram(L, debiased))


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


def linear_cka(X, Y, debiased: bool = False, method: str = "auto") -> float:
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

    Returns:
        CKA as a float; 1 for identical inputs. Drift = ``1 - CKA``.

    Raises:
        ValueError: mismatched ``n`` (the message names both shapes), too few
            examples, non-finite input, or zero variance (a constant input).
    """
    X = _as_2d(X, "X")
    Y = _as_2d(Y, "Y")
    _check_pair(X, Y)
    n = X.shape[0]
    _check_n(n, debiased)
    Xc = _center_features(X, "X")
    Yc = _center_features(Y, "Y")
    if method == "auto":
        method = "gram" if n < max(Xc.shape[1], Yc.shape[1]) else "feature"
    if method == "gram":
        return _cka_centered(_centered_gram(Xc, debiased), _centered_gram(Yc, debiased))
    if method == "feature":
        return float(_linear_cka_features(Xc, Yc, debiased))
    raise ValueError(f"method must be 'auto', 'gram' or 'feature', got {method!r}")


def _centered_gram(Xc: np.ndarray, debiased: bool) -> np.ndarray:
    """Centered Gram from already feature-centered ``Xc`` ([n, d] -> [n, n])."""
    G = Xc @ Xc.T  # already H K H
    return center_gram(G, debiased=True) if debiased else G


def drift(X, Y, debiased: bool = False) -> float:
    """Representation drift ``1 - linear_cka(X, Y)``: 0 for identical inputs.

    Same arguments and errors as :func:`linear_cka`.
    """
    return 1.0 - linear_cka(X, Y, debiased=debiased)


def _gram_float32(X, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Centered linear Gram ``H X X^T H`` of a float32 ``[n, d]`` layer via sgemm.

    Features are first shifted by their float32 column means, so no large
    common offset (SmolLM2's "massive activations" sit near 3000) enters the
    float32 product, where it would cancel catastrophically. That shift is
    rounded, so the product is centered only approximately; the exact
    centering ``H K H`` then runs on the float64 Gram matrix: it removes any
    remaining column shift exactly (``H 1 = 0``), at ``O(n^2)`` cost.

    Returns ``(K, mu)``: the float64 ``[n, n]`` centered Gram and the column means.
    """
    X = _as_2d(X, name, keep_float32=True).astype(np.float32, copy=False)
    mu = X.mean(axis=0)
    Xs = X - mu
    K = np.matmul(Xs, Xs.T).astype(np.float64)  # BLAS sgemm, float64 from here on
    r = K.mean(axis=0)  # K is symmetric: row means == column means
    K -= r
    K -= r[:, None]
    K += r.mean()
    return K, mu.astype(np.float64)


def cka_against_base(
    base, others, debiased: bool = False, gram_dtype: str = "auto"
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
            (see :func:`_gram_float32`: massive activations do not cost
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
    base = np.asarray(base)
    models = list(others.items()) if isinstance(others, Mapping) else list(enumerate(others))
    if base.ndim != 3:
        raise ValueError(f"base must be 3-D [n, layers, d], got shape {base.shape}")
    n, n_layers, _ = base.shape
    _check_n(n, debiased)
    arrays = []
    for key, arr in models:
        arr = np.asarray(arr)
        if arr.ndim != 3 or arr.shape[:2] != (n, n_layers):
            raise ValueError(
                f"model {key!r} has shape {arr.shape}; expected [n, layers, d] with "
                f"n={n}, layers={n_layers} to match base shape {base.shape}"
            )
        arrays.append(arr)
    if gram_dtype == "auto":
        all32 = base.dtype == np.float32 and all(a.dtype == np.float32 for a in arrays)
        gram_dtype = "float32" if all32 else "float64"
    if gram_dtype not in ("float32", "float64"):
        raise ValueError(f"gram_dtype must be 'auto', 'float32' or 'float64', got {gram_dtype!r}")
    low = gram_dtype == "float32"

    def gram_and_norm(X, name):
        if low:
            K, mu = _gram_float32(X, name)
        else:
            Xc, mu = _center(X, name)
            K = Xc @ Xc.T  # BLAS syrk; already H K H
        _check_variance(float(np.trace(K)), mu, X.shape, name)  # trace(K) = ||Xc||_F^2
        if debiased:
            K = center_gram(K, debiased=True)
        return K, _frobenius(K, name)

    out = np.empty((len(arrays), n_layers), dtype=np.float64)
    for layer in range(n_layers):
        Kb, norm_b = gram_and_norm(base[:, layer, :], f"base layer {layer}")  # once per layer
        for i, arr in enumerate(arrays):
            Km, norm_m = gram_and_norm(arr[:, layer, :], f"model {models[i][0]!r} layer {layer}")
            out[i, layer] = np.vdot(Kb, Km) / (norm_b * norm_m)
    return np.clip(out, -1.0, 1.0, out=out)


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
    X = _as_2d(X, "X")
    Y = _as_2d(Y, "Y")
    _check_pair(X, Y)
    _check_n(X.shape[0], debiased)
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
    X = _as_2d(X, "X")
    Y = _as_2d(Y, "Y")
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
    X = _as_2d(X, "X")
    Y = _as_2d(Y, "Y")
    _check_pair(X, Y)
    _check_n(X.shape[0], debiased=False)
    Xc = _center_features(X, "X")
    Yc = _center_features(Y, "Y")
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
