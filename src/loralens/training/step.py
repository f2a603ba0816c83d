"""One training step, as ``loop.fit`` takes it and the dry run times it.

:func:`build_train_step` makes a classifier (its method already applied) ready to train
and returns a :class:`TrainStep`:

* the dtype training computes in: ``train.precision`` resolved for the device
  (``precision.choose``), cast once on the CPU (``precision.CastOnce``), torch's autocast
  on a GPU;
* gradient checkpointing where ``train.gradient_checkpointing`` says (``on``; ``auto``:
  on a CUDA GPU), ``torch.compile`` of the forward with ``train.compile``;
* the method's optimizer (``devices.make_optimizer``) over the trained parameters (their
  float32 masters where the model computes in bfloat16), weight decay on matrices only,
  LoRA+'s faster B matrices, the classification head at ``train.lr_head`` where it is set;
* the step itself: :meth:`TrainStep.forward_backward` (forward, loss, backward of one
  micro-batch) and :meth:`TrainStep.optimizer_step` (gradients to the masters, clipping,
  the optimizer, masters back to the model, the method's step hook, the schedule, zeroed
  gradients).

A PEFT method whose tuner needs a call after each optimizer step (AdaLoRA's rank
allocation) declares it in the method registry (``Method.step_hook``, found from the model
by ``methods.step_hook_of``); :meth:`TrainStep.optimizer_step` calls it with the steps taken
and ``TrainStep.total_steps``, the job's optimizer steps, which the loop sets.

The loop adds what spans steps (the schedule, accumulation, early stopping, data
parallel); the dry run (``loralens.study.plan.measure``) times a few of these steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from loralens.core.config import TrainConfig
from loralens.models.methods import head_groups, loraplus_groups, step_hook_of
from loralens.training import batches as B
from loralens.training import precision as P
from loralens.training.devices import make_optimizer, param_groups
from loralens.training.flops import train_flops_per_token


def model_config(model: nn.Module):
    """The backbone's transformers config (of a classifier, PEFT-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "config", None)


def tokens_per_batch(enc: B.Encoded, batch_size: int) -> int:
    """Real tokens of a mean training batch of ``enc`` (64 for an empty split): the size
    the CPU's bfloat16 / float32 GEMMs are compared and the peaks measured at."""
    return int(max(1, round(float(np.mean(enc.lengths)) * batch_size))) if len(enc) else 64


def checkpointing_on(tc: TrainConfig, device: torch.device) -> bool:
    """``train.gradient_checkpointing``: ``on``, or ``auto`` on a CUDA GPU."""
    return tc.gradient_checkpointing == "on" or (
        tc.gradient_checkpointing == "auto" and device.type == "cuda")


def _enable_checkpointing(model: nn.Module) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


@dataclass
class TrainStep:
    """A model ready to train and its step (see the module doc); build with
    :func:`build_train_step`, end with :meth:`finish`."""

    model: nn.Module                 # the classifier, trained in place
    step_model: nn.Module            # what the forward runs: ``model`` or its torch.compile
    mp: P.CastOnce                   # the precision wrapper; ``mp.params``: what is stepped
    opt: torch.optim.Optimizer
    device: torch.device
    dtype: torch.dtype               # the dtype training computes in
    max_grad_norm: float             # 0: no clipping
    flops_per_token: int             # FLOPs of one real training token (flops.py)
    precision_note: str = ""
    optimizer_note: str = ""         # "" when there is nothing to say
    compiled: bool = False
    step_hook: Callable | None = None  # the method's call after each optimizer step
    total_steps: int | None = None   # the job's optimizer steps (the loop sets it; hooks read it)
    steps_done: int = 0              # optimizer steps taken

    def forward_backward(self, b: B.Batch, weight: float = 1.0) -> float:
        """Forward and backward of one micro-batch, its loss scaled by ``weight`` (the
        batch's share of the accumulation window); returns the batch's mean loss."""
        device = self.device
        with P.autocast(device, self.dtype):
            out = self.step_model(input_ids=b.input_ids.to(device),
                                  attention_mask=b.attention_mask.to(device),
                                  labels=b.labels.to(device))
        (out.loss * weight).backward()
        return float(out.loss.detach())

    def optimizer_step(self, reduce_grads: Callable[[list[torch.Tensor]], None] | None = None,
                       schedule=None) -> None:
        """Gradients up to the float32 masters, ``reduce_grads`` (data parallel: the sum over
        ranks), clipping to ``train.max_grad_norm``, the optimizer's step, masters down to
        the model, ``schedule.step()``, gradients zeroed."""
        self.mp.grads_to_masters()
        if reduce_grads is not None:
            reduce_grads(self.mp.params)
        if self.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(self.mp.params, self.max_grad_norm)
        self.opt.step()
        self.mp.masters_to_model()
        if self.step_hook is not None:  # before the gradients are cleared: AdaLoRA reads them
            self.step_hook(self.model, self.steps_done, self.total_steps)
        self.steps_done += 1
        if schedule is not None:
            schedule.step()
        self.opt.zero_grad(set_to_none=True)

    def finish(self) -> None:
        """Float32 again (``CastOnce.finish``): what reads the model after training reads
        float32."""
        self.mp.finish()


def build_train_step(model: nn.Module, tc: TrainConfig, lr: float, method: str, *,
                     lr_ratio: float | None = None, tokens: int = 1024,
                     compile: bool | None = None) -> TrainStep:
    """Make ``model`` (its method applied, on its device) ready to train; its step.

    ``method``: the optimizer kind (``Method.optimizer_kind``: ``full`` follows
    ``train.optimizer_full``, the rest get torch's AdamW) and the FLOP count's;
    ``lr_ratio`` (LoRA+) trains LoRA's B matrices at ``lr_ratio * lr``;
    ``train.lr_head`` (``tc.lr_head``, None: ``lr``) the head's parameters; ``tokens``: real
    tokens of a typical training batch (:func:`tokens_per_batch`), the size at which
    ``train.precision=auto`` compares the CPU's bfloat16 and float32 GEMMs; ``compile``
    overrides ``train.compile``.
    """
    device = next(model.parameters()).device
    dtype, precision_note = P.choose(tc.precision, device, model_config(model), tokens)
    fpt = train_flops_per_token(model, method)
    # bfloat16 on the CPU: cast once (P.CastOnce); on a GPU: autocast (P.autocast)
    mp = P.CastOnce(model, dtype if device.type == "cpu" else torch.float32)
    step_model, compiled = model, False
    if tc.compile if compile is None else compile:
        step_model, compiled = torch.compile(model, dynamic=True), True
    groups = param_groups(mp.params, tc.weight_decay)
    if lr_ratio:  # LoRA+: lora_B at lr_ratio times the rate of the rest
        groups = loraplus_groups(groups, mp.names, lr, lr_ratio)
    if tc.lr_head is not None:  # the classification head at its own rate
        groups = head_groups(groups, mp.names, lr, tc.lr_head)
    opt, optimizer_note = make_optimizer(groups, lr, method, tc.optimizer_full, device)
    if checkpointing_on(tc, device):
        _enable_checkpointing(model)
    return TrainStep(model, step_model, mp, opt, device, dtype, tc.max_grad_norm, fpt,
                     precision_note, optimizer_note, compiled, step_hook_of(model))
