"""FLOPs, measured peaks and model FLOPs utilisation (MFU), as nanoGPT reports it.

Counting (Kaplan et al.; nanoGPT's ``estimate_mfu`` without the attention term):
a forward pass costs ``2 N`` FLOPs per token, with ``N`` the non-embedding parameters
(an embedding lookup multiplies nothing); the backward pass costs ``2 N`` for the
gradient with respect to the activations and ``2 N`` for the gradient with respect to
the weights. Full fine-tuning therefore costs ``6 N`` per training token; LoRA, whose
frozen weights get no weight gradient, ``4 N`` (plus ``6 n`` for its ``n`` adapter and
head parameters, a fraction of a percent at rank 8). Only real tokens count: padding
is work the study does not want done.

Peaks are *measured*, once per process and dtype (:func:`gemm_peak`,
:func:`model_gemm_peak`), on the machine that trains, so that an MFU means the same
thing on a laptop, a 2-core VM and an H200: the achieved FLOP/s over the FLOP/s of
``torch.mm`` in the dtype the model computes in.
"""

from __future__ import annotations

import functools
import statistics
import time

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


def _median_seconds(fn, repeats: int = 5, min_seconds: float = 0.05) -> float:
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
    return statistics.median(times)


def gemm_peak(dtype: torch.dtype = torch.float32, device: str = "cpu",
              side: int = SQUARE) -> float:
    """FLOP/s of a large square ``torch.mm`` in ``dtype`` (median of 5), cached per process."""
    return _gemm_peak(dtype, str(device), int(side))


def _private_generator(device: str) -> torch.Generator:
    """The timing operands' own random numbers: the first job of a process measures the
    peak (cached), and drawing from the global generator after its seed_everything would
    change its dropout and shuffles, so a job's results would depend on what ran before
    it in its process (a Ray worker, a resumed run)."""
    return torch.Generator(device=device).manual_seed(0)


@functools.cache
def _gemm_peak(dtype: torch.dtype, device: str, side: int) -> float:
    g = _private_generator(device)
    a = torch.randn(side, side, device=device, generator=g).to(dtype)
    b = torch.randn(side, side, device=device, generator=g).to(dtype)

    def mm():
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()

    return 2 * side ** 3 / _median_seconds(mm)


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


@functools.cache
def _model_gemm_peak(shapes: tuple, tokens: int, dtype: torch.dtype, device: str) -> float:
    flops, seconds = 0.0, 0.0
    g = _private_generator(device)
    for k, n, count in shapes:
        x = torch.randn(tokens, k, device=device, generator=g).to(dtype)
        w = torch.randn(n, k, device=device, generator=g).to(dtype)

        def lin():
            nn.functional.linear(x, w)
            if device != "cpu":
                torch.cuda.synchronize()

        seconds += count * _median_seconds(lin, repeats=3, min_seconds=0.02)
        flops += count * 2 * tokens * k * n
    return flops / seconds


def model_gemm_peak(config, tokens: int, dtype: torch.dtype = torch.float32,
                    device: str = "cpu") -> float:
    """FLOP/s of the model's own GEMMs (``tokens`` x hidden x q/kv/MLP widths) in ``dtype``,
    weighted by how often a layer runs each; cached per process (tokens rounded up to a
    multiple of 64 so that batches of similar size share a measurement)."""
    tokens = max(64, -(-int(tokens) // 64) * 64)
    return _model_gemm_peak(tuple(model_shapes(config)), tokens, dtype, device)


def mfu(achieved: float, peak: float) -> float:
    return float(achieved / peak) if peak > 0 else float("nan")
