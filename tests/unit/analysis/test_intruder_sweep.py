"""The intervention sweep (weights.sweep): the intruder arm is PEFT's mitigation (checked
against PEFT itself) with its two pitfalls fixed; the control arm rescales as many of the
largest non-intruder directions the same way; on matrices built with known singular
directions, a toy scorer that reads the intruder direction changes under the intruder arm
only (and the paired test across seeds says so), one that reads neither changes under
neither; both arms rebuild at rank r with the truncation computed by hand."""

import copy
import math

import numpy as np
import pytest
import torch

from loralens.analysis.stats import paired_t_detectable_dz
from loralens.models.artifacts import merged
from loralens.study.config import load_config
from loralens.analysis.weights.intruder_sweep import (
    CONTROL, INTRUDER, REDUCED, contrasts, control_directions, drift_of, intruder_directions,
    merged_svd, rescale_directions, rescaled_update,
)
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


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "lora_B") and REDUCED in m.lora_B]


# --------------------------------------------------------------------------- on a model

def test_the_intruder_arm_is_pefts_own_mitigation(tiny_base):
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    _, model = with_intruders(tiny_base)
    ours, peft = copy.deepcopy(model), copy.deepcopy(model)
    done = rescale_directions(ours, 0.5, INTRUDER)
    reduce_intruder_dimension(peft, new_adapter_name=REDUCED, mitigation_lambda=0.5,
                              logging_sink=None)
    assert done["intruders"] == done["directions"] == 2 * 4 and done["modules_changed"] == 4
    theirs = dict(lora_layers(peft))
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            want = theirs[name].get_delta_weight(REDUCED)
            got = layer.get_delta_weight(REDUCED)
            before = layer.get_delta_weight("default")
            assert float((want - before).abs().max()) > 1e-2  # PEFT did change it
            torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)


def test_lambda_one_leaves_the_logits_unchanged_in_both_arms(tiny_base):
    _, model = with_intruders(tiny_base)
    with torch.no_grad():
        want = model(input_ids=IDS, attention_mask=MASK).logits
        got = {}
        for arm in (INTRUDER, CONTROL):
            reduced = copy.deepcopy(model)
            done = rescale_directions(reduced, 1.0, arm)
            assert reduced.active_adapter == REDUCED and not reduced.training  # dropout off
            assert done["directions"] == 2 * 4  # the control too rescales 2 per matrix
            got[arm] = reduced(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(got[INTRUDER], want, atol=1e-5, rtol=0)
    assert torch.equal(got[INTRUDER], got[CONTROL])  # one model, bit for bit
    assert float(want.abs().max()) > 0.1  # not a trivially zero output


def test_lambda_zero_removes_the_intruders_and_the_control_leaves_them(tiny_base):
    cfg, model = with_intruders(tiny_base)
    assert counts_at_half(cfg, tiny_base, model) == [2, 2, 2, 2]
    reduced = copy.deepcopy(model)
    rescale_directions(reduced, 0.0, INTRUDER)
    assert counts_at_half(cfg, tiny_base, reduced) == [0, 0, 0, 0]
    half = copy.deepcopy(model)
    rescale_directions(half, 0.5, INTRUDER)  # halved, still above every base singular value
    assert counts_at_half(cfg, tiny_base, half) == [2, 2, 2, 2]
    control = copy.deepcopy(model)
    done = rescale_directions(control, 0.0, CONTROL)
    assert counts_at_half(cfg, tiny_base, control) == [2, 2, 2, 2]
    # the control rescaled the two largest non-intruders: indices 2 and 3 after the intruders
    assert {tuple(m["directions"]) for m in done["modules"].values()} == {(2, 3)}


# --------------------------------------------------------------------------- on matrices

def test_the_control_takes_the_largest_non_intruders():
    assert control_directions([0, 3], 6) == [1, 2]
    assert control_directions([2], 6) == [0]
    assert control_directions([1, 2], 6) == [0, 3]
    assert control_directions([], 6) == []
    assert control_directions([0, 1, 2], 4) == [3]  # no more directions to take


S_BASE = [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
DELTA = 2.0  # a non-intruder update: along the base's first direction


def built(sigma: float):
    """W0 (16 x 8, singular values S_BASE along e_i, f_i) and an update
    dW = DELTA e_1 f_1^T + sigma u* f_8^T, u* = (e_9 + ... + e_16)/sqrt(8) outside W0's
    column space. W0 + dW has the exact SVD: (8 + DELTA, e_1, f_1), the base's other
    triplets, and (sqrt(1 + sigma^2), (e_8 + sigma u*)/norm, f_8): an intruder (|cos| with
    e_8 = 1/sqrt(1 + sigma^2) < 0.5), the largest for sigma >= 10."""
    w0 = torch.zeros(16, 8, dtype=torch.float64)
    for i, s in enumerate(S_BASE):
        w0[i, i] = s
    ustar = torch.zeros(16, dtype=torch.float64)
    ustar[8:] = 1 / math.sqrt(8)
    dw = torch.zeros(16, 8, dtype=torch.float64)
    dw[0, 0] = DELTA
    dw[:, 7] += sigma * ustar
    return w0, dw, ustar


def arm_update(w0, dw, arm, lam, r=2):
    u_base, w, u, s, vh = merged_svd(w0, dw)
    intruders = intruder_directions(u_base, u, top_k=10, epsilon=0.5)
    idx = intruders if arm == INTRUDER else control_directions(intruders, len(s))
    b, a, dropped, total = rescaled_update(w0, w, u, s, vh, idx, lam, 1.0, r)
    return intruders, idx, b @ a, dropped / total


def test_directions_of_a_built_update():
    w0, dw, _ = built(12.0)
    u_base, _, u, s, _ = merged_svd(w0, dw)
    torch.testing.assert_close(s[:3], torch.tensor([math.sqrt(145), 10.0, 7.0],
                                                   dtype=torch.float64))
    assert intruder_directions(u_base, u, 10, 0.5) == [0]
    for arm, want in ((INTRUDER, [0]), (CONTROL, [1])):
        assert arm_update(w0, dw, arm, 0.5)[1] == want


def test_both_arms_rebuild_at_rank_r_with_the_truncation_by_hand():
    w0, dw, _ = built(12.0)
    # lambda 0.5, r = 1. Intruder arm: dW' = 2 e_1 f_1^T + (6 u* - 0.5 e_8) f_8^T, singular
    # values 2 and sqrt(36.25): 4 / 40.25 dropped. Control: (2 - 0.5 * 10) e_1 f_1^T
    # + 12 u* f_8^T, singular values 3 and 12: 9 / 153 dropped.
    for arm, want in ((INTRUDER, 4 / 40.25), (CONTROL, 9 / 153)):
        _, _, new, dropped = arm_update(w0, dw, arm, 0.5, r=1)
        assert torch.linalg.matrix_rank(new) == 1
        assert dropped == pytest.approx(want, rel=1e-12)
    for arm in (INTRUDER, CONTROL):  # r = 2: nothing to drop
        _, _, new, dropped = arm_update(w0, dw, arm, 0.5, r=2)
        assert torch.linalg.matrix_rank(new) <= 2 and dropped == pytest.approx(0, abs=1e-12)
    rng = np.random.default_rng(0)  # a generic update: rank <= r after the rebuild
    w0 = torch.tensor(rng.standard_normal((12, 10)))
    dw = torch.tensor(rng.standard_normal((12, 3)) @ rng.standard_normal((3, 10)) * 4)
    for arm in (INTRUDER, CONTROL):
        _, idx, new, dropped = arm_update(w0, dw, arm, 0.25, r=3)
        assert idx and torch.linalg.matrix_rank(new) <= 3 and 0 < dropped < 1


def sweep_of(scorer, sigmas=(12.0, 14.0, 16.0), lambdas=(1.0, 0.5, 0.0)):
    """Per-model results as sweep_model writes them, one "seed" per sigma, scored by
    ``scorer(W)`` on W0 + the rebuilt update of each arm."""
    out = []
    for seed, sigma in enumerate(sigmas):
        w0, dw, ustar = built(sigma)

        def entry(w, ustar=ustar):
            return {"score": scorer(w, ustar), "drift": {"mean": 0.0}, "metric": "toy"}

        arms = {arm: {f"{lam:g}": {"lambda": lam,
                                   **entry(w0 + arm_update(w0, dw, arm, lam)[2])}
                      for lam in lambdas} for arm in (INTRUDER, CONTROL)}
        out.append({"task": "toy", "seed": seed, "reference": entry(w0 + dw), "arms": arms})
    return out


def reads_intruder(w, ustar):
    return float(ustar @ w[:, 7])  # u*^T W f_8: sigma in the trained matrix


def reads_neither(w, ustar):
    return float(w[2, 2])  # e_3^T W f_3: the base's third direction, untouched by both


def test_an_intruder_that_carries_the_score_change_is_found():
    c = contrasts(sweep_of(reads_intruder), ["toy"], [1.0, 0.5, 0.0], ["score"], 3)
    rows = {r["lambda"]: r for r in c["rows"]}
    # lambda 0.5: the intruder arm halves sigma (12, 14, 16 -> -6, -7, -8); the control's
    # direction is orthogonal to u* and f_8: 0. Differences -6, -7, -8: mean -7, sd 1,
    # t = -7 sqrt(3); with 2 df, p = 1 - |t| / sqrt(t^2 + 2) = 1 - sqrt(147 / 149)
    half = rows[0.5]
    np.testing.assert_allclose(half["intruder_change"], [-6, -7, -8], atol=1e-9)
    np.testing.assert_allclose(half["control_change"], [0, 0, 0], atol=1e-9)
    assert half["mean_difference"] == pytest.approx(-7) and half["sd_difference"] == \
        pytest.approx(1)
    assert half["t"] == pytest.approx(-7 * math.sqrt(3), rel=1e-6)
    assert half["p"] == pytest.approx(1 - math.sqrt(147 / 149), rel=1e-6)
    assert half["n_tests"] == 2 and half["p_bonferroni"] == pytest.approx(2 * half["p"])
    assert half["significant"] is True
    zero = rows[0.0]  # removed: -12, -14, -16
    np.testing.assert_allclose(zero["difference"], [-12, -14, -16], atol=1e-9)
    assert zero["significant"] is True
    one = rows[1.0]  # the same model in both arms: stated, not tested
    assert one["tested"] is False and one["p"] is None and one["difference"] == [0, 0, 0]
    assert c["families"]["score"]["members"] == ["toy λ=0.5 score", "toy λ=0 score"]


def test_a_score_neither_arm_carries_gives_no_difference():
    c = contrasts(sweep_of(reads_neither), ["toy"], [1.0, 0.5, 0.0], ["score"], 3)
    for r in c["rows"]:
        np.testing.assert_allclose(r["intruder_change"] + r["control_change"], 0, atol=1e-9)
        assert r["mean_difference"] == pytest.approx(0, abs=1e-9)
        assert r["significant"] is False and r["p"] is None
    assert [r["zero_spread"] for r in c["rows"]] == [False, True, True]  # λ=1: not tested


def test_a_task_without_seeds_stays_in_the_family_untested():
    c = contrasts(sweep_of(reads_intruder, sigmas=(12.0,)), ["toy", "other"], [1.0, 0.0],
                  ["score"], 3)
    assert c["families"]["score"]["size"] == 2
    rows = {(r["task"], r["lambda"]): r for r in c["rows"]}
    assert rows[("toy", 0.0)]["p"] is None and "1 seed" in rows[("toy", 0.0)]["note"]
    assert rows[("other", 0.0)]["p"] is None and rows[("other", 0.0)]["seeds"] == []


def test_the_detectable_difference_has_the_power_it_claims():
    """Simulated: 3 pairs with mean d_z * sd, the t-test at alpha rejects ~80% of the time."""
    import scipy.stats

    rng = np.random.default_rng(0)
    for n, alpha in ((3, 0.05), (5, 0.01)):
        dz = paired_t_detectable_dz(n, alpha)
        x = rng.standard_normal((40_000, n)) + dz
        p = scipy.stats.ttest_1samp(x, 0.0, axis=1).pvalue
        assert float(np.mean(p < alpha)) == pytest.approx(0.8, abs=0.01)
    assert paired_t_detectable_dz(3) == pytest.approx(3.26, abs=0.01)


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
