"""Measured peaks are peaks: the best of several repeats, measured again when asked (after
training) with the maximum kept, each with the load it was measured under.

The measurements themselves are replaced by fakes returning set values, so the numbers
below are the fakes' and the test needs no timing luck.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from loralens.core.config import StudyConfig
from loralens.training import flops
from loralens.training import loop


@pytest.fixture
def fake_measurements(monkeypatch):
    """Square-GEMM measurements 50, 80, 60 GFLOP/s taken under loads 1.9, 0.2, 0.1, then
    model-shape ones 40, 45 GFLOP/s (loads follow on)."""
    monkeypatch.setattr(flops, "_PEAKS", {})
    square, shaped, loads = [50e9, 80e9, 60e9], [40e9, 45e9], [1.9, 0.2, 0.1, 1.0, 0.5, 0.4]
    monkeypatch.setattr(flops, "_gemm_flops", lambda *a: square.pop(0))
    monkeypatch.setattr(flops, "_model_gemm_flops", lambda *a: shaped.pop(0))
    monkeypatch.setattr(flops, "load_average", lambda: loads.pop(0))
    return square, shaped


def test_best_of_repeats_is_the_fastest():
    waits = iter([0.0, 0.05, 0.002, 0.05])  # warm-up, then three repeats

    def fn():
        import time

        time.sleep(next(waits))

    assert flops._best_seconds(fn, repeats=3, min_seconds=0.0) < 0.04  # not the 0.05 ones


def test_peak_is_kept_at_its_maximum_with_the_load_it_was_measured_under(fake_measurements):
    first = flops.gemm_peak_info(torch.float32)
    assert first == flops.Peak(50e9, 1.9, first.cpus, 1)
    assert flops.gemm_peak(torch.float32) == 50e9  # cached: nothing measured
    assert flops.gemm_peak_info(torch.float32, max_age_s=0) == flops.Peak(80e9, 0.2,
                                                                           first.cpus, 2)
    # a slower measurement later does not lower the peak, nor change its load
    assert flops.gemm_peak_info(torch.float32, max_age_s=0) == flops.Peak(80e9, 0.2,
                                                                           first.cpus, 3)
    assert fake_measurements[0] == []
    assert flops.gemm_peak_info(torch.float32, max_age_s=3600).flops_per_s == 80e9  # recent


def test_fit_measures_before_and_after_training(fake_measurements, tiny_backbone,
                                                monkeypatch):
    from loralens.models.classifier import apply_method, build_classifier
    from tests.unit.training.test_precision import EOS, encoded

    monkeypatch.setattr(loop, "REMEASURE_AFTER_S", 0.0)  # every fit re-measures afterwards
    model = apply_method(build_classifier(tiny_backbone, 2, seed=0), "lora", StudyConfig())
    tc = replace(StudyConfig().train, epochs=1, batch_size=8, warmup_ratio=0.0,
                 precision="fp32")
    res = loop.fit(model, encoded(), None, EOS, tc, lr=1e-2, seed=0, progress=False,
                   method="lora")
    # before: square 50 (load 1.9), model shapes 40 (load 0.2); after: 80 (load 0.1), 45
    # (load 1.0): the maxima, with their loads, against which MFU is computed
    assert (res.peak_flops_per_s, res.peak_load) == (80e9, 0.1)
    assert (res.peak_model_flops_per_s, res.peak_model_load) == (45e9, 1.0)
    assert res.peak_measurements == 2
    assert res.mfu == pytest.approx(res.achieved_flops_per_s / 80e9)
    assert res.mfu_model_shapes == pytest.approx(res.achieved_flops_per_s / 45e9)
