"""The one training step (``training/step.py``): what ``loop.fit`` steps with and the dry
run times. On the tiny random Llama (seconds)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from loralens.core.config import StudyConfig
from loralens.models.classifier import apply_method, build_classifier
from loralens.training import batches as B
from loralens.training import loop
from loralens.training import step as S
from tests.helpers.training import EOS, fit_tiny, tiny_encoded


def model_for(backbone, method):
    return apply_method(build_classifier(backbone, 2, seed=0), method, StudyConfig())


def batch(enc, rows=8):
    return next(B.iter_batches(enc, [np.arange(rows)], EOS))


@pytest.mark.parametrize("setting, cpu, cuda", [("on", True, True), ("off", False, False),
                                                ("auto", False, True)])
def test_gradient_checkpointing_rule(setting, cpu, cuda):
    tc = replace(StudyConfig().train, gradient_checkpointing=setting)
    assert S.checkpointing_on(tc, torch.device("cpu")) is cpu
    assert S.checkpointing_on(tc, torch.device("cuda")) is cuda


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_bf16_step_trains_float32_parameters_and_finish_gives_float32_back(tiny_backbone,
                                                                              method):
    model = model_for(tiny_backbone, method)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tc = replace(StudyConfig().train, precision="bf16")
    step = S.build_train_step(model, tc, 1e-2, method)
    assert step.dtype == torch.bfloat16 and step.step_model is model and not step.compiled
    assert step.flops_per_token > 0 and all(p.dtype == torch.float32 for p in step.mp.params)
    loss = step.forward_backward(batch(tiny_encoded()), weight=0.5)
    assert np.isfinite(loss)
    step.optimizer_step()
    assert all(p.grad is None for p in step.mp.params)
    step.finish()
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())   # bit for bit
    assert any(not torch.equal(params[n], v) for n, v in trained.items())


def test_fit_steps_through_the_builder(tiny_backbone, monkeypatch):
    built, steps = [], []
    real_build, real_step = S.build_train_step, S.TrainStep.optimizer_step

    def spy_build(model, tc, lr, method, **kw):
        built.append((method, kw))
        return real_build(model, tc, lr, method, **kw)

    def spy_step(self, *a, **kw):
        steps.append(1)
        return real_step(self, *a, **kw)

    monkeypatch.setattr(loop, "build_train_step", spy_build)
    monkeypatch.setattr(S.TrainStep, "optimizer_step", spy_step)
    enc = tiny_encoded()
    res = fit_tiny(model_for(tiny_backbone, "full"), enc)
    assert built == [("lora", {"lr_ratio": None, "tokens": S.tokens_per_batch(enc, 8)})]
    assert len(steps) == res.steps == 3 and res.flops_per_token > 0
