"""Serving cost: separate LoRA, merged LoRA, full fine-tuning, and our multi-adapter runtime.

The study's second question (its Table 5), for every trained model of a task in the
run directory, every method by the paths :mod:`.paths` gives it (each result records
its ``method`` and ``served_by``):

* ``<method>_separate`` (PEFT): the PEFT adapter applied at run time (``PeftModel`` on a
  fresh base), e.g. ``lora_separate``;
* ``<method>_merged`` (merged): ``merge_and_unload``: W + (alpha/r) B A (DoRA and IA3 merge
  too), the trained head in place;
* ``<method>_runtime`` (lean runtime): our
  :class:`~loralens.serving.runtime.MultiLoraClassifier`, one base shared by every adapter
  of the run, for the methods it computes exactly (:func:`.paths.lean_inexact`: LoRA of any
  rank and targets, rsLoRA, LoRA+; not DoRA, IA3, PiSSA, OLoRA);
* ``full``, ``head`` (whole model): the fully fine-tuned classifier; the base with its
  trained head.

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
and ``memory_allocated``.

Dtype (``train.precision``, :func:`loralens.training.devices.serving_dtype`): every timed model
is loaded in bf16 on a GPU, as the study serves, and in float32 on the CPU (auto; a
note says so); ``bf16`` or ``fp32`` force one.

Comparison (Table 5, :mod:`.bench_results`): per task, batch size and kind, the mean
latency ± sd across seeds; overhead against full fine-tuning and the method's merged
model (``lora_merged`` for ``lora_runtime``) paired by request (the same request served by both, in one interleaved run), with a bootstrap
interval over requests and the two-sided Wilcoxon signed-rank test.

Several adapters on one base: 2-3 adapters our runtime serves exactly, of different
tasks (other such methods, e.g. other ranks or targets, then seeds of one task when the
run has a single task) are loaded into one ``PeftModel`` with distinct
names (``load_adapter``) and into our runtime. A round-robin stream of batch-1
requests times adapter switching (``set_adapter`` vs our ``activate``); mixed-adapter
batches (``mixed_batch_size`` rows, one adapter per row) go through PEFT's
``adapter_names`` and through our runtime, with one merged model on the same batches as
the throughput reference.

Identity checks (:mod:`.identity`): every adapter path (our runtime where it serves the
method, and the merged model, at each batch size; the multi-adapter stream and mixed
batches through our runtime and PEFT) against each adapter's separate ``PeftModel``, on the first ``identity_examples``
benchmarked examples per adapter, in float64 (the verdict: max |logit diff| <= 1e-6 x
max(1, max |logit|)) and again in the serving dtype (information: differences relative to
the logits' scale). They give ``checks``.

Results: RUN_DIR/bench/serving.json (everything), latency.csv (one row per task,
kind, seed, batch size), comparison.csv (Table 5), requests.csv (every timed
request), multi.csv, identity.csv, all written atomically.

Modules: this one is the stage (setup -> every task -> several adapters -> identity ->
results); :mod:`.paths` which path serves which method, :mod:`.bench_task` one task's
models and their timing, :mod:`.bench_multi`
several adapters on one base, :mod:`.identity` the identity checks,
:mod:`.bench_results` Table 5, the checks and the files, :mod:`.measure` memory; the
timing itself is :func:`loralens.core.timing.time_interleaved`.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

from loralens.core.config import StudyConfig
from loralens.training.devices import dtype_name, serving_dtype, training_device
from loralens.models.methods import get_method, is_study_lora
from loralens.models.families import require_servable
from loralens.models.classifier import Base, load_base
from loralens.core.errors import RunDirError
from loralens.core.run_dir import RunDir, environment
from loralens.tasks.registry import get_task
from loralens.serving.bench import identity as I
from loralens.serving.bench.multi import bench_multi, choose_adapters
from loralens.serving.bench.results import checks, comparison, summary_lines, write_results
from loralens.serving.bench.task import BenchContext, bench_task, tolerance
from loralens.serving.bench.measure import MemoryProbe, frozen_heap, tensor_bytes
from loralens.models.serving_paths import adapter_name, lean_inexact, rewrites_base
from loralens.serving.runtime import MultiLoraClassifier

__all__ = ["run_bench", "summary_lines"]

log = logging.getLogger(__name__)


@frozen_heap
def run_bench(cfg: StudyConfig, run: RunDir, tasks: Sequence[str] | None = None,
              batch_sizes: Sequence[int] = (1,), warmup: int = 10, n_requests: int = 100,
              progress: bool = True, *, mixed_batch_size: int = 8,
              threads: int | None = None, base: Base | None = None,
              precision: str | None = None, identity_examples: int = 16) -> dict:
    """Benchmark serving of every trained model in ``run``; write RUN_DIR/bench/.

    ``n_requests`` validation examples per task (all of them when the split is
    smaller; the real count is recorded), served at each of ``batch_sizes``.
    ``threads``: torch CPU threads (default: ``cfg.train.threads`` or torch's).
    ``base``: the study's base model when the caller has loaded it already
    (default: ``models.load_base(cfg)``).
    ``precision``: the dtype models are served in, in ``train.precision``'s values
    (default: ``cfg.train.precision``; auto = bf16 on a GPU, as the study serves, float32
    on the CPU: :func:`loralens.training.devices.serving_dtype`). Every timed model is loaded in it.
    ``identity_examples``: examples per adapter of the identity checks (float64 and the
    serving dtype; the first of the benchmarked ones).
    Returns the result dict also written to RUN_DIR/bench/serving.json.
    """
    if (n_requests < 1 or warmup < 0 or not batch_sizes or min(batch_sizes) < 1
            or identity_examples < 1):
        raise ValueError("need n_requests >= 1, warmup >= 0, batch sizes >= 1 and "
                         "identity_examples >= 1")
    jobs = _jobs_to_bench(cfg, run)
    tasks = _tasks_to_bench(run, cfg, jobs, tasks)
    device = training_device()
    dtype, note = serving_dtype(device, precision or cfg.train.precision)
    if note:
        log.info(note)
    threads = threads or cfg.train.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    batch_sizes = sorted(set(int(b) for b in batch_sizes))

    base = base or load_base(cfg)
    require_servable(base.family, base.pooling, "bench")
    # Loaded in the serving dtype: every served model (full, merged, separate, runtime) is
    # built on a copy of these weights, so all of them serve in it.
    ctx = BenchContext(cfg, run, device, base.backbone(dtype=dtype).eval(), base.tokenizer,
                       warmup, progress)
    with MemoryProbe(device) as mem:
        ctx.runtime = MultiLoraClassifier(ctx.fresh().to(device))
    result = {
        "model": base.name, "model_note": base.note, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": threads, "dtype": dtype_name(dtype), "batch_sizes": batch_sizes,
        "warmup": warmup, "n_requests": n_requests, "max_length": cfg.data.max_length,
        "runtime_base_memory": {"weights_mb": tensor_bytes(ctx.runtime) / 2**20, **mem.to_dict()},
        "tasks": {}, "comparison": [], "load_average": {"start": os.getloadavg()},
    }
    for task in tasks:
        result["tasks"][task] = bench_task(ctx, task, jobs, batch_sizes, n_requests)
        result["comparison"] += comparison(task, result["tasks"][task], batch_sizes)
    result["served_by"] = _served_by(cfg, jobs)
    result["multi"] = bench_multi(ctx, tasks, jobs, mixed_batch_size, _lean(cfg, jobs))
    result["load_average"]["end"] = os.getloadavg()
    result["identity"] = _identity(ctx, base, dtype, tasks, jobs, batch_sizes, mixed_batch_size,
                                   identity_examples)
    result["checks"] = checks(result)
    result["environment"] = environment()
    write_results(run, result, ctx.requests)
    return result


def _lean(cfg: StudyConfig, jobs) -> list[str]:
    """The run's methods our runtime serves exactly (:func:`.paths.lean_inexact`), in the
    study's order."""
    lean = {m for _, m, _ in jobs if lean_inexact(get_method(m, cfg)) is None}
    return [m for m in cfg.methods if m in lean] + sorted(lean - set(cfg.methods))


def _served_by(cfg: StudyConfig, jobs) -> dict[str, dict]:
    """Per method of the run: its family, the kinds and paths serving it, and why our
    runtime does not serve it (None where it does)."""
    from loralens.models.serving_paths import serving_kinds

    out = {}
    for name in sorted({m for _, m, _ in jobs}):
        m = get_method(name, cfg)
        out[name] = {"family": m.family, "kinds": serving_kinds(m),
                     "lean_runtime_not_exact": lean_inexact(m) if m.is_adapter else None}
    return out


def _identity(ctx: BenchContext, base: Base, dtype: torch.dtype, tasks: list[str], jobs,
              batch_sizes: list[int], mixed_batch_size: int, examples: int) -> dict:
    """The identity checks (:mod:`.identity`) of every benchmarked adapter (every PEFT
    method): in float64 on fresh float64 copies of the base (the verdict), then in the
    serving dtype on copies of the timed base weights (information)."""
    methods = {m: get_method(m, ctx.cfg) for m in {m for _, m, _ in jobs}}
    triples = sorted(((t, m, s) for t, m, s in jobs if t in tasks and methods[m].is_adapter),
                     key=lambda j: (tasks.index(j[0]), not is_study_lora(j[1]), j[1], j[2]))
    adapters = [I.Adapter(adapter_name(t, m, s), ctx.run.job_dir(t, m, s),
                          ctx.run.weights_dir(t, m, s), get_task(t).num_labels,
                          [list(x) for x in ctx.encoded[t].input_ids[:examples]],
                          lean=lean_inexact(methods[m]) is None,
                          rewrites_base=rewrites_base(methods[m].peft))
                for t, m, s in triples]
    multi = [triples.index(c) for c in choose_adapters(tasks, jobs, _lean(ctx.cfg, jobs))]
    out = {"dtype": dtype_name(I.IDENTITY_DTYPE),
           "tolerance": I.IDENTITY_TOL,
           "tolerance_rule": I.TOLERANCE_RULE.format(tol=I.IDENTITY_TOL),
           "serving_dtype": dtype_name(dtype),
           "serving_dtype_rounding": tolerance(dtype), "examples_per_adapter": examples,
           "reference": "each adapter's separate PeftModel, batch 1, no padding",
           "checks": []}
    if not adapters:
        out["skipped"] = "no adapter (PEFT method) in the benchmark"
        return out
    args = (adapters, batch_sizes, multi if len(multi) >= 2 else [], mixed_batch_size,
            ctx.pad_id, ctx.device)
    exact = I.run_identity(base.backbone(dtype=I.IDENTITY_DTYPE).eval(), *args)
    served = I.run_identity(ctx.pristine, *args)
    out["checks"] = I.combine(exact, served)
    return out


def _jobs_to_bench(cfg: StudyConfig, run: RunDir) -> list[tuple[str, str, int]]:
    """The finished (task, method, seed) of the run, restricted to ``bench.seeds``."""
    jobs = run.finished_jobs()
    if cfg.bench.seeds:
        jobs = [j for j in jobs if j[2] in set(cfg.bench.seeds)]
    if not jobs:
        raise RunDirError(f"{run.root}: no finished jobs to benchmark"
                          + (f" among seeds {cfg.bench.seeds}" if cfg.bench.seeds else "")
                          + "; run `loralens train` first")
    return jobs


def _tasks_to_bench(run: RunDir, cfg: StudyConfig, jobs, tasks: Sequence[str] | None
                    ) -> list[str]:
    """The tasks asked for (default: the config's tasks that have finished jobs)."""
    present = sorted({t for t, _, _ in jobs})
    tasks = list(tasks or [t for t in cfg.tasks if t in present] or present)
    missing = [t for t in tasks if t not in present]
    if missing:
        raise RunDirError(f"{run.root}: no finished jobs for task(s) {missing}; have {present}")
    return tasks
