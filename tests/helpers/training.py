"""Tiny encoded data sets (token ids, parity labels) and a one-epoch fit on them, for the
training-loop and method tests."""

from dataclasses import replace

import numpy as np

from loralens.core.config import StudyConfig
from loralens.training import batches as B
from loralens.training.loop import fit

EOS = 2


def tiny_encoded(n=24, seed=0, lo=3, hi=20):
    rng = np.random.default_rng(seed)
    ids = [list(rng.integers(10, 4000, size=rng.integers(lo, hi))) for _ in range(n)]
    labels = np.array([int(sum(x) % 2) for x in ids])
    return B.Encoded([[int(t) for t in x] for x in ids], labels, np.arange(n))


def fit_tiny(model, enc, **tc_kw):
    tc = replace(StudyConfig().train, epochs=1, batch_size=8, warmup_ratio=0.0, **tc_kw)
    return fit(model, enc, None, EOS, tc, lr=1e-2, seed=0, progress=False)
