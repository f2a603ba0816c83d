"""Gram (kernel) matrices for CKA, and the input checks every similarity measure shares.

The building blocks of :mod:`loralens.analysis.similarity`: :func:`gram_linear`,
:func:`gram_rbf`, :func:`center_gram` and :func:`cka_from_grams` are public there too;
the rest (input checks, centering, the float32 Gram route of ``cka_against_base``)
serve the measures. Arrays are ``[n_examples, d_features]``; everything is float64.
"""

from __future__ import annotations

import numpy as np

_EPS = np.finfo(np.float64).eps


# --------------------------------------------------------------------------
# Input checks and centering
# --------------------------------------------------------------------------


def as_2d(X, name: str, keep_float32: bool = False) -> np.ndarray:
    X = np.asarray(X)
    if not (keep_float32 and X.dtype == np.float32):
        X = X.astype(np.float64, copy=False)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n_examples, d_features], got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {X.shape}")
    return X


def check_pair(X: np.ndarray, Y: np.ndarray) -> None:
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of examples (rows): "
            f"X has shape {X.shape}, Y has shape {Y.shape}"
        )


def check_n(n: int, debiased: bool) -> None:
    if debiased and n < 4:
        raise ValueError(
            f"debiased CKA needs n >= 4 examples (its HSIC divides by n(n-3)), got n={n}"
        )
    if n < 2:
        raise ValueError(f"CKA needs at least 2 examples, got n={n}")


def center(X, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(X - mean(X, axis=0), mean)`` as float64, without checks."""
    # float32 input is centered straight into a float64 array (one pass, no
    # intermediate float64 copy); the mean is accumulated in float64.
    X = as_2d(X, name, keep_float32=True)
    mu = X.mean(axis=0, dtype=np.float64)
    return np.subtract(X, mu, dtype=np.float64), mu


def check_variance(sq: float, mu: np.ndarray, shape: tuple, name: str) -> None:
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


def center_features(X, name: str) -> np.ndarray:
    """Subtract column means; float64 copy of shape ``[n, d]``.

    Raises ``ValueError`` when the result is zero to float64 precision (every
    column constant across examples) or when the input is not finite.
    """
    Xc, mu = center(X, name)
    check_variance(float(np.vdot(Xc, Xc)), mu, Xc.shape, name)
    return Xc


def standardize_features(X, name: str) -> np.ndarray:
    """Each column centred and divided by its standard deviation (ddof 0): ``[n, d]``
    float64 z-scores, so every dimension carries the same variance.

    A column that does not vary across examples has no z-score: it becomes 0, which
    leaves it out of every Gram matrix. "Does not vary" means its spread is within
    rounding: of centring it in float64 (as in :func:`check_variance`), or, for float32
    input (pooled states are stored so), within 4 float32 ulps of its magnitude, since
    z-scoring would otherwise blow storage rounding up to a full dimension. Raises
    ``ValueError`` when every column is constant, or on non-finite input.
    """
    X = np.asarray(X)
    ulps = 4 * np.finfo(np.float32).eps if X.dtype == np.float32 else 0.0
    Xc, mu = center(X, name)
    var = np.einsum("ij,ij->j", Xc, Xc) / Xc.shape[0]
    if not np.isfinite(var).all():
        raise ValueError(f"{name} contains NaN or inf (shape {Xc.shape})")
    constant = var <= max((Xc.shape[0] * _EPS) ** 2, ulps**2) * (var + mu * mu)
    if constant.all():
        raise ValueError(
            f"{name} has zero variance across examples (every feature is constant, "
            f"shape {Xc.shape}); standardised CKA is undefined (0/0)"
        )
    scale = np.where(constant, np.inf, np.sqrt(var))  # x / inf = 0: constant columns drop out
    return Xc / scale


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
    Xc = center_features(X, "X")
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
    Xc = center_features(X, "X")  # distances are unchanged by centering
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
    check_n(n, debiased=True)
    # U-centering (as in Kornblith et al.'s reference code): zero the diagonal,
    # subtract row/column sums / (n-2), add back the total / ((n-1)(n-2)).
    np.fill_diagonal(K, 0.0)
    means = K.sum(axis=0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    K -= means[:, None]
    K -= means[None, :]
    np.fill_diagonal(K, 0.0)
    return K


def frobenius(Kc: np.ndarray, name: str) -> float:
    """Frobenius norm of a centered Gram: sqrt(HSIC(K, K)) up to a constant factor."""
    norm = float(np.sqrt(np.vdot(Kc, Kc)))
    if not np.isfinite(norm):
        raise ValueError(f"{name} contains NaN or inf")
    if norm == 0.0:
        raise ValueError(
            f"{name} has zero variance: its centered Gram matrix is 0, so CKA is undefined (0/0)"
        )
    return norm


def cka_centered(Kc: np.ndarray, Lc: np.ndarray) -> float:
    cka = np.vdot(Kc, Lc) / (frobenius(Kc, "K") * frobenius(Lc, "L"))
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
    check_n(K.shape[0], debiased)
    return cka_centered(center_gram(K, debiased), center_gram(L, debiased))


def centered_gram(Xc: np.ndarray, debiased: bool) -> np.ndarray:
    """Centered Gram from already feature-centered ``Xc`` ([n, d] -> [n, n])."""
    G = Xc @ Xc.T  # already H K H
    return center_gram(G, debiased=True) if debiased else G


def gram_float32(X, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Centered linear Gram ``H X X^T H`` of a float32 ``[n, d]`` layer via sgemm.

    Features are first shifted by their float32 column means, so no large
    common offset (SmolLM2's "massive activations" sit near 3000) enters the
    float32 product, where it would cancel catastrophically. That shift is
    rounded, so the product is centered only approximately; the exact
    centering ``H K H`` then runs on the float64 Gram matrix: it removes any
    remaining column shift exactly (``H 1 = 0``), at ``O(n^2)`` cost.

    Returns ``(K, mu)``: the float64 ``[n, n]`` centered Gram and the column means.
    """
    X = as_2d(X, name, keep_float32=True).astype(np.float32, copy=False)
    mu = X.mean(axis=0)
    Xs = X - mu
    K = np.matmul(Xs, Xs.T).astype(np.float64)  # BLAS sgemm, float64 from here on
    r = K.mean(axis=0)  # K is symmetric: row means == column means
    K -= r
    K -= r[:, None]
    K += r.mean()
    return K, mu.astype(np.float64)


def layer_gram(X, name: str, float32: bool, debiased: bool,
               standardize: bool = False) -> tuple[np.ndarray, float]:
    """Centered linear Gram of one ``[n, d]`` layer and its Frobenius norm, for
    ``cka_against_base``: through :func:`gram_float32` when ``float32``, else a float64
    syrk of the centered layer; U-centered when ``debiased``; of the z-scored columns
    (:func:`standardize_features`) when ``standardize``. Raises on zero variance."""
    if standardize:
        # z-scores are O(1): float32 products lose nothing that matters after this
        X = standardize_features(X, name)
        X = X.astype(np.float32) if float32 else X
    if float32:
        K, mu = gram_float32(X, name)
    else:
        Xc, mu = center(X, name)
        K = Xc @ Xc.T  # BLAS syrk; already H K H
    check_variance(float(np.trace(K)), mu, X.shape, name)  # trace(K) = ||Xc||_F^2
    if debiased:
        K = center_gram(K, debiased=True)
    return K, frobenius(K, name)
