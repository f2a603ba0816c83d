"""Property-based tests (Hypothesis) of the similarity measures and the statistics:
any shape and any values (constant columns, NaN/inf, huge and tiny magnitudes, tiny n)
give a finite value in the measure's range or a ValueError, never NaN or another
exception; CKA(X, X) = 1 and CKA's invariances hold for random inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from loralens.analysis import similarity as sim
from tests.helpers.properties import examples

FAST = settings(max_examples=examples(250), deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

special = st.sampled_from([0.0, -0.0, 1.0, 1e-300, 1e300, -1e300, 5e-324, np.nan, np.inf,
                           -np.inf, 1e154, 3e-162])
elements = st.one_of(st.floats(-1e6, 1e6), special)


# few distinct values: constant and duplicate columns, rank-deficient and tiny inputs
few = st.sampled_from([0.0, 1.0, -1.0, 1e-8, 1e8, 2.5, 1e-170, 1e170])


def arrays(max_n: int = 9, max_d: int = 5):
    shape = st.tuples(st.integers(0, max_n), st.integers(0, max_d))
    return st.one_of(hnp.arrays(np.float64, shape, elements=elements),
                     hnp.arrays(np.float64, shape, elements=few),
                     hnp.arrays(np.float32, shape, elements=st.floats(-1e3, 1e3, width=32)))


def defined_or_value_error(fn, *args, lo: float, hi: float, **kw) -> float | None:
    with np.errstate(all="ignore"):  # overflow warnings are fine; a NaN result is not
        try:
            v = fn(*args, **kw)
        except ValueError as e:
            assert str(e)
            return None
    assert isinstance(v, float) and math.isfinite(v), (fn.__name__, v)
    assert lo - 1e-9 <= v <= hi + 1e-9, (fn.__name__, v)
    return v


@FAST
@given(X=arrays(), Y=arrays(), debiased=st.booleans(),
       method=st.sampled_from(["auto", "gram", "feature"]), standardize=st.booleans())
@example(X=np.ones((5, 3)), Y=np.ones((5, 3)), debiased=False, method="auto", standardize=False)
@example(X=np.full((4, 2), 1e300), Y=np.eye(4)[:, :2] * 1e300, debiased=False, method="gram",
         standardize=False)
@example(X=np.zeros((0, 3)), Y=np.zeros((0, 3)), debiased=False, method="auto",
         standardize=False)
def test_linear_cka_is_defined_or_a_value_error(X, Y, debiased, method, standardize):
    lo = -1.0 if debiased else 0.0
    defined_or_value_error(sim.linear_cka, X, Y, lo=lo, hi=1.0, debiased=debiased,
                           method=method, standardize=standardize)


@FAST
@given(X=arrays(), Y=arrays())
def test_other_measures_are_defined_or_a_value_error(X, Y):
    defined_or_value_error(sim.cosine_similarity, X, Y, lo=-1.0, hi=1.0)
    defined_or_value_error(sim.procrustes_distance, X, Y, lo=0.0, hi=2.0)
    defined_or_value_error(sim.rbf_cka, X, Y, lo=0.0, hi=1.0)
    defined_or_value_error(sim.drift, X, Y, lo=0.0, hi=1.0)


@FAST
@given(base=hnp.arrays(np.float64, st.tuples(st.integers(0, 7), st.integers(1, 3),
                                             st.integers(1, 4)), elements=elements),
       debiased=st.booleans())
def test_cka_against_base_is_defined_or_a_value_error(base, debiased):
    with np.errstate(all="ignore"):
        try:
            out = sim.cka_against_base(base, [base, base[:, :, ::-1] * 2.0], debiased=debiased)
        except ValueError as e:
            assert str(e)
            return
    assert np.isfinite(out).all() and out.shape == (2, base.shape[1])


def random_pair(seed: int, n: int, d1: int, d2: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d1))
    return X, X[:, :min(d1, d2)] @ rng.standard_normal((min(d1, d2), d2)) \
        + 0.5 * rng.standard_normal((n, d2))


@settings(max_examples=examples(60), deadline=2000, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(4, 24), d1=st.integers(1, 12),
       d2=st.integers(1, 12), scale=st.floats(1e-3, 1e3), debiased=st.booleans(),
       method=st.sampled_from(["gram", "feature"]))
def test_cka_invariances_hold_for_random_inputs(seed, n, d1, d2, scale, debiased, method):
    X, Y = random_pair(seed, n, d1, d2)
    cka = lambda A, B: sim.linear_cka(A, B, debiased=debiased, method=method)  # noqa: E731
    assert cka(X, X) == pytest.approx(1.0, abs=1e-9)
    assert cka(X * scale + 3.0, X) == pytest.approx(1.0, abs=1e-9)  # scale and translation
    ref = cka(X, Y)
    Q, _ = np.linalg.qr(np.random.default_rng(seed + 1).standard_normal((d1, d1)))
    assert cka(X @ Q, Y) == pytest.approx(ref, abs=1e-8)           # orthogonal map
    assert cka(X, Y * scale) == pytest.approx(ref, abs=1e-8)       # isotropic scaling
    assert cka(Y, X) == pytest.approx(ref, abs=1e-10)              # symmetric
    assert sim.linear_cka(X, Y, debiased=debiased, method="gram" if method == "feature"
                          else "feature") == pytest.approx(ref, abs=1e-8)  # both forms agree
    assert sim.procrustes_distance(X @ Q * scale, X) == pytest.approx(0.0, abs=1e-8)
