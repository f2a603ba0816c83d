"""The dtype training computes in, and mixed precision without per-step casts.

``train.precision`` (``auto``, ``fp32``, ``bf16``) is resolved by :func:`choose` from the
device and, on the CPU, from a measurement: bfloat16 GEMMs are ~2x float32 on CPUs with
bf16 dot products and a fast path to them, and *slower* on others (a 2-core VM of this
project's machine type measured 167 bf16 GFLOP/s against 257 in float32). ``auto`` on
the CPU therefore times the model's own GEMM shapes in both dtypes once per process and
trains in bfloat16 only where it pays (:data:`BF16_MIN_GAIN`).

On the CPU bfloat16 is applied once, not per step (autocast re-casts every weight in
every forward and measured 3x slower than float32): :class:`CastOnce`

* ``lora``: the frozen base weights are cast to bfloat16 once; the adapters and the
  head stay float32 (PEFT runs the adapter path in the adapter's dtype), so the trained
  parameters and their optimizer state are float32;
* ``full``: the model's weights are bfloat16 and the optimizer steps float32 *master*
  weights (the classic mixed-precision recipe): gradients are copied up to the masters,
  clipped and stepped there, and the masters are copied down after each step;
* in both, only the GEMMs (linear layers, the embedding lookup) run in bfloat16: their
  inputs are cast down and their outputs up, so the residual stream, the norms, attention
  and the loss stay float32 as under autocast (SmolLM2's activations near 3000 have a
  bfloat16 spacing of 16; a bfloat16 residual stream moved RTE's loss by over 1%);
* :meth:`CastOnce.finish` puts float32 back: the frozen base's original tensors (bit for
  bit: drift is measured against them) and the masters. Reported scores, extraction and
  identity checks run in float32 after training.

On a CUDA device ``bf16`` keeps torch's autocast (fast there).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

BF16_MIN_GAIN = 1.1   # auto trains in bf16 on the CPU when its GEMMs are this much faster


def choose(requested: str, device: torch.device, model_config=None,
           tokens: int = 1024) -> tuple[torch.dtype, str]:
    """(compute dtype, note) for ``train.precision`` = ``requested`` on ``device``."""
    device = torch.device(device)
    if requested == "fp32":
        return torch.float32, "fp32: float32 as configured"
    if requested == "bf16":
        return torch.bfloat16, "bf16: bfloat16 compute as configured"
    if requested != "auto":
        from loralens.core.errors import ConfigError

        raise ConfigError(f"train.precision: {requested!r} is not one of "
                          "['auto', 'fp32', 'bf16']", "train.precision")
    if device.type == "cuda":
        return torch.bfloat16, "auto: bfloat16 autocast on a CUDA GPU"
    if device.type != "cpu" or model_config is None:
        return torch.float32, f"auto: float32 on {device.type}"
    from loralens.training.flops import model_gemm_peak

    f32 = model_gemm_peak(model_config, tokens, torch.float32)
    b16 = model_gemm_peak(model_config, tokens, torch.bfloat16)
    gain = b16 / f32
    if gain >= BF16_MIN_GAIN:
        return torch.bfloat16, (f"auto: this CPU's bfloat16 GEMMs at the model's shapes run "
                                f"{gain:.2f}x float32 ({b16 / 1e9:.0f} vs {f32 / 1e9:.0f} "
                                "GFLOP/s): training computes in bfloat16")
    return torch.float32, (f"auto: this CPU's bfloat16 GEMMs at the model's shapes run "
                           f"{gain:.2f}x float32 ({b16 / 1e9:.0f} vs {f32 / 1e9:.0f} GFLOP/s), "
                           f"under the {BF16_MIN_GAIN}x that pays: training computes in float32")


def dtype_label(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


class CastOnce:
    """Train ``model`` in ``dtype`` with float32 trained parameters (see the module doc).

    ``params`` are what the optimizer steps and clipping sees: the trainable parameters
    themselves (float32 path, LoRA) or their float32 masters (full in bfloat16).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32):
        self.model, self.dtype = model, dtype
        self.hooks: list = []
        self.frozen: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.masters: list[tuple[nn.Parameter, nn.Parameter]] = []
        adapted = hasattr(model, "peft_config")  # PEFT: every trainable is adapter or head
        # torch's CPU LayerNorm (BERT, RoBERTa) refuses a bfloat16 weight on a float32
        # input: its parameters stay float32 (a norm is no GEMM). RMSNorm (Llama) handles it.
        norms = {id(q) for m in model.modules() if isinstance(m, nn.LayerNorm)
                 for q in m.parameters(recurse=False)}
        if dtype != torch.float32:
            for p in model.parameters():
                if not p.is_floating_point() or p.dtype == dtype or id(p) in norms:
                    continue
                if p.requires_grad:
                    if adapted:
                        continue          # LoRA adapters and head: float32 as they are
                    master = nn.Parameter(p.detach().clone(), requires_grad=True)
                    self.masters.append((p, master))
                else:
                    self.frozen.append((p, p.data))
                with torch.no_grad():
                    p.data = p.data.to(dtype)
        self.hooks = _compute_in(model, dtype) if self.active else []
        master_of = {id(p): m for p, m in self.masters}
        self.params = [master_of.get(id(p), p) for p in model.parameters() if p.requires_grad]
        names = {id(p): n for n, p in model.named_parameters()}
        self.names = {id(master_of.get(id(p), p)): names[id(p)]
                      for p in model.parameters() if p.requires_grad}

    @property
    def active(self) -> bool:
        return bool(self.frozen or self.masters)

    def grads_to_masters(self) -> None:
        for p, m in self.masters:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        for p, m in self.masters:
            p.data.copy_(m.data)

    def state(self) -> dict[str, torch.Tensor]:
        """The trained parameters in float32 (masters where there are), by name."""
        return {self.names[id(q)]: q.detach().clone() for q in self.params}

    @torch.no_grad()
    def restore(self, state: dict[str, torch.Tensor]) -> None:
        for q in self.params:
            name = self.names[id(q)]
            if name in state:
                q.copy_(state[name])
        self.masters_to_model()

    @torch.no_grad()
    def finish(self) -> None:
        """Float32 again: the frozen originals, and the masters' values."""
        for p, original in self.frozen:
            p.data = original
        for p, m in self.masters:
            p.data = m.data.detach().clone()
        for h in self.hooks:
            h.remove()
        self.frozen, self.masters, self.hooks = [], [], []


def _compute_in(model: nn.Module, dtype: torch.dtype) -> list:
    """Hooks that run each cast Linear and Embedding in ``dtype`` and hand float32 on: the
    GEMMs are bf16, the residual stream, norms, attention and loss stay float32 (as under
    autocast), without re-casting any weight."""
    def to_weight_dtype(module, args):
        x = args[0]
        if torch.is_floating_point(x) and x.dtype != module.weight.dtype:
            return (x.to(module.weight.dtype), *args[1:])
        return None

    def to_float32(module, args, out):
        return out.float() if torch.is_tensor(out) and out.dtype == dtype else out

    hooks = []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.dtype == dtype:
            if isinstance(m, nn.Linear):
                hooks.append(m.register_forward_pre_hook(to_weight_dtype))
            hooks.append(m.register_forward_hook(to_float32))
    return hooks


def autocast(device: torch.device, dtype: torch.dtype):
    """torch's autocast for bf16 on a CUDA device; nothing elsewhere (CastOnce casts)."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
