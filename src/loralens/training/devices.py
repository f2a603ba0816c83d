"""What runs where: the parts of the study that differ between a CUDA GPU and the CPU.

One place decides, from the device (never from a preset), so that a GPU-only setting of
the published configuration falls back on the CPU with a note instead of failing, and
an explicit GPU-only request fails with an error naming its key:

* :func:`training_device`: the device training, the sanity check and the serving
  benchmark run on (the first CUDA GPU when there is one, else the CPU);
* :func:`make_optimizer`: the optimizer of a method (``train.optimizer_full``: the study
  fine-tunes fully with bitsandbytes' 8-bit AdamW, state paged to the CPU, on a GPU);
* :func:`serving_dtype`: the dtype the serving benchmark loads its models in (the study
  serves in bf16 on a GPU; float32 on the CPU).

Nothing here moves a tensor: tests pass ``torch.device("cuda")`` objects and fake
modules on a CPU-only machine.
"""

from __future__ import annotations

import importlib

import torch

from loralens.core.errors import ConfigError
from loralens.models.methods import OPTIMIZER_KINDS, kind_trains_all

OPTIMIZER_KEY = "train.optimizer_full"
OPTIMIZER_FULL_CHOICES = ("adamw", "adamw_8bit_paged", "auto")
PAGED_NOTE = ("full fine-tuning: 8-bit paged AdamW (bitsandbytes PagedAdamW8bit; optimizer "
              "state in 8 bits, paged to the CPU)")
FALLBACK_NOTE = ("8-bit paged AdamW needs a CUDA GPU and bitsandbytes; using torch AdamW "
                 "(fp32 state)")
SERVING_FALLBACK_NOTE = ("serving benchmark: bf16 needs a CUDA GPU; serving in float32 on the "
                         "CPU (train.precision auto)")
PRECISIONS = ("auto", "fp32", "bf16")


def training_device() -> torch.device:
    """The device models train and serve on: ``cuda`` (the current GPU) when CUDA is
    available, else the CPU (as ``train.train_model`` chooses)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def param_groups(params: list[torch.Tensor], weight_decay: float) -> list[dict]:
    """AdamW groups with weight decay on matrices only (biases, norms and 1-D weights get
    none), as the training loop uses them."""
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _bitsandbytes():
    """(module, None) when bitsandbytes imports, else (None, why)."""
    try:
        return importlib.import_module("bitsandbytes"), None
    except Exception as e:  # ImportError, or a broken CUDA set-up raising on import
        return None, f"{type(e).__name__}: {e}"


def torch_adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    """torch's AdamW, the fused kernel where the parameters' device and dtype allow it
    (~8x faster than the per-tensor loop for 135M parameters on the CPU)."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr)


def make_optimizer(groups: list[dict], lr: float, method: str, optimizer_full: str,
                   device: torch.device | str) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer of ``method`` for parameter ``groups`` (:func:`param_groups`), and a
    note to print ("" when there is nothing to say).

    ``lora`` always gets torch's AdamW. ``full`` follows ``optimizer_full``
    (``train.optimizer_full``):

    * ``adamw``: torch's AdamW (fused where available);
    * ``adamw_8bit_paged``: ``bitsandbytes.optim.PagedAdamW8bit``; a ``ConfigError``
      naming ``train.optimizer_full`` when ``device`` is not a CUDA device or
      bitsandbytes does not import;
    * ``auto``: PagedAdamW8bit on a CUDA device with bitsandbytes importable, else torch's
      AdamW with the note :data:`FALLBACK_NOTE`.
    """
    if method not in OPTIMIZER_KINDS:
        raise ValueError(f"unknown method {method!r}; use "
                         + " or ".join(repr(k) for k in OPTIMIZER_KINDS))
    if optimizer_full not in OPTIMIZER_FULL_CHOICES:
        raise ConfigError(f"{OPTIMIZER_KEY}: {optimizer_full!r} is not one of "
                          f"{list(OPTIMIZER_FULL_CHOICES)}", OPTIMIZER_KEY)
    if not kind_trains_all(method) or optimizer_full == "adamw":
        return torch_adamw(groups, lr), ""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    bnb, why = _bitsandbytes() if on_cuda else (None, None)
    if bnb is not None:
        return bnb.optim.PagedAdamW8bit(groups, lr=lr), PAGED_NOTE
    if optimizer_full == "auto":
        return torch_adamw(groups, lr), FALLBACK_NOTE
    if not on_cuda:
        raise ConfigError(
            f"{OPTIMIZER_KEY}: adamw_8bit_paged needs a CUDA GPU and training runs on "
            f"{device.type}; set {OPTIMIZER_KEY}=auto (8-bit paged on a GPU, torch AdamW "
            "elsewhere) or adamw", OPTIMIZER_KEY)
    raise ConfigError(
        f"{OPTIMIZER_KEY}: adamw_8bit_paged needs bitsandbytes, which does not import "
        f"({why}); pip install bitsandbytes, or set {OPTIMIZER_KEY}=auto or adamw",
        OPTIMIZER_KEY)


def optimizer_for(groups: list[dict], lr: float, method: str, tc,
                  device: torch.device | str) -> tuple[torch.optim.Optimizer, str]:
    """:func:`make_optimizer` with ``train.optimizer_full`` read from ``tc`` (a
    ``TrainConfig``)."""
    return make_optimizer(groups, lr, method, tc.optimizer_full, device)


def serving_dtype(device: torch.device | str, requested: str = "auto"
                  ) -> tuple[torch.dtype, str]:
    """(dtype the serving benchmark loads its models in, note; "" when nothing to say).

    ``requested`` uses ``train.precision``'s values: ``auto`` = bfloat16 on a CUDA device
    (the study serves in bf16), float32 on the CPU (with :data:`SERVING_FALLBACK_NOTE`);
    ``bf16`` = bfloat16 anywhere; ``fp32`` = float32 anywhere.
    """
    if requested not in PRECISIONS:
        raise ConfigError(f"train.precision: {requested!r} is not one of {list(PRECISIONS)}",
                          "train.precision")
    if requested == "fp32":
        return torch.float32, ""
    if requested == "bf16" or torch.device(device).type == "cuda":
        return torch.bfloat16, ""
    return torch.float32, SERVING_FALLBACK_NOTE


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")
