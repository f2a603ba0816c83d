"""The causal test (weights.sweep): PEFT's intruder removal with its two pitfalls fixed,
checked against the unreduced model's own logits and the weights stage's own intruder count;
the sweep inside the weights stage on the tiny model, resumable."""

import copy

import numpy as np
import pytest
import torch

from loralens.models.artifacts import merged
from loralens.study.config import load_config
from loralens.analysis.weights.intruder_sweep import REDUCED, drift_of, reduce_intruders
from loralens.models.classifier import apply_method, build_classifier
from loralens.analysis.weights.analyzer import Analyzer, backbone_of

IDS = torch.tensor([[1, 50, 60, 70, 80, 90], [1, 40, 41, 42, 2, 2]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def with_intruders(tiny_base, r=2, dropout=0.5):
    """A LoRA classifier whose every adapted matrix gets a rank-r update along directions
    spread evenly over all of W0's left singular vectors (a Hadamard row in W0's basis:
    |cos| = 1/sqrt(n) with each, well below 0.5), 20x W0's largest singular value: r
    intruders per matrix by construction. The head is random (not the untrained one)."""
    from scipy.linalg import hadamard

    cfg = load_config(overrides=["model.name=tiny-random", f"lora.r={r}",
                                 f"lora.dropout={dropout}"])
    model = apply_method(build_classifier(tiny_base.backbone(), 2, seed=0), "lora", cfg)
    with torch.no_grad():
        for _, mod in model.named_modules():
            if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                u0, s0, vt0 = torch.linalg.svd(mod.base_layer.weight.double(),
                                               full_matrices=False)
                n = u0.shape[1]
                spread = u0 @ torch.tensor(hadamard(n)[1:r + 1].T / n ** 0.5)
                scale = 20 * float(s0[0]) / mod.scaling["default"]
                mod.lora_B["default"].weight.copy_(scale * spread)
                mod.lora_A["default"].weight.copy_(vt0[-r:])
        torch.manual_seed(1)
        model.base_model.model.score.modules_to_save["default"].weight.normal_()
    return cfg, model.eval()


def counts_at_half(cfg, tiny_base, model) -> list[int]:
    """The weights stage's own intruder count (eps 0.5) of each adapted matrix."""
    rows = Analyzer(cfg, tiny_base).analyze(backbone_of(merged(model)), "lora")
    return [r["intruders"]["0.5"] for r in rows]


def test_lambda_one_leaves_the_logits_unchanged(tiny_base):
    cfg, model = with_intruders(tiny_base)
    with torch.no_grad():
        want = model(input_ids=IDS, attention_mask=MASK).logits
        reduced = copy.deepcopy(model)
        counts = reduce_intruders(reduced, 1.0)
        assert reduced.active_adapter == REDUCED and not reduced.training  # dropout off
        got = reduced(input_ids=IDS, attention_mask=MASK).logits
    assert sum(counts.values()) == 2 * 4  # PEFT did find (and re-factor) the intruders
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert float(want.abs().max()) > 0.1  # not a trivially zero output


def test_lambda_zero_removes_the_intruders_it_was_built_with(tiny_base):
    cfg, model = with_intruders(tiny_base)
    assert counts_at_half(cfg, tiny_base, model) == [2, 2, 2, 2]
    reduced = copy.deepcopy(model)
    reduce_intruders(reduced, 0.0)
    assert counts_at_half(cfg, tiny_base, reduced) == [0, 0, 0, 0]
    half = copy.deepcopy(model)
    reduce_intruders(half, 0.5)  # halved, still above every base singular value: still there
    assert counts_at_half(cfg, tiny_base, half) == [2, 2, 2, 2]


def test_drift_is_one_minus_debiased_cka_by_hand():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((20, 3, 5))
    other = base + 0.5 * rng.standard_normal((20, 3, 5))

    def debiased_cka(x, y):  # Song et al. (2012) unbiased HSIC on linear kernels, by hand
        def hsic(k, l):
            n = len(k)
            k, l = k.copy(), l.copy()
            np.fill_diagonal(k, 0)
            np.fill_diagonal(l, 0)
            return (np.trace(k @ l) + k.sum() * l.sum() / ((n - 1) * (n - 2))
                    - 2 * (k.sum(0) @ l.sum(0)) / (n - 2)) / (n * (n - 3))
        k, l = x @ x.T, y @ y.T
        return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))

    want = [1 - debiased_cka(base[:, i], other[:, i]) for i in range(3)]
    d = drift_of(base, other, [1, 2])
    np.testing.assert_allclose(d["per_state"], want, rtol=1e-6, atol=1e-9)
    assert d["mean"] == pytest.approx((want[1] + want[2]) / 2, rel=1e-6)


