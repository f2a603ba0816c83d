"""Serving cost: separate LoRA, merged LoRA, full fine-tuning, and our multi-adapter runtime.

The study's second question (its Table 5), for every trained model of a task in the
run directory:

* ``lora_separate``: the PEFT adapter applied at run time (``PeftModel`` on a fresh base);
* ``lora_merged``:   ``merge_and_unload``: W + (alpha/r) B A, the trained head in place;
* ``lora_runtime``:  our :class:`~loralens.serving.runtime.MultiLoraClassifier`, one
  base shared by every adapter of the run;
* ``full``:          the fully fine-tuned classifier.

Method. Requests are validation examples (a fixed subset of ``n_requests`` rows,
the same for every model), tokenized as in training and right-padded per batch
(batch 1: no padding; the study padded every request to 384 tokens). For one
(task, seed) every model is built on its own fresh copy of the base weights (PEFT
modifies the model it wraps in place; the study loaded adapters repeatedly into one
base), gets ``warmup`` untimed requests, then all models serve the same requests
*interleaved* (request i goes to every model before request i+1, in an order
rotated per request), so a change of background load hits every model alike. A
request's latency is the wall time of one forward under ``torch.inference_mode``
(CUDA: synchronized before and after), tokenization excluded. Per model: mean, sd,
p50, p95 latency, throughput (rows/s) and memory: ``weights_mb`` (bytes of the
model's parameters and buffers; for ``lora_runtime`` the shared base plus every
adapter loaded so far), ``peak_increase_mb`` (peak RSS, read from /proc/self/status
after resetting it, while the model is loaded and serves its warm-up requests,
minus the RSS before: loading transients included) and ``resident_increase_mb``
(RSS after minus before); on a GPU the same from ``torch.cuda.max_memory_allocated``
and ``memory_allocated``. Logits of ``lora_runtime`` and ``lora_merged`` are
compared with ``lora_separate`` on every request.

Comparison with full fine-tuning (Table 5): per task and batch size, latencies of
every seed pooled; overhead % = mean / mean(full) - 1; the p-value is the two-sided
Mann-Whitney U test on per-request latencies. Mann-Whitney rather than Welch's t:
latency distributions are right-skewed with scheduler outliers (heavily so on a
shared CPU), which inflate the variance Welch's t relies on, while a rank test
asks the question that matters (does one model's latency tend to be larger) and is
unaffected by a few outliers. Welch's p-value is stored as well.

Several adapters on one base: 2-3 adapters of different tasks (seeds of one task
when the run has a single task) are loaded into one ``PeftModel`` with distinct
names (``load_adapter``) and into our runtime. A round-robin stream of batch-1
requests checks every prediction against single-adapter inference (max abs logit
difference < 1e-5) and times adapter switching (``set_adapter`` vs our
``activate``); mixed-adapter batches (``mixed_batch_size`` rows, one adapter per
row) go through PEFT's ``adapter_names`` and through our runtime, with one merged
model on the same batches as the throughput reference.

Results: RUN_DIR/bench/serving.json (everything), latency.csv (one row per task,
kind, seed, batch size), comparison.csv (Table 5), requests.csv (every timed
request), multi.csv, all written atomically.
"""

from __future__ import annotations

import copy
import csv
import gc
import io
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import data as D
from ..config import StudyConfig
from ..models import CausalLMClassifier
from ..store import RunDir, RunDirError, atomic_write_json, atomic_write_text, environment
from ..tasks import get_task
from .runtime import LoraAdapter, MultiLoraClassifier

KINDS = ("full", "lora_merged", "lora_separate", "lora_runtime")
TOL = 1e-5  # max abs logit difference allowed between equivalent serving paths


# --------------------------------------------------------------------------- measurement

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status(key: str) -> int | None:
    """A memory field of /proc/self/status in bytes (None where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so RSS deltas of a model loaded
    after others were freed are not hidden by the allocator's reuse of their pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


@dataclass
class MemoryProbe:
    """Memory over a span: CPU RSS from /proc (peak: VmHWM, reset at the start), or the
    CUDA allocator's statistics. ``peak_increase``: peak minus the memory before the
    span; ``resident_increase``: memory at the end minus before."""

    device: torch.device
    before: int = 0
    after: int | None = None
    peak: int | None = None
    peak_reset: bool = True

    def __enter__(self) -> "MemoryProbe":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self.peak_reset = _reset_peak_rss()
            self.before = _proc_status("VmRSS") or 0
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.after = torch.cuda.memory_allocated(self.device)
        else:
            self.peak = _proc_status("VmHWM")
            self.after = _proc_status("VmRSS")

    def to_dict(self) -> dict:
        mb = 1 / 2**20
        if self.peak is None or self.after is None:
            return {"peak_increase_mb": None, "resident_increase_mb": None, "peak_mb": None}
        return {"peak_increase_mb": (self.peak - self.before) * mb,
                "resident_increase_mb": (self.after - self.before) * mb,
                "peak_mb": self.peak * mb,
                "measure": ("cuda max_memory_allocated" if self.device.type == "cuda"
                            else "RSS (VmHWM)" + ("" if self.peak_reset else ", not reset"))}


class CpuContention:
    """Share of the machine's CPU time used by *other* processes over a span (Linux)."""

    def __init__(self):
        self.share: float | None = None

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                cpu = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                own = f.read().rsplit(")", 1)[1].split()
            busy = sum(cpu) - cpu[3] - (cpu[4] if len(cpu) > 4 else 0)  # minus idle, iowait
            return busy, int(own[11]) + int(own[12])                    # utime + stime
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> "CpuContention":
        self._t0, self._s0 = time.perf_counter(), self._read()
        return self

    def __exit__(self, *exc) -> None:
        s1 = self._read()
        if self._s0 is None or s1 is None:
            return
        ticks = os.sysconf("SC_CLK_TCK")
        wall = (time.perf_counter() - self._t0) * ticks * (os.cpu_count() or 1)
        other = (s1[0] - self._s0[0]) - (s1[1] - self._s0[1])
        self.share = max(0.0, other / wall) if wall > 0 else None


def summarize(latencies_s: Sequence[float], rows: int) -> dict:
    """Latency statistics in milliseconds; throughput in rows (requests) per second."""
    ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
    total = ms.sum() / 1e3
    return {"n": int(len(ms)), "rows": int(rows), "mean_ms": float(ms.mean()),
            "sd_ms": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "min_ms": float(ms.min()), "throughput_rps": float(rows / total) if total > 0 else None}


def compare(latencies_s: Sequence[float], baseline_s: Sequence[float]) -> dict:
    """Overhead of ``latencies_s`` over ``baseline_s`` (in % of the mean and the median)
    with the two-sided Mann-Whitney U p-value (and Welch's t p-value for reference)."""
    from scipy import stats

    a, b = np.asarray(latencies_s, float), np.asarray(baseline_s, float)
    out = {"overhead_mean_pct": float((a.mean() / b.mean() - 1) * 100),
           "overhead_median_pct": float((np.median(a) / np.median(b) - 1) * 100),
           "n": int(len(a)), "n_baseline": int(len(b)),
           "p_mannwhitney": None, "p_welch": None}
    if len(a) > 1 and len(b) > 1:
        out["p_mannwhitney"] = float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
        out["p_welch"] = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return out


# --------------------------------------------------------------------------- requests

@dataclass
class Request:
    input_ids: torch.Tensor       # [rows, width] long, right-padded
    attention_mask: torch.Tensor  # [rows, width]
    index: np.ndarray             # positions of the rows in the benchmarked examples
    tokens: int                   # real tokens in the request


def make_requests(enc: D.Encoded, batch_size: int, pad_id: int, device: torch.device
                  ) -> list[Request]:
    """Consecutive chunks of ``batch_size`` examples, in the subset's order."""
    out = []
    for start in range(0, len(enc), batch_size):
        idx = np.arange(start, min(start + batch_size, len(enc)))
        ids, mask = D.collate([enc.input_ids[i] for i in idx], pad_id)
        out.append(Request(ids.to(device), mask.to(device), idx, int(mask.sum())))
    return out


Served = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) -> logits


@dataclass
class _Model:
    """A served model: ``fn(ids, mask) -> logits`` and the module holding its weights."""

    module: nn.Module
    fn: Served

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fn(ids, mask)


def _classifier(model: nn.Module) -> _Model:
    return _Model(model, lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits)


def time_interleaved(models: dict[str, Served | _Model], requests: Sequence[Request], warmup: int,
                     device: torch.device, progress: bool = False, desc: str = "bench"
                     ) -> dict[str, dict]:
    """Serve every request with every model, interleaved; per model latencies and logits.

    ``warmup`` untimed requests per model first (cycling through ``requests``). The
    order of the models is rotated on every request. Returns, per model, ``latency_s``
    (one float per request) and ``logits`` (one [rows, labels] tensor per request).
    """
    names = list(models)
    out = {k: {"latency_s": [], "logits": []} for k in names}
    with torch.inference_mode():
        for k in names:
            for i in range(warmup):
                r = requests[i % len(requests)]
                models[k](r.input_ids, r.attention_mask)
        _sync(device)
        gc.collect()
        gc.disable()  # no collector pauses inside timed requests (as timeit does)
        try:
            for i, r in enumerate(tqdm(requests, desc=desc, disable=not progress, leave=False)):
                for j in range(len(names)):
                    k = names[(i + j) % len(names)]
                    _sync(device)
                    t0 = time.perf_counter()
                    logits = models[k](r.input_ids, r.attention_mask)
                    _sync(device)
                    out[k]["latency_s"].append(time.perf_counter() - t0)
                    out[k]["logits"].append(logits.float().cpu())
        finally:
            gc.enable()
    return out


def _maxdiff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) if len(a) else 0.0


# --------------------------------------------------------------------------- the stage

@dataclass
class _Ctx:
    cfg: StudyConfig
    run: RunDir
    device: torch.device
    pristine: nn.Module          # base backbone on the CPU, never wrapped
    tokenizer: object
    warmup: int
    progress: bool
    runtime: MultiLoraClassifier | None = None
    requests: list[dict] = field(default_factory=list)
    # (task, seed) -> per-example logits of lora_separate at the smallest batch size
    reference: dict = field(default_factory=dict)
    encoded: dict = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def fresh(self) -> nn.Module:
        """A fresh copy of the base weights: PEFT never touches a backbone twice."""
        return copy.deepcopy(self.pristine)


def run_bench(cfg: StudyConfig, run: RunDir, tasks: Sequence[str] | None = None,
              batch_sizes: Sequence[int] = (1,), warmup: int = 10, n_requests: int = 100,
              progress: bool = True, *, mixed_batch_size: int = 8,
              threads: int | None = None) -> dict:
    """Benchmark serving of every trained model in ``run``; write RUN_DIR/bench/.

    ``n_requests`` validation examples per task (all of them when the split is
    smaller; the real count is recorded), served at each of ``batch_sizes``.
    ``threads``: torch CPU threads (default: ``cfg.train.threads`` or torch's).
    Returns the result dict also written to RUN_DIR/bench/serving.json.
    """
    from ..train import load_base

    if n_requests < 1 or warmup < 0 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("need n_requests >= 1, warmup >= 0 and batch sizes >= 1")
    jobs = run.finished_jobs()
    if cfg.bench.seeds:
        jobs = [j for j in jobs if j[2] in set(cfg.bench.seeds)]
    if not jobs:
        raise RunDirError(f"{run.root}: no finished jobs to benchmark"
                          + (f" among seeds {cfg.bench.seeds}" if cfg.bench.seeds else "")
                          + "; run `loralens train` first")
    present = sorted({t for t, _, _ in jobs})
    tasks = list(tasks or [t for t in cfg.tasks if t in present] or present)
    missing = [t for t in tasks if t not in present]
    if missing:
        raise RunDirError(f"{run.root}: no finished jobs for task(s) {missing}; have {present}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = threads or cfg.train.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    batch_sizes = sorted(set(int(b) for b in batch_sizes))

    resolved, tokenizer, make_backbone = load_base(cfg)
    ctx = _Ctx(cfg, run, device, make_backbone().eval(), tokenizer, warmup, progress)
    with MemoryProbe(device) as mem:
        ctx.runtime = MultiLoraClassifier(ctx.fresh().to(device))
    runtime_memory = {"weights_mb": tensor_bytes(ctx.runtime) / 2**20, **mem.to_dict()}
    result = {
        "model": resolved.name, "model_note": resolved.note, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": threads, "dtype": "float32", "batch_sizes": batch_sizes, "warmup": warmup,
        "n_requests": n_requests, "max_length": cfg.data.max_length, "tolerance": TOL,
        "runtime_base_memory": runtime_memory, "tasks": {}, "comparison": [],
        "load_average": {"start": os.getloadavg()},
    }
    for task in tasks:
        result["tasks"][task] = _bench_task(ctx, task, jobs, batch_sizes, n_requests)
        result["comparison"] += _comparison(task, result["tasks"][task], batch_sizes)
    result["multi"] = _bench_multi(ctx, tasks, jobs, mixed_batch_size)
    result["load_average"]["end"] = os.getloadavg()
    result["checks"] = _checks(result)
    result["environment"] = environment()
    _write(run.root / "bench", result, ctx.requests)
    return result


def _bench_task(ctx: _Ctx, task: str, jobs, batch_sizes: list[int], n_requests: int) -> dict:
    """Every seed of one task: build its models, time them interleaved, check logits."""
    from ..train import load_trained

    spec = get_task(task)
    split = D.load_split(spec, "validation", ctx.cfg.data.glue_dir).subset(
        n_requests, ctx.cfg.data.subset_seed)
    enc = D.encode_split(ctx.tokenizer, split, ctx.cfg.data.max_length)
    ctx.encoded[task] = enc
    seeds = sorted({s for t, _, s in jobs if t == task})
    out = {"examples": len(enc), "example_ids": enc.ids.tolist(),
           "mean_tokens": float(enc.lengths.mean()), "seeds": {}}
    if len(enc) < n_requests:
        out["note"] = f"the validation split has only {len(enc)} rows"
    n = spec.num_labels
    requests = {b: make_requests(enc, b, ctx.pad_id, ctx.device) for b in batch_sizes}
    warm = requests[batch_sizes[0]]
    for seed in seeds:
        methods = {m for t, m, s in jobs if t == task and s == seed}
        models, memory, load_s = {}, {}, {}

        def build(kind: str, make: Callable[[], _Model]) -> None:
            with MemoryProbe(ctx.device) as probe:
                t0 = time.perf_counter()
                models[kind] = make()
                load_s[kind] = time.perf_counter() - t0
                with torch.inference_mode():  # warm-up inside the probe: activations count
                    for i in range(min(ctx.warmup, len(warm))):
                        models[kind](warm[i].input_ids, warm[i].attention_mask)
            memory[kind] = {"weights_mb": tensor_bytes(models[kind].module) / 2**20,
                            **probe.to_dict()}

        name = f"{task}_seed{seed}"
        if "full" in methods:
            job = ctx.run.job_dir(task, "full", seed)
            build("full", lambda: _classifier(load_trained(job, ctx.fresh(), n).to(ctx.device)))
        if "lora" in methods:
            job = ctx.run.job_dir(task, "lora", seed)
            build("lora_separate",
                  lambda: _classifier(load_trained(job, ctx.fresh(), n).to(ctx.device)))
            build("lora_merged", lambda: _classifier(
                load_trained(job, ctx.fresh(), n).merge_and_unload().to(ctx.device).eval()))

            def add_to_runtime() -> _Model:  # weights: the shared base + every adapter so far
                if name not in ctx.runtime.adapters:
                    ctx.runtime.add_adapter(name, job / "adapter")
                return _Model(ctx.runtime, lambda ids, mask: ctx.runtime(ids, mask, name))

            build("lora_runtime", add_to_runtime)
        seed_out = {"methods": sorted(methods), "memory": memory, "load_s": load_s,
                    "batch": {}}
        for b in batch_sizes:
            with CpuContention() as cont:
                timed = time_interleaved(models, requests[b], ctx.warmup, ctx.device,
                                         ctx.progress, desc=f"{task}/seed{seed}/batch{b}")
            res = {"other_processes_cpu_share": cont.share, "kinds": {}}
            for kind, t in timed.items():
                res["kinds"][kind] = {**summarize(t["latency_s"], len(enc)),
                                      "latency_s": t["latency_s"]}
                for r, lat in zip(requests[b], t["latency_s"]):
                    ctx.requests.append({"task": task, "seed": seed, "kind": kind,
                                         "batch_size": b, "request": int(r.index[0]) // b,
                                         "rows": len(r.index), "tokens": r.tokens,
                                         "latency_ms": lat * 1e3})
            if "lora_separate" in timed:
                sep = timed["lora_separate"]["logits"]
                checks = {}
                for kind in ("lora_runtime", "lora_merged"):
                    if kind in timed:
                        d = _maxdiff(timed[kind]["logits"], sep)
                        checks[kind] = {"max_abs_logit_diff_vs_separate": d, "within_tol": d < TOL,
                                        "same_predictions": all(
                                            bool((x.argmax(1) == y.argmax(1)).all())
                                            for x, y in zip(timed[kind]["logits"], sep))}
                res["checks"] = checks
                if (task, seed) not in ctx.reference:
                    ctx.reference[(task, seed)] = (b, torch.cat(sep))
            seed_out["batch"][str(b)] = res
        out["seeds"][str(seed)] = seed_out
        models.clear()
        gc.collect()
    return out


def _comparison(task: str, res: dict, batch_sizes: list[int]) -> list[dict]:
    """Table 5: each kind against full fine-tuning (and against merged LoRA), seeds pooled."""
    rows = []
    for b in batch_sizes:
        pooled: dict[str, list[float]] = {}
        per_seed: dict[str, list[float]] = {}
        for s in res["seeds"].values():
            for kind, k in s["batch"][str(b)]["kinds"].items():
                pooled.setdefault(kind, []).extend(k["latency_s"])
                per_seed.setdefault(kind, []).append(k["mean_ms"])
        for kind in KINDS:
            if kind not in pooled:
                continue
            lat = pooled[kind]
            row = {"task": task, "batch_size": b, "kind": kind, "seeds": len(per_seed[kind]),
                   **{k: v for k, v in summarize(lat, len(lat) * b).items()
                      if k in ("n", "mean_ms", "sd_ms", "p50_ms", "p95_ms")},
                   "seed_means_sd_ms": (statistics.stdev(per_seed[kind])
                                        if len(per_seed[kind]) > 1 else None)}
            for key in ("weights_mb", "peak_increase_mb", "resident_increase_mb"):
                vals = [s["memory"][kind][key] for s in res["seeds"].values()
                        if s["memory"].get(kind, {}).get(key) is not None]
                row[key] = statistics.mean(vals) if vals else None
            for base in ("full", "lora_merged"):
                if base in pooled and base != kind:
                    c = compare(lat, pooled[base])
                    row[f"overhead_vs_{base}_pct"] = c["overhead_mean_pct"]
                    row[f"p_vs_{base}"] = c["p_mannwhitney"]
                    row[f"p_welch_vs_{base}"] = c["p_welch"]
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- several adapters

def _bench_multi(ctx: _Ctx, tasks: list[str], jobs, mixed_batch_size: int) -> dict:
    """2-3 adapters on one base: equality with single-adapter inference, switching, mixing."""
    from peft import PeftModel

    lora = sorted((t, s) for t, m, s in jobs if m == "lora" and t in tasks)
    chosen: list[tuple[str, int]] = []
    for t in tasks:  # one adapter per task first, then more seeds
        first = [(tt, s) for tt, s in lora if tt == t][:1]
        chosen += first
    for ts in lora:
        if len(chosen) >= 3:
            break
        if ts not in chosen:
            chosen.append(ts)
    chosen = chosen[:3]
    if len(chosen) < 2:
        return {"skipped": "fewer than 2 LoRA adapters in the run"}
    names = [f"{t}_seed{s}" for t, s in chosen]
    dirs = [ctx.run.job_dir(t, "lora", s) / "adapter" for t, s in chosen]
    labels = [get_task(t).num_labels for t, _ in chosen]
    out: dict = {"adapters": names, "different_tasks": len({t for t, _ in chosen}) > 1}
    rt = ctx.runtime
    for nm, d in zip(names, dirs):
        if nm not in rt.adapters:
            rt.add_adapter(nm, d)

    # our load time (reading the directory + stacking), timed on a throwaway name
    t0 = time.perf_counter()
    rt.add_adapter("_load_probe", LoraAdapter.from_dir(dirs[0]))
    out["runtime_load_adapter_s"] = time.perf_counter() - t0
    rt.remove_adapter("_load_probe")

    peft = None
    if len(set(labels)) == 1:  # PEFT's head copies must share one shape
        base = CausalLMClassifier(ctx.fresh(), labels[0])
        peft = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=names[0])
        load = []
        for nm, d in zip(names[1:], dirs[1:]):
            t0 = time.perf_counter()
            peft.load_adapter(str(d), adapter_name=nm)
            load.append(time.perf_counter() - t0)
        peft = peft.to(ctx.device).eval()
        out["peft_load_adapter_s"] = statistics.median(load)
    else:
        out["peft_skipped"] = "heads with different label counts cannot share one PeftModel"

    # single-adapter references, per adapter: per-example logits of the separate PeftModel
    n = min(len(ctx.encoded[t]) for t, _ in chosen)
    refs = [ctx.reference[c][1][:n] for c in chosen]
    out["reference"] = {nm: f"lora_separate logits at batch {ctx.reference[c][0]}"
                        for nm, c in zip(names, chosen)}
    stream = [(j % len(chosen), j // len(chosen)) for j in range(n * len(chosen))]

    def one(a: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tensor([ctx.encoded[chosen[a][0]].input_ids[i]], device=ctx.device)
        return x, torch.ones_like(x)

    # round-robin stream of batch-1 requests: every request switches adapter
    lat = {"runtime": [], "peft": []}
    switch = {"runtime": [], "peft": []}
    diff = {"runtime": 0.0, "peft": 0.0}
    same = {"runtime": True, "peft": True}
    paths = ["runtime"] + (["peft"] if peft is not None else [])
    with torch.inference_mode():
        for w in range(min(ctx.warmup, len(stream))):
            a, i = stream[w]
            rt(*one(a, i), names[a])
            if peft is not None:
                peft.set_adapter(names[a])
                peft(*one(a, i))
        gc.collect()
        gc.disable()
        try:
            for j, (a, i) in enumerate(tqdm(stream, desc="multi/stream", disable=not ctx.progress,
                                            leave=False)):
                x, m = one(a, i)
                for path in paths[j % len(paths):] + paths[:j % len(paths)]:
                    _sync(ctx.device)
                    t0 = time.perf_counter()
                    if path == "runtime":
                        rt.activate(names[a])
                        t1 = time.perf_counter()
                        y = rt(x, m, names[a])
                    else:
                        peft.set_adapter(names[a])
                        t1 = time.perf_counter()
                        y = peft(input_ids=x, attention_mask=m).logits
                    _sync(ctx.device)
                    t2 = time.perf_counter()
                    lat[path].append(t2 - t0)
                    switch[path].append(t1 - t0)
                    y = y.float().cpu()[0]
                    diff[path] = max(diff[path], float((y - refs[a][i]).abs().max()))
                    same[path] &= bool(y.argmax() == refs[a][i].argmax())
        finally:
            gc.enable()
    out["stream"] = {p: {**summarize(lat[p], len(lat[p])),
                         "switch_median_ms": statistics.median(switch[p]) * 1e3,
                         "max_abs_logit_diff_vs_single": diff[p], "within_tol": diff[p] < TOL,
                         "same_predictions": same[p]} for p in paths}

    # mixed-adapter batches: row r of a batch is served by adapter r % k
    k = len(chosen)
    rows = [(r % k, r // k) for r in range(n * k)]
    batches = [rows[i:i + mixed_batch_size] for i in range(0, len(rows), mixed_batch_size)]
    reqs = []
    for bt in batches:
        ids, mask = D.collate([ctx.encoded[chosen[a][0]].input_ids[i] for a, i in bt], ctx.pad_id)
        reqs.append((ids.to(ctx.device), mask.to(ctx.device), [names[a] for a, _ in bt], bt))
    merged = _merged_on_fresh_base(ctx, dirs[0], labels[0])
    models: dict[str, Callable] = {
        "runtime": lambda r: rt(r[0], r[1], r[2]),
        "merged_single_model": lambda r: merged(input_ids=r[0], attention_mask=r[1]).logits,
    }
    if peft is not None:
        models["peft_adapter_names"] = lambda r: peft(input_ids=r[0], attention_mask=r[1],
                                                      adapter_names=r[2]).logits
    mix = {p: {"latency_s": [], "diff": 0.0, "same": True} for p in models}
    order = list(models)
    with torch.inference_mode():
        for p in order:
            for w in range(min(ctx.warmup, len(reqs))):
                models[p](reqs[w])
        gc.collect()
        gc.disable()
        try:
            for j, r in enumerate(tqdm(reqs, desc="multi/mixed", disable=not ctx.progress,
                                       leave=False)):
                for p in order[j % len(order):] + order[:j % len(order)]:
                    _sync(ctx.device)
                    t0 = time.perf_counter()
                    y = models[p](r)
                    _sync(ctx.device)
                    mix[p]["latency_s"].append(time.perf_counter() - t0)
                    if p == "merged_single_model":
                        continue
                    y = y.float().cpu()
                    for row, (a, i) in enumerate(r[3]):
                        ref = refs[a][i]
                        mix[p]["diff"] = max(mix[p]["diff"],
                                             float((y[row, :len(ref)] - ref).abs().max()))
                        mix[p]["same"] &= bool(y[row, :len(ref)].argmax() == ref.argmax())
        finally:
            gc.enable()
    total_rows = len(rows)
    mixed = {}
    for p, v in mix.items():
        mixed[p] = summarize(v["latency_s"], total_rows)
        if p != "merged_single_model":
            mixed[p].update(max_abs_logit_diff_vs_single=v["diff"], within_tol=v["diff"] < TOL,
                            same_predictions=v["same"])
    ref_tp = mixed["merged_single_model"]["throughput_rps"]
    for p in mixed:
        mixed[p]["throughput_vs_merged"] = mixed[p]["throughput_rps"] / ref_tp
    out["mixed"] = {"batch_size": mixed_batch_size, "batches": len(reqs), **mixed}
    del merged, peft
    gc.collect()
    return out


def _merged_on_fresh_base(ctx: _Ctx, adapter_dir: Path, num_labels: int) -> nn.Module:
    from peft import PeftModel

    model = PeftModel.from_pretrained(CausalLMClassifier(ctx.fresh(), num_labels), str(adapter_dir))
    return model.merge_and_unload().to(ctx.device).eval()


# --------------------------------------------------------------------------- results

def _checks(result: dict) -> dict:
    """Every equality the benchmark asserts, flattened: name -> passed."""
    out = {}
    for task, t in result["tasks"].items():
        for seed, s in t["seeds"].items():
            for b, r in s["batch"].items():
                c = r.get("checks", {}).get("lora_runtime")
                if c:
                    out[f"{task}/seed{seed}/batch{b}: runtime == separate"] = c["within_tol"]
    m = result.get("multi", {})
    for p, v in m.get("stream", {}).items():
        out[f"multi stream: {p} == single adapter"] = v["within_tol"]
    for p, v in m.get("mixed", {}).items():
        if isinstance(v, dict) and "within_tol" in v:
            out[f"multi mixed batch: {p} == single adapter"] = v["within_tol"]
    return out


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    return buf.getvalue()


def _write(out_dir: Path, result: dict, requests: list[dict]) -> None:
    latency = []
    for task, t in result["tasks"].items():
        for seed, s in t["seeds"].items():
            for b, r in s["batch"].items():
                for kind, k in r["kinds"].items():
                    latency.append({"task": task, "seed": int(seed), "batch_size": int(b),
                                    "kind": kind, **{x: y for x, y in k.items() if x != "latency_s"},
                                    **s["memory"].get(kind, {})})
    multi = []
    m = result.get("multi", {})
    for section in ("stream", "mixed"):
        for p, v in m.get(section, {}).items():
            if isinstance(v, dict):
                multi.append({"section": section, "path": p, **v})
    atomic_write_text(out_dir / "latency.csv", _csv(latency))
    atomic_write_text(out_dir / "comparison.csv", _csv(result["comparison"]))
    atomic_write_text(out_dir / "requests.csv", _csv(requests))
    atomic_write_text(out_dir / "multi.csv", _csv(multi))
    atomic_write_json(out_dir / "serving.json", result)


def summary_lines(result: dict) -> list[str]:
    """Human-readable lines: Table 5 per task and batch size, multi-adapter results, checks."""
    lines = [f"serving benchmark: {result['model']} ({result['model_note']}), {result['device']}, "
             f"{result['threads']} threads, float32"]
    for r in result["comparison"]:
        vs = r.get("overhead_vs_full_pct")
        lines.append(
            f"{r['task']:5s} batch {r['batch_size']} {r['kind']:13s} mean {r['mean_ms']:7.1f} ms "
            f"sd {r['sd_ms']:6.1f} p50 {r['p50_ms']:7.1f} p95 {r['p95_ms']:7.1f} "
            f"(n={r['n']}, {r['seeds']} seed(s))"
            + (f" weights {r['weights_mb']:.0f} MB" if r.get("weights_mb") is not None else "")
            + (f"  vs full {vs:+.1f}% p={r['p_vs_full']:.2g}" if vs is not None else ""))
    m = result.get("multi", {})
    if "mixed" in m:
        mx = m["mixed"]
        parts = [f"{p} {v['throughput_vs_merged']:.2f}x" for p, v in mx.items()
                 if isinstance(v, dict) and p != "merged_single_model"]
        lines.append(f"multi ({', '.join(m['adapters'])}): mixed batches of {mx['batch_size']}: "
                     f"throughput vs one merged model: {', '.join(parts)}")
        for p, v in m["stream"].items():
            lines.append(f"multi stream {p}: switch {v['switch_median_ms']:.3f} ms, "
                         f"max |logit diff| vs single adapter {v['max_abs_logit_diff_vs_single']:.2e}")
    elif "skipped" in m:
        lines.append(f"multi: skipped ({m['skipped']})")
    failed = [k for k, ok in result["checks"].items() if not ok]
    lines.append(f"checks: {len(result['checks']) - len(failed)}/{len(result['checks'])} passed"
                 + (f"; failed: {'; '.join(failed)}" if failed else ""))
    return lines


# --------------------------------------------------------------------------- CLI glue

def cli_command(args, cfg: StudyConfig, run: RunDir) -> int:
    """``loralens bench`` (arguments from ``loralens.serving.add_bench_arguments``):
    run the stage and print its summary; exit status 1 when an equality check fails."""
    result = run_bench(cfg, run, args.task, tuple(args.batch_size or (1,)), args.warmup,
                       args.requests, progress=not args.no_progress,
                       mixed_batch_size=args.mixed_batch_size, threads=args.threads)
    print("\n".join(summary_lines(result)))
    print(f"results in {run.root / 'bench'}")
    return 0 if all(result["checks"].values()) else 1
