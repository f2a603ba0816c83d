"""Several adapters on one base, in the serving benchmark: 2-3 adapters that our runtime
serves exactly (:func:`loralens.models.serving_paths.lean_inexact`: LoRA of any rank and targets,
rsLoRA, ...) of different tasks (other such methods, then seeds, when the run has a single
task) loaded into one ``PeftModel`` (``load_adapter``, distinct names) and into our runtime.

* stream: round-robin batch-1 requests, every request switching adapter; switching
  timed (``set_adapter`` vs our ``activate``);
* mixed: batches of ``mixed_batch_size`` rows, row r served by adapter r mod k,
  through PEFT's ``adapter_names`` and our runtime, with one merged model on the same
  batches as the throughput reference.

The same workloads are checked against single-adapter inference in :mod:`.identity`
(in float64, and in the serving dtype as information), on the same adapters
(:func:`choose_adapters`).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from loralens.training import batches as B
from loralens.models.classifier import CausalLMClassifier
from loralens.tasks.registry import get_task
from loralens.core.timing import median, stopwatch, summarize, time_interleaved
from loralens.serving.bench.task import BenchContext
from loralens.models.methods import STUDY_LORA, is_study_lora
from loralens.models.serving_paths import adapter_name
from loralens.serving.runtime import LoraAdapter


def bench_multi(ctx: BenchContext, tasks: list[str], jobs, mixed_batch_size: int,
                lean: Sequence[str] = ("lora",)) -> dict:
    """2-3 adapters on one base (methods ``lean``: those our runtime serves exactly):
    switching and mixing, timed."""
    chosen = choose_adapters(tasks, jobs, lean)
    if len(chosen) < 2:
        return {"skipped": "fewer than 2 adapters our runtime serves exactly in the run"}
    names = [adapter_name(t, m, s) for t, m, s in chosen]
    dirs = [ctx.run.weights_dir(t, m, s) for t, m, s in chosen]
    labels = [get_task(t).num_labels for t, _, _ in chosen]
    out: dict = {"adapters": names, "different_tasks": len({t for t, _, _ in chosen}) > 1,
                 "methods": sorted({m for _, m, _ in chosen})}
    for nm, d in zip(names, dirs):
        if nm not in ctx.runtime.adapters:
            ctx.runtime.add_adapter(nm, d)
    # our load time (reading the directory + stacking), timed on a throwaway name
    with stopwatch(ctx.device) as load:
        ctx.runtime.add_adapter("_load_probe", LoraAdapter.from_dir(dirs[0]))
    out["runtime_load_adapter_s"] = load.seconds
    ctx.runtime.remove_adapter("_load_probe")
    peft = _peft_with_adapters(ctx, names, dirs, labels, out)

    n = min(len(ctx.encoded[t]) for t, _, _ in chosen)
    out["stream"] = _stream(ctx, chosen, names, n, peft)
    merged = _merged_on_fresh_base(ctx, dirs[0], labels[0])
    out["mixed"] = _mixed(ctx, chosen, names, n, peft, merged, mixed_batch_size)
    del merged, peft
    gc.collect()
    return out


def choose_adapters(tasks: list[str], jobs, lean: Sequence[str] = (STUDY_LORA,)
                    ) -> list[tuple[str, str, int]]:
    """Up to 3 (task, method, seed) of the methods ``lean`` (``lora`` first, then in the
    order given): one adapter per task first, then other methods, then more seeds."""
    order = {m: i for i, m in enumerate(sorted(lean, key=lambda m: not is_study_lora(m)))}
    cands = sorted(((t, m, s) for t, m, s in jobs if m in order and t in tasks),
                   key=lambda j: (order[j[1]], j[2], tasks.index(j[0])))
    chosen: list[tuple[str, str, int]] = []
    for t in tasks:
        chosen += [j for j in cands if j[0] == t][:1]
    for j in cands:  # other methods (another rank, other targets, rsLoRA), then seeds
        if j not in chosen and j[1] not in {c[1] for c in chosen}:
            chosen.append(j)
    chosen += [j for j in cands if j not in chosen]
    return chosen[:3]


def _peft_with_adapters(ctx: BenchContext, names: list[str], dirs: list[Path],
                        labels: list[int], out: dict) -> nn.Module | None:
    """One PeftModel holding every adapter (None where the heads differ in shape); the
    median time of ``load_adapter`` goes to ``out``."""
    from loralens.models.artifacts import load_adapter

    if len(set(labels)) != 1:  # PEFT's head copies must share one shape
        out["peft_skipped"] = "heads with different label counts cannot share one PeftModel"
        return None
    base = CausalLMClassifier(ctx.fresh(), labels[0])
    peft = load_adapter(base, dirs[0], adapter_name=names[0])  # standard or old layout
    loads = time_interleaved(
        {"load_adapter": lambda nd: load_adapter(peft, nd[1], adapter_name=nd[0])},
        list(zip(names[1:], dirs[1:])), pause_gc=False)
    out["peft_load_adapter_s"] = loads.median("load_adapter")
    return peft.to(ctx.device).eval()


def _stream(ctx: BenchContext, chosen, names: list[str], n: int, peft: nn.Module | None
            ) -> dict:
    """Round-robin batch-1 requests (request j: adapter j mod k, example j div k)."""
    k = len(chosen)
    stream = []
    for j in range(n * k):
        a, i = j % k, j // k
        x = torch.tensor([ctx.encoded[chosen[a][0]].input_ids[i]], device=ctx.device)
        stream.append((a, i, x, torch.ones_like(x)))
    rt = ctx.runtime
    switch: dict[str, list[float]] = {"runtime": [], "peft": []}

    def via_runtime(req):
        a, _, x, m = req
        with stopwatch() as sw:  # the switch alone, a part of the timed call (no sync inside)
            rt.activate(names[a])
        switch["runtime"].append(sw.seconds)
        return rt(x, m, names[a])

    def via_peft(req):
        a, _, x, m = req
        with stopwatch() as sw:
            peft.set_adapter(names[a])
        switch["peft"].append(sw.seconds)
        return peft(input_ids=x, attention_mask=m).logits

    paths = {"runtime": via_runtime, **({"peft": via_peft} if peft is not None else {})}
    timed = ctx.time(paths, stream, desc="multi/stream", warmup=min(ctx.warmup, len(stream)))
    return {p: {**summarize(lat, len(lat)),
                "switch_median_ms": median(switch[p][-len(lat):]) * 1e3}  # timed calls only
            for p, lat in timed.seconds.items()}


def _mixed(ctx: BenchContext, chosen, names: list[str], n: int, peft: nn.Module | None,
           merged: nn.Module, batch_size: int) -> dict:
    """Mixed-adapter batches (row r: adapter r mod k) through our runtime and PEFT's
    ``adapter_names``, and one merged model on the same batches (throughput reference)."""
    k = len(chosen)
    rows = [(r % k, r // k) for r in range(n * k)]
    reqs = []
    for start in range(0, len(rows), batch_size):
        bt = rows[start:start + batch_size]
        ids, mask = B.collate([ctx.encoded[chosen[a][0]].input_ids[i] for a, i in bt], ctx.pad_id)
        reqs.append((ids.to(ctx.device), mask.to(ctx.device), [names[a] for a, _ in bt], bt))
    rt = ctx.runtime
    paths = {"runtime": lambda r: rt(r[0], r[1], r[2]),
             "merged_single_model": lambda r: merged(input_ids=r[0], attention_mask=r[1]).logits}
    if peft is not None:
        paths["peft_adapter_names"] = lambda r: peft(input_ids=r[0], attention_mask=r[1],
                                                     adapter_names=r[2]).logits
    timed = ctx.time(paths, reqs, desc="multi/mixed", warmup=min(ctx.warmup, len(reqs)))
    mixed = {p: summarize(lat, len(rows)) for p, lat in timed.seconds.items()}
    ref_tp = mixed["merged_single_model"]["throughput_rps"]
    for p in mixed:
        mixed[p]["throughput_vs_merged"] = mixed[p]["throughput_rps"] / ref_tp
    return {"batch_size": batch_size, "batches": len(reqs), **mixed}


def _merged_on_fresh_base(ctx: BenchContext, adapter_dir: Path, num_labels: int) -> nn.Module:
    from loralens.models.artifacts import load_adapter

    model = load_adapter(CausalLMClassifier(ctx.fresh(), num_labels), adapter_dir)
    return model.merge_and_unload().to(ctx.device).eval()
