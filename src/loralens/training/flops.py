"""FLOPs, measured peaks and model FLOPs utilisation (MFU), as nanoGPT reports it.

Counting (Kaplan et al.; nanoGPT's ``estimate_mfu`` without the attention term):
a forward pass costs ``2 N`` FLOPs per token, with ``N`` the non-embedding parameters
(an embedding lookup multiplies nothing); the backward pass costs ``2 N`` for the
gradient with respect to the activations and ``2 N`` for the gradient with respect to
the weights. Full fine-tuning therefore costs ``6 N`` per training token; LoRA, whose
frozen weights get no weight gradient, ``4 N`` (plus ``6 n`` for its ``n`` adapter and
head parameters, a fraction of a percent at rank 8). Only real tokens count: padding
is work the study does not want done.

Peaks are *measured* per process and dtype (:func:`gemm_peak`, :func:`model_gemm_peak`),
on the machine that trains, so that an MFU means the same thing on a laptop, a 2-core VM
and an H200: the achieved FLOP/s over the FLOP/s of ``torch.mm`` in the dtype the model
computes in. A peak is the best of several repeats (a repeat slowed by other work on the
cores is not the machine's peak), measured again when asked with ``max_age_s`` (the
training loop does after training) and kept at the maximum of all measurements; each
records the 1-minute load average when it was taken (:class:`Peak`), so that a peak
measured while other work shared the cores, and the utilisation above 100% it gives,
can be reported as the failed measurement it is.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from loralens.models.methods import kind_trains_all

SQUARE = 2048  # side of the square GEMM that measures the peak


def _embedding_params(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
            for p in m.parameters(recurse=False)}


def _unused(model: nn.Module) -> set[int]:
    """Parameters a forward pass never multiplies: PEFT keeps the original of a module it
    trains a copy of (``modules_to_save``: the head) as ``original_module``."""
    return {id(p) for n, p in model.named_parameters() if ".original_module." in f".{n}"}


def non_embedding_params(model: nn.Module) -> int:
    """Parameters a forward pass multiplies by: outside embedding tables (tied LM heads
    are not in a classifier), each counted once, PEFT's unused originals left out."""
    skip = _embedding_params(model) | _unused(model)
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def trainable_non_embedding_params(model: nn.Module) -> int:
    skip = _embedding_params(model) | _unused(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in skip)


def train_flops_per_token(model: nn.Module, method: str) -> int:
    """FLOPs of one training token: ``6 N`` (full) or ``4 N + 2 n`` (LoRA: ``n`` trainable
    adapter and head parameters also get weight gradients)."""
    n = non_embedding_params(model)
    if kind_trains_all(method):
        return 6 * n
    return 4 * n + 2 * trainable_non_embedding_params(model)


def forward_flops_per_token(model: nn.Module) -> int:
    return 2 * non_embedding_params(model)


@dataclass(frozen=True)
class Peak:
    """A measured peak: the best FLOP/s over every measurement of it in this process."""

    flops_per_s: float
    load: float | None      # 1-minute load average when the kept measurement began
    cpus: int | None        # os.cpu_count() of the machine
    measurements: int = 1   # measurements the maximum was taken over


def load_average() -> float | None:
    """The 1-minute load average (os.getloadavg), None where the system has none."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


# key -> (best peak so far, time.monotonic() of the latest measurement)
_PEAKS: dict[tuple, tuple[Peak, float]] = {}


def _best_of(key: tuple, measure, max_age_s: float | None) -> Peak:
    """The best measurement of ``key`` so far; measured (again) when there is none or the
    latest is older than ``max_age_s`` seconds (None: never again), keeping the max."""
    held = _PEAKS.get(key)
    now = time.monotonic()
    if held is not None and (max_age_s is None or now - held[1] < max_age_s):
        return held[0]
    load = load_average()  # before the measurement adds its own threads to it
    new = Peak(measure(), load, os.cpu_count())
    count = 1 + (held[0].measurements if held else 0)
    best = held[0] if held and held[0].flops_per_s >= new.flops_per_s else new
    best = Peak(best.flops_per_s, best.load, best.cpus, count)
    _PEAKS[key] = (best, time.monotonic())
    return best


def _best_seconds(fn, repeats: int = 5, min_seconds: float = 0.05) -> float:
    """Seconds per call of ``fn``: the fastest of ``repeats`` timed repeats (a peak is
    what the hardware can do; a slower repeat measured other work on the cores)."""
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        t0, k = time.perf_counter(), 0
        while True:
            fn()
            k += 1
            if time.perf_counter() - t0 >= min_seconds:
                break
        times.append((time.perf_counter() - t0) / k)
    return min(times)


def gemm_peak(dtype: torch.dtype = torch.float32, device: str = "cpu",
              side: int = SQUARE, max_age_s: float | None = None) -> float:
    """FLOP/s of a large square ``torch.mm`` in ``dtype`` (best of 5; :func:`gemm_peak_info`)."""
    return gemm_peak_info(dtype, device, side, max_age_s).flops_per_s


def gemm_peak_info(dtype: torch.dtype = torch.float32, device: str = "cpu",
                   side: int = SQUARE, max_age_s: float | None = None) -> Peak:
    """The square-GEMM peak with its load: measured once per process, again when the
    latest measurement is older than ``max_age_s`` seconds, the maximum kept."""
    device, side = str(device), int(side)
    return _best_of(("square", dtype, device, side),
                    lambda: _gemm_flops(dtype, device, side), max_age_s)


def _private_generator(device: str) -> torch.Generator:
    """The timing operands' own random numbers: the first job of a process measures the
    peak (cached), and drawing from the global generator after its seed_everything would
    change its dropout and shuffles, so a job's results would depend on what ran before
    it in its process (a Ray worker, a resumed run)."""
    return torch.Generator(device=device).manual_seed(0)


def _gemm_flops(dtype: torch.dtype, device: str, side: int) -> float:
    g = _private_generator(device)
    a = torch.randn(side, side, device=device, generator=g).to(dtype)
    b = torch.randn(side, side, device=device, generator=g).to(dtype)

    def mm():
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()

    return 2 * side ** 3 / _best_seconds(mm)


def model_shapes(config) -> list[tuple[int, int, int]]:
    """(in, out, count per layer) of a Llama-style decoder layer's linear maps."""
    h = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    inter = config.intermediate_size
    return [(h, heads * head_dim, 2),          # q_proj, o_proj (o: heads*hd -> h, same FLOPs)
            (h, kv * head_dim, 2),             # k_proj, v_proj
            (h, inter, 2),                     # gate_proj, up_proj
            (inter, h, 1)]                     # down_proj


def _model_gemm_flops(shapes: tuple, tokens: int, dtype: torch.dtype, device: str) -> float:
    flops, seconds = 0.0, 0.0
    g = _private_generator(device)
    for k, n, count in shapes:
        x = torch.randn(tokens, k, device=device, generator=g).to(dtype)
        w = torch.randn(n, k, device=device, generator=g).to(dtype)

        def lin():
            nn.functional.linear(x, w)
            if device != "cpu":
                torch.cuda.synchronize()

        seconds += count * _best_seconds(lin, repeats=3, min_seconds=0.02)
        flops += count * 2 * tokens * k * n
    return flops / seconds


def model_gemm_peak(config, tokens: int, dtype: torch.dtype = torch.float32,
                    device: str = "cpu", max_age_s: float | None = None) -> float:
    """FLOP/s of the model's own GEMMs (``tokens`` x hidden x q/kv/MLP widths) in ``dtype``,
    weighted by how often a layer runs each (:func:`model_gemm_peak_info`)."""
    return model_gemm_peak_info(config, tokens, dtype, device, max_age_s).flops_per_s


def model_gemm_peak_info(config, tokens: int, dtype: torch.dtype = torch.float32,
                         device: str = "cpu", max_age_s: float | None = None) -> Peak:
    """The model-shape peak with its load, kept per process as :func:`gemm_peak_info`
    keeps the square one (tokens rounded up to a multiple of 64 so that batches of similar
    size share a measurement)."""
    tokens = max(64, -(-int(tokens) // 64) * 64)
    shapes, device = tuple(model_shapes(config)), str(device)
    return _best_of(("model", shapes, tokens, dtype, device),
                    lambda: _model_gemm_flops(shapes, tokens, dtype, device), max_age_s)


def mfu(achieved: float, peak: float) -> float:
    return float(achieved / peak) if peak > 0 else float("nan")

