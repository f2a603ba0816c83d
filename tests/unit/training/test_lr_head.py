"""``train.lr_head``: the classification head at its own learning rate, for every method,
through warm-up and decay (``training/step.py``, ``models/methods.head_groups``). On the
tiny random Llama (seconds)."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from loralens.core.config import StudyConfig
from loralens.models.classifier import apply_method, build_classifier
from loralens.models.methods import get_method, is_head_param
from loralens.training import batches as B
from loralens.training import loop
from loralens.training import step as S
from tests.helpers.training import EOS, tiny_encoded

HEAD_NAMES = {"lora": "base_model.model.score.modules_to_save.default.weight",
              "full": "score.weight"}


def model_for(backbone, method):
    return apply_method(build_classifier(backbone, 2, seed=0), method, StudyConfig())


def train_config(**kw):
    # fp32: the CPU's bf16 choice would add float32 masters (same names, other tensors)
    return replace(StudyConfig().train, precision="fp32", **kw)


def build(model, method, lr=1e-4, **tc_kw):
    meth = get_method(method)
    return S.build_train_step(model, train_config(**tc_kw), lr, meth.optimizer_kind,
                              lr_ratio=meth.lr_ratio)


def group_lrs(step):
    """(the head's rate, the sorted distinct rates of the other groups) of the optimizer."""
    head = next(p for n, p in step.model.named_parameters() if is_head_param(n)
                and p.requires_grad)
    (head_lr,) = [g["lr"] for g in step.opt.param_groups if any(p is head for p in g["params"])]
    rest = sorted({g["lr"] for g in step.opt.param_groups
                   if not any(p is head for p in g["params"])})
    return head_lr, rest


def test_head_params_are_named_once():
    assert is_head_param("score.weight")
    assert is_head_param("base_model.model.score.modules_to_save.default.weight")
    assert not is_head_param("model.layers.0.self_attn.q_proj.weight")
    assert not is_head_param("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
    assert not is_head_param("model.layers.0.mlp.score.weight")   # only the classifier's own


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_head_gets_its_own_rate_and_the_rest_the_methods(tiny_backbone, method):
    model = model_for(tiny_backbone, method)
    step = build(model, method, lr=1e-4, lr_head=1e-2)
    head_groups = [g for g in step.opt.param_groups if g["lr"] == 1e-2]
    head_ids = {id(p) for g in head_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert head_ids == {id(named[HEAD_NAMES[method]])}   # LoRA: the trained modules_to_save copy
    rest = [p for g in step.opt.param_groups if g["lr"] == 1e-4 for p in g["params"]]
    n_trained = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(rest) == n_trained - 1 and {g["lr"] for g in step.opt.param_groups} == {1e-2, 1e-4}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_without_lr_head_one_rate_for_all(tiny_backbone, method):
    step = build(model_for(tiny_backbone, method), method, lr=1e-4)
    assert {g["lr"] for g in step.opt.param_groups} == {1e-4}
    assert group_lrs(step) == (1e-4, [1e-4])


def test_loraplus_b_matrices_keep_their_rate_beside_the_head(tiny_backbone):
    step = build(model_for(tiny_backbone, "loraplus"), "loraplus", lr=1e-4, lr_head=1e-2)
    # loraplus: lr_ratio 16 -> lora_B at 1.6e-3, lora_A at 1e-4, the head at 1e-2
    assert group_lrs(step) == (1e-2, [1e-4, pytest.approx(1.6e-3)])
    for g in step.opt.param_groups:
        names = {step.mp.names[id(p)] for p in g["params"]}
        if any("lora_B" in n for n in names):
            assert g["lr"] == pytest.approx(1.6e-3) and all("lora_B" in n for n in names)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_schedule_scales_both_rates_alike(tiny_backbone, method):
    # 80 rows, batch 8, one epoch: 10 optimizer steps, round(0.2 * 10) = 2 of warm-up
    tc = train_config(lr_head=1e-2, batch_size=8, epochs=1, warmup_ratio=0.2)
    step = build(model_for(tiny_backbone, method), method, lr=1e-4, lr_head=1e-2,
                 batch_size=8, epochs=1, warmup_ratio=0.2)
    sched, total = loop._cosine_schedule(step.opt, 80, tc)
    assert total == 10
    seen = [group_lrs(step)]
    for _ in range(7):
        step.opt.step()
        sched.step()
        seen.append(group_lrs(step))
    assert seen[0] == (0.0, [0.0])                              # start of warm-up
    assert seen[1] == (pytest.approx(5e-3), [pytest.approx(5e-5)])   # half-way
    assert seen[2] == (pytest.approx(1e-2), [pytest.approx(1e-4)])   # peak
    # cosine after warm-up: 0.5 * (1 + cos(pi * (7 - 2) / 8)) = 0.30866 at step 7
    f = 0.5 * (1 + math.cos(math.pi * 5 / 8))
    assert seen[7] == (pytest.approx(1e-2 * f), [pytest.approx(1e-4 * f)])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_one_step_moves_the_head_100x_the_backbone(tiny_backbone, method):
    # Adam's first step is lr * g / (|g| + eps) = lr * sign(g) per element: the head's
    # elements move by lr_head, the rest by lr (no warm-up, no weight decay, no clipping)
    model = model_for(tiny_backbone, method)
    step = build(model, method, lr=1e-4, lr_head=1e-2, warmup_ratio=0.0, weight_decay=0.0,
                 max_grad_norm=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    enc = tiny_encoded()
    step.forward_backward(next(B.iter_batches(enc, [np.arange(8)], EOS)))
    step.optimizer_step()
    after = dict(model.named_parameters())
    head_moves = [(after[n] - v).abs() for n, v in before.items() if is_head_param(n)]
    assert len(head_moves) == 1
    moved = head_moves[0][head_moves[0] > 0]
    assert len(moved) > 0 and torch.allclose(moved, torch.full_like(moved, 1e-2), rtol=1e-3)
    # the backbone's (or adapter's) parameters: every element that moved moved by lr
    rest = torch.cat([(after[n] - v).abs().flatten() for n, v in before.items()
                      if not is_head_param(n)])
    rest = rest[rest > 1e-7]
    assert len(rest) > 0 and rest.max() < 1.01e-4 and rest.median() > 0.99e-4
