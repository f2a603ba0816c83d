"""One task of the serving benchmark: its requests, and per seed its served models timed
interleaved at each batch size: every method of the run by the paths :mod:`.paths` gives
it (whole models; PEFT methods separate, merged and, where exact, in our runtime). (The
adapter paths' logits are checked in :mod:`.identity`, in float64.)"""

from __future__ import annotations

import copy
import gc
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from loralens.tasks import sources as TS
from loralens.training import batches as B
from loralens.core.config import StudyConfig
from loralens.models.methods import get_method
from loralens.models.saving import load_trained
from loralens.core.run_dir import RunDir
from loralens.tasks.registry import get_task
from loralens.core.timing import CpuContention, Timings, stopwatch, summarize, time_interleaved
from loralens.serving.bench.measure import MemoryProbe, tensor_bytes
from loralens.models.serving_paths import LEAN, MERGED, PEFT, WHOLE, adapter_name, serving_kinds
from loralens.serving.runtime import MultiLoraClassifier

# The study's kinds, in Table 5's order; other methods' kinds follow in the run's order.
KINDS = ("full", "lora_merged", "lora_separate", "lora_runtime")
TOL = 1e-5  # typical max abs logit difference between equivalent serving paths (float32)
# ... per serving dtype: the rounding scale, recorded beside the serving dtype's identity
# differences as information (the verdict is taken in float64: identity.py). bfloat16 keeps
# 8 significant bits, and equivalent paths round at different places (merged W + s B A vs
# W x + s B A x; PEFT runs the adapter in float32, our runtime in the model's dtype), so
# after a few dozen layers logits differ by a few % of their size: measured on SmolLM2 (30
# layers) in bf16 on the CPU with random r=8 adapters, up to 0.125 at |logit| 4.5 (float32:
# 6e-6, and up to 1.5e-5 with trained adapters).
TOLERANCES = {torch.float32: TOL, torch.bfloat16: 0.5}


def tolerance(dtype: torch.dtype) -> float:
    """Typical max abs logit difference between equivalent serving paths in ``dtype``
    (rounding; information beside the serving dtype's differences, never a verdict)."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no logit tolerance for serving dtype {dtype}; "
                         f"known: {[str(d) for d in TOLERANCES]}") from None


@dataclass
class Request:
    input_ids: torch.Tensor       # [rows, width] long, right-padded
    attention_mask: torch.Tensor  # [rows, width]
    index: np.ndarray             # positions of the rows in the benchmarked examples
    tokens: int                   # real tokens in the request


def make_requests(enc: B.Encoded, batch_size: int, pad_id: int, device: torch.device
                  ) -> list[Request]:
    """Consecutive chunks of ``batch_size`` examples, in the subset's order."""
    out = []
    for start in range(0, len(enc), batch_size):
        idx = np.arange(start, min(start + batch_size, len(enc)))
        ids, mask = B.collate([enc.input_ids[i] for i in idx], pad_id)
        out.append(Request(ids.to(device), mask.to(device), idx, int(mask.sum())))
    return out


@dataclass
class ServedModel:
    """A served model: ``fn(ids, mask) -> logits`` and the module holding its weights."""

    module: nn.Module
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    method: str = ""
    served_by: str = ""        # paths.LEAN / PEFT / MERGED / WHOLE

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fn(ids, mask)

    @classmethod
    def classifier(cls, model: nn.Module) -> "ServedModel":
        return cls(model, lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits)


@dataclass
class BenchContext:
    """What every part of the benchmark shares: the base weights, the runtime holding
    every adapter benchmarked so far, the encoded requests."""

    cfg: StudyConfig
    run: RunDir
    device: torch.device
    pristine: nn.Module          # base backbone on the CPU in the serving dtype, never wrapped
    tokenizer: object
    warmup: int
    progress: bool
    runtime: MultiLoraClassifier | None = None
    requests: list[dict] = field(default_factory=list)     # one row per timed request
    encoded: dict = field(default_factory=dict)             # task -> B.Encoded

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def fresh(self) -> nn.Module:
        """A fresh copy of the base weights: PEFT never touches a backbone twice."""
        return copy.deepcopy(self.pristine)

    def time(self, sides: dict[str, Callable], inputs: Sequence, desc: str,
             warmup: int | None = None) -> Timings:
        """Every side serves every input, interleaved, under ``torch.inference_mode``;
        ``warmup`` (default ``self.warmup``) untimed calls per side first."""
        with torch.inference_mode():
            return time_interleaved(sides, inputs, device=self.device,
                                    warmup=self.warmup if warmup is None else warmup,
                                    progress=self.progress, desc=desc)


def bench_task(ctx: BenchContext, task: str, jobs, batch_sizes: list[int], n_requests: int
               ) -> dict:
    """Every seed of one task: build its models, time them interleaved."""
    spec = get_task(task)
    split = TS.load_split(spec, "validation", ctx.cfg.data.glue_dir).subset(
        n_requests, ctx.cfg.data.subset_seed)
    enc = B.encode_split(ctx.tokenizer, split, ctx.cfg.data.max_length)
    ctx.encoded[task] = enc
    out = {"examples": len(enc), "example_ids": enc.ids.tolist(),
           "mean_tokens": float(enc.lengths.mean()), "seeds": {}}
    if len(enc) < n_requests:
        out["note"] = f"the validation split has only {len(enc)} rows"
    requests = {b: make_requests(enc, b, ctx.pad_id, ctx.device) for b in batch_sizes}
    for seed in sorted({s for t, _, s in jobs if t == task}):
        methods = {m for t, m, s in jobs if t == task and s == seed}
        models, memory, load_s = _build_models(ctx, task, seed, methods, spec.num_labels,
                                               requests[batch_sizes[0]])
        seed_out = {"methods": sorted(methods), "memory": memory, "load_s": load_s,
                    "served_by": {k: m.served_by for k, m in models.items()},
                    "kind_methods": {k: m.method for k, m in models.items()}, "batch": {}}
        for b in batch_sizes:
            seed_out["batch"][str(b)] = _time_batch_size(ctx, task, seed, models, requests[b], b,
                                                         len(enc))
        out["seeds"][str(seed)] = seed_out
        models.clear()
        gc.collect()
    return out


def _build_models(ctx: BenchContext, task: str, seed: int, methods: set[str], num_labels: int,
                  warm: Sequence[Request]) -> tuple[dict, dict, dict]:
    """The served models of one (task, seed), each on its own fresh base, with its memory
    (loading and ``warmup`` requests inside the probe: activations count) and load time."""
    models: dict[str, ServedModel] = {}
    memory, load_s = {}, {}

    def build(kind: str, make: Callable[[], ServedModel]) -> None:
        with MemoryProbe(ctx.device) as probe:
            with stopwatch(ctx.device) as load:
                models[kind] = make()
            load_s[kind] = load.seconds
            with torch.inference_mode():
                for r in warm[:ctx.warmup]:
                    models[kind](r.input_ids, r.attention_mask)
        memory[kind] = {"weights_mb": tensor_bytes(models[kind].module) / 2**20,
                        **probe.to_dict()}

    def trained(method: str) -> nn.Module:
        return load_trained(ctx.run.job_dir(task, method, seed), ctx.fresh(), num_labels)

    def make(method: str, path: str) -> Callable[[], ServedModel]:
        if path == LEAN:  # weights: the shared base + every adapter so far
            name = adapter_name(task, method, seed)

            def add_to_runtime() -> ServedModel:
                if name not in ctx.runtime.adapters:
                    ctx.runtime.add_adapter(name, ctx.run.weights_dir(task, method, seed))
                return ServedModel(ctx.runtime, lambda ids, mask: ctx.runtime(ids, mask, name))
            return add_to_runtime
        if path == MERGED:
            return lambda: ServedModel.classifier(
                trained(method).merge_and_unload().to(ctx.device).eval())
        assert path in (PEFT, WHOLE), path
        return lambda: ServedModel.classifier(trained(method).to(ctx.device))

    for method in [m for m in ctx.cfg.methods if m in methods] + sorted(
            m for m in methods if m not in ctx.cfg.methods):
        for kind, path in serving_kinds(get_method(method, ctx.cfg)).items():
            build(kind, make(method, path))
            models[kind].method, models[kind].served_by = method, path
    return models, memory, load_s


def _time_batch_size(ctx: BenchContext, task: str, seed: int, models: dict[str, ServedModel],
                     requests: list[Request], batch_size: int, examples: int) -> dict:
    """Every request served by every model, interleaved; latencies (in request order: the
    same requests for every kind and seed, so they pair by request) and one row per timed
    request in ``ctx.requests``."""
    sides = {k: (lambda r, m=m: m(r.input_ids, r.attention_mask)) for k, m in models.items()}
    with CpuContention() as contention:
        timed = ctx.time(sides, requests, desc=f"{task}/seed{seed}/batch{batch_size}")
    res = {"other_processes_cpu_share": contention.share, "kinds": {}}
    for kind, latency_s in timed.seconds.items():
        res["kinds"][kind] = {**summarize(latency_s, examples), "method": models[kind].method,
                              "served_by": models[kind].served_by, "latency_s": latency_s}
        for r, lat in zip(requests, latency_s):
            ctx.requests.append({"task": task, "seed": seed, "kind": kind,
                                 "served_by": models[kind].served_by,
                                 "batch_size": batch_size,
                                 "request": int(r.index[0]) // batch_size,
                                 "rows": len(r.index), "tokens": r.tokens,
                                 "latency_ms": lat * 1e3})
    return res
