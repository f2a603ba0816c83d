"""Invariants of the representation-similarity measures (fast, numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from loralens.analysis.similarity import (
    center_gram, cka_against_base, cka_from_grams, cosine_similarity, drift, gram_linear,
    linear_cka, procrustes_distance, rbf_cka,
)

BOTH = pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def orthogonal(d, seed=1):
    q, r = np.linalg.qr(rand(d, d, seed=seed))
    return q * np.sign(np.diag(r))


def related(n=60, d=40, seed=0):
    """Two representations sharing a low-rank signal, so CKA is strictly between 0 and 1."""
    z = rand(n, 5, seed=seed)
    X = z @ rand(5, d, seed=seed + 1) + 0.5 * rand(n, d, seed=seed + 2)
    Y = z @ rand(5, d + 7, seed=seed + 3) + 0.5 * rand(n, d + 7, seed=seed + 4)
    return X, Y


# ---------------------------------------------------------------- references


def reference_cka(X, Y):
    """The study's intended formula, written plainly: centered, float64."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    X = X - X.mean(axis=0)
    Y = Y - Y.mean(axis=0)
    return np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


def reference_hsic_u(K, L):
    """Unbiased HSIC (Song et al. 2012), the formula as printed."""
    n = K.shape[0]
    K = K.copy()
    L = L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return (
        np.trace(K @ L)
        + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ K @ L @ one)
    ) / (n * (n - 3))


def reference_debiased_cka(X, Y):
    X = X - X.mean(axis=0)
    Y = Y - Y.mean(axis=0)
    K, L = X @ X.T, Y @ Y.T
    return reference_hsic_u(K, L) / np.sqrt(reference_hsic_u(K, K) * reference_hsic_u(L, L))


# ---------------------------------------------------------------- linear CKA


@BOTH
@pytest.mark.parametrize("shape", [(30, 80), (80, 30)], ids=["n<d", "n>d"])
def test_cka_of_identical_inputs_is_one(debiased, shape):
    X = rand(*shape)
    assert linear_cka(X, X, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
    assert drift(X, X, debiased=debiased) == pytest.approx(0.0, abs=1e-12)


@BOTH
def test_invariant_to_orthogonal_maps_and_isotropic_scaling(debiased):
    X, Y = related()
    base = linear_cka(X, Y, debiased=debiased)
    assert 0.2 < abs(base) < 0.99  # not a trivial value
    Q = orthogonal(Y.shape[1])
    assert linear_cka(X, Y @ Q, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(X @ orthogonal(X.shape[1], seed=5), Y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * X, 0.01 * Y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    # and to translation (features are centered)
    assert linear_cka(X + 5.0, Y - 2.0, debiased=debiased) == pytest.approx(base, abs=1e-10)


@BOTH
def test_not_invariant_to_ill_conditioned_invertible_map(debiased):
    n, d = 200, 10
    X = rand(n, d)
    A = orthogonal(d, seed=2) @ np.diag(np.logspace(0, -3, d)) @ orthogonal(d, seed=3)
    assert np.linalg.cond(A) == pytest.approx(1e3)
    value = linear_cka(X, X @ A, debiased=debiased)
    assert value < 0.8, value  # an invertible map, yet far from 1


@BOTH
@pytest.mark.parametrize("shape", [(25, 60), (60, 25), (40, 40)], ids=["n<d", "n>d", "n=d"])
def test_gram_and_feature_forms_agree(debiased, shape):
    X = rand(*shape, seed=3)
    Y = X @ rand(shape[1], shape[1] + 3, seed=4) + rand(shape[0], shape[1] + 3, seed=5)
    g = linear_cka(X, Y, debiased=debiased, method="gram")
    f = linear_cka(X, Y, debiased=debiased, method="feature")
    assert abs(g - f) <= 1e-10
    assert linear_cka(X, Y, debiased=debiased) == pytest.approx(g, abs=1e-10)


def test_debiased_removes_the_small_n_bias():
    # Independent Gaussians, n << d: biased CKA is large, debiased near 0.
    X = rand(50, 500, seed=10)
    Y = rand(50, 500, seed=11)
    assert linear_cka(X, Y, debiased=False) > 0.3
    assert abs(linear_cka(X, Y, debiased=True)) < 0.05


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_plain_float64_reference(dtype):
    X, Y = related(n=70, d=90)
    X, Y = X.astype(dtype), Y.astype(dtype)
    assert linear_cka(X, Y) == pytest.approx(reference_cka(X, Y), abs=1e-6)


def test_debiased_matches_printed_unbiased_hsic_formula():
    X, Y = related(n=30, d=12)
    assert linear_cka(X, Y, debiased=True, method="gram") == pytest.approx(reference_debiased_cka(X, Y), abs=1e-10)
    assert linear_cka(X, Y, debiased=True, method="feature") == pytest.approx(reference_debiased_cka(X, Y), abs=1e-10)


def test_study_normalisation_bug_is_not_cka():
    # The published code divided by ||X||_F^2 ||Y||_F^2 instead of
    # ||X^T X||_F ||Y^T Y||_F; for identical inputs that is sum(s^4)/(sum s^2)^2,
    # about 1/rank, not 1.
    X = rand(300, 600, seed=7)
    Xc = X - X.mean(axis=0)
    buggy = np.linalg.norm(Xc.T @ Xc) ** 2 / (np.linalg.norm(Xc) ** 2 * np.linalg.norm(Xc) ** 2)
    assert buggy < 0.05
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)


def test_gram_api_matches_linear_cka():
    X, Y = related()
    K, L = gram_linear(X), gram_linear(Y)
    np.testing.assert_allclose(center_gram(K), K, atol=1e-9)  # already centered
    for debiased in (False, True):
        assert cka_from_grams(K, L, debiased) == pytest.approx(linear_cka(X, Y, debiased), abs=1e-10)
        # raw (uncentered) Grams give the same value: centering is part of CKA
        assert cka_from_grams(X @ X.T, Y @ Y.T, debiased) == pytest.approx(linear_cka(X, Y, debiased), abs=1e-9)


# ---------------------------------------------------------------- degenerate inputs


@BOTH
def test_rank_deficient_inputs_give_finite_values(debiased):
    n = 40
    low_rank = rand(n, 2, seed=1) @ rand(2, 30, seed=2)  # rank 2
    one_feature = np.zeros((n, 30))
    one_feature[:, 3] = rand(n, seed=3)  # 29 constant columns
    full = rand(n, 30, seed=4)
    for X in (low_rank, one_feature):
        for Y in (full, low_rank, one_feature):
            for method in ("gram", "feature"):
                v = linear_cka(X, Y, debiased=debiased, method=method)
                assert np.isfinite(v) and -1.0 <= v <= 1.0
        assert linear_cka(X, X, debiased=debiased) == pytest.approx(1.0, abs=1e-10)


@BOTH
@pytest.mark.parametrize("value", [0.0, 3.3, 0.1])
def test_constant_input_raises_zero_variance(debiased, value):
    # 0.1 is not exact in binary: its column mean leaves rounding noise, not zeros.
    const = np.full((20, 6), value, dtype=np.float32)
    X = rand(20, 6)
    for method in ("gram", "feature"):
        with pytest.raises(ValueError, match="zero variance"):
            linear_cka(const, X, debiased=debiased, method=method)
        with pytest.raises(ValueError, match="zero variance"):
            linear_cka(X, const, debiased=debiased, method=method)
    with pytest.raises(ValueError, match="zero variance"):
        rbf_cka(X, const, debiased=debiased)
    with pytest.raises(ValueError, match="zero variance"):
        cka_against_base(X[:, None, :], [const[:, None, :]], debiased=debiased)
    with pytest.raises(ValueError, match="zero variance"):
        procrustes_distance(const, X)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(10, 5\).*\(12, 5\)"):
        linear_cka(rand(10, 5), rand(12, 5))
    with pytest.raises(ValueError, match=r"\(10, 5\).*\(12, 5\)"):
        procrustes_distance(rand(10, 5), rand(12, 5))
    with pytest.raises(ValueError, match="n >= 4"):
        linear_cka(rand(3, 5), rand(3, 5, seed=1), debiased=True)
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(rand(10), rand(10))
    with pytest.raises(ValueError, match="NaN"):
        linear_cka(np.full((5, 3), np.nan), rand(5, 3))
    with pytest.raises(ValueError, match=r"\(8, 2, 4\)"):
        cka_against_base(rand(8, 3, 4), [rand(8, 2, 4)])


# ---------------------------------------------------------------- fast path


@BOTH
def test_cka_against_base_equals_pairwise(debiased):
    n, layers = 30, 4
    base = rand(n, layers, 50, seed=20).astype(np.float32)
    others = {
        "lora": base + 0.3 * rand(n, layers, 50, seed=21),
        "full": base @ rand(50, 50, seed=22) + rand(n, layers, 50, seed=23),
        "wide": rand(n, layers, 70, seed=24),
    }
    got = cka_against_base(base, others, debiased=debiased)
    assert got.shape == (3, layers)
    for i, arr in enumerate(others.values()):
        for layer in range(layers):
            want = linear_cka(base[:, layer], arr[:, layer], debiased=debiased)
            assert abs(got[i, layer] - want) <= 1e-10
    # a list works too, same order
    np.testing.assert_array_equal(cka_against_base(base, list(others.values()), debiased), got)


@BOTH
def test_cka_against_base_float32_grams_match_float64(debiased):
    # float32 pooled states like SmolLM2's: a few "massive activation" columns
    # with means ~3000 and large spread next to ordinary ones.
    rng = np.random.default_rng(5)
    n, layers, d = 120, 3, 300
    base = rng.standard_normal((n, layers, d)).astype(np.float32)
    base[:, :, :4] = 3000 + 50 * rng.standard_normal((n, layers, 4))
    others = [
        (base + 0.2 * rng.standard_normal(base.shape)).astype(np.float32),
        (base @ rng.standard_normal((d, d)).astype(np.float32) / 20).astype(np.float32),
    ]
    auto = cka_against_base(base, others, debiased=debiased)  # all float32 -> float32 Grams
    f32 = cka_against_base(base, others, debiased=debiased, gram_dtype="float32")
    f64 = cka_against_base(base, others, debiased=debiased, gram_dtype="float64")
    np.testing.assert_array_equal(auto, f32)
    assert np.max(np.abs(f32 - f64)) <= 1e-6
    assert not np.array_equal(f32, f64)  # really a different computation
    if not debiased:  # the plain float64 feature-space formula
        for i, Y in enumerate(others):
            for layer in range(layers):
                X = base[:, layer].astype(np.float64)
                Z = Y[:, layer].astype(np.float64)
                X, Z = X - X.mean(0), Z - Z.mean(0)
                want = np.linalg.norm(Z.T @ X) ** 2 / (
                    np.linalg.norm(X.T @ X) * np.linalg.norm(Z.T @ Z)
                )
                assert abs(f32[i, layer] - want) <= 1e-6
    with pytest.raises(ValueError, match="gram_dtype"):
        cka_against_base(base, others, gram_dtype="float16")
    const = np.full((n, 1, d), 0.1, dtype=np.float32)
    with pytest.raises(ValueError, match="zero variance"):
        cka_against_base(base[:, :1], [const], debiased=debiased, gram_dtype="float32")


# ---------------------------------------------------------------- other measures


def test_cosine_similarity():
    X = rand(20, 8)
    assert cosine_similarity(X, X) == pytest.approx(1.0, abs=1e-12)
    assert cosine_similarity(X, -X) == pytest.approx(-1.0, abs=1e-12)
    assert -1.0 < cosine_similarity(X, rand(20, 8, seed=1)) < 1.0
    X[3] = 0.0
    with pytest.raises(ValueError, match="zero norm"):
        cosine_similarity(X, X)


@pytest.mark.parametrize("shape", [(30, 80), (80, 30)], ids=["n<d", "n>d"])
def test_procrustes(shape):
    X = rand(*shape)
    assert procrustes_distance(X, X) == pytest.approx(0.0, abs=1e-10)
    rotated = 2.5 * X @ orthogonal(shape[1]) + 1.0
    assert procrustes_distance(X, rotated) == pytest.approx(0.0, abs=1e-10)
    # matches the formula computed directly on [d, d]
    Y = rand(shape[0], shape[1] + 5, seed=9)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Xc, Yc = Xc / np.linalg.norm(Xc), Yc / np.linalg.norm(Yc)
    want = 2 - 2 * np.linalg.svd(Xc.T @ Yc, compute_uv=False).sum()
    got = procrustes_distance(X, Y)
    assert got == pytest.approx(want, abs=1e-10)
    assert 0.0 < got <= 2.0


@BOTH
def test_rbf_cka(debiased):
    X, Y = related()
    assert rbf_cka(X, X, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
    v = rbf_cka(X, Y, debiased=debiased)
    assert np.isfinite(v) and v < 1.0
    # the median-distance bandwidth makes it invariant to rotation and scale
    assert rbf_cka(3.0 * X @ orthogonal(X.shape[1]), Y, debiased=debiased) == pytest.approx(v, abs=1e-10)


# ---------------------------------------------------------------- outlier dimensions

# 3 examples x 2 features, by hand. X's second column is constant; Y's second column has
# 100 times the variance of its first.
X32 = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
Y32 = np.array([[1.0, 0.0], [3.0, 10.0], [2.0, 20.0]])


def test_cka_by_hand_on_3x2_and_standardised():
    # centred: Xc = [[-1, 0], [0, 0], [1, 0]], Yc = [[-1, -10], [1, 0], [0, 10]]
    # ||Yc^T Xc||_F^2 = 1^2 + 20^2 = 401; ||Xc^T Xc||_F = 2;
    # Yc^T Yc = [[2, 10], [10, 200]] -> ||.||_F = sqrt(40204)
    plain = 401 / (2 * np.sqrt(40204))
    assert linear_cka(X32, Y32) == pytest.approx(plain, rel=1e-12)  # 0.99995
    # standardised (sd with ddof 0 is sqrt(2/3) and 10 sqrt(2/3)): X's constant column
    # drops out, Xz = sqrt(3/2) [[-1, 0], [0, 0], [1, 0]], Yz = sqrt(3/2) [[-1, -1],
    # [1, 0], [0, 1]]; CKA ignores the common factor: ||Yz^T Xz||^2 = 1^2 + 2^2 = 5,
    # ||Xz^T Xz|| = 2, ||Yz^T Yz|| = ||[[2, 1], [1, 2]]|| = sqrt(10)
    std = 5 / (2 * np.sqrt(10))
    assert linear_cka(X32, Y32, standardize=True) == pytest.approx(std, rel=1e-12)  # 0.7906
    for method in ("gram", "feature"):
        assert linear_cka(X32, Y32, standardize=True, method=method) == pytest.approx(std)
    # the fast per-layer path agrees
    got = cka_against_base(X32[:, None, :], [Y32[:, None, :]], standardize=True)
    assert got[0, 0] == pytest.approx(std, rel=1e-12)
    got = cka_against_base(X32[:, None, :].astype(np.float32),
                           [Y32[:, None, :].astype(np.float32)], standardize=True)
    assert got[0, 0] == pytest.approx(std, abs=1e-6)


def test_standardised_cka_is_not_decided_by_one_massive_dimension():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((80, 20))
    Y = X + 0.3 * rng.standard_normal((80, 20))
    # one shared dimension of huge variance ("massive activation") in both
    spike = 3000.0 * rng.standard_normal(80)
    Xs, Ys = X.copy(), Y.copy()
    Xs[:, 3] = spike
    Ys[:, 3] = spike
    Ys[:, :3] = rng.standard_normal((80, 3))     # ... while the rest changes a lot
    Ys[:, 4:] = rng.standard_normal((80, 16))
    assert linear_cka(Xs, Ys) > 0.99                                     # decided by dim 3
    assert linear_cka(Xs, Ys, standardize=True) < 0.3                    # the rest differs
    # standardising is idempotent in CKA: z-scored input gives the same value
    Z = (Xs - Xs.mean(0)) / Xs.std(0)
    assert linear_cka(Z, Ys, standardize=True) == pytest.approx(
        linear_cka(Xs, Ys, standardize=True), rel=1e-10)


def test_standardize_guards_constant_columns():
    from loralens.analysis.similarity import standardize_features

    Z = standardize_features(X32, "X")
    np.testing.assert_allclose(Z[:, 1], 0.0)                      # constant column: 0
    np.testing.assert_allclose(Z[:, 0], np.array([-1, 0, 1]) * np.sqrt(1.5))
    # float32 constant columns at a large offset (rounding noise is not variance)
    W = np.column_stack([np.full(5, 2987.25, dtype=np.float32),
                         np.arange(5, dtype=np.float32)])
    assert np.all(standardize_features(W, "W")[:, 0] == 0.0)
    # a float32 column that only wobbles by one ulp around 3000 is storage rounding, not
    # a dimension to give unit weight; float64 input keeps it (it is exact there)
    ulp = np.spacing(np.float32(3000.0))
    W[:, 0] = np.float32(3000.0) + ulp * (np.arange(5) % 2)
    assert np.all(standardize_features(W, "W")[:, 0] == 0.0)
    assert np.abs(standardize_features(W.astype(np.float64), "W")[:, 0]).max() > 0.5
    with pytest.raises(ValueError, match="zero variance"):
        standardize_features(np.full((4, 3), 7.0), "X")
    with pytest.raises(ValueError, match="zero variance"):
        linear_cka(np.full((4, 3), 7.0), rand(4, 3), standardize=True)


def test_variance_shares_by_hand():
    from loralens.analysis.similarity import variance_shares

    # column variances (ddof 0): [8/3, 2/3, 2], total 16/3
    X = np.array([[0.0, 0.0, 0.0], [2.0, 1.0, 0.0], [4.0, 2.0, 3.0]])
    out = variance_shares(X, ks=(1, 2, 5))
    assert out["top1"] == pytest.approx(0.5)
    assert out["top2"] == pytest.approx((8 / 3 + 2) / (16 / 3))
    assert out["top5"] == 1.0 and out["top_dims"] == [0, 2, 1]
    # against numpy on random data with one massive dimension
    R = rand(50, 30)
    R[:, 7] *= 40
    v = np.sort(R.var(axis=0))[::-1]
    out = variance_shares(R)
    assert out["top1"] == pytest.approx(v[0] / v.sum()) and out["top_dims"][0] == 7
    assert out["top5"] == pytest.approx(v[:5].sum() / v.sum())
    # shares do not depend on a shift of the features (massive means do not count)
    assert variance_shares(R + 3000.0)["top1"] == pytest.approx(out["top1"], rel=1e-9)
    with pytest.raises(ValueError, match="zero variance"):
        variance_shares(np.ones((5, 3)))
