"""Dry run: every stage's work and an estimated wall time, before a long run.

``loralens run --dry-run`` resolves the config as a run would, then:

1. counts each stage's work from the real config and the real data, the way the stage's
   own code does it (:func:`count_work`): jobs, rows and real tokens through training
   (per method, with optimizer steps) and through forward-only passes (evaluations,
   extraction, serving), and the fresh copies of the base model each job loads;
2. measures this machine's throughput on the study's own model (:func:`measure`): a few
   forward + backward steps per method on real training rows of the first task, a
   no-grad forward at ``train.eval_batch_size``, and, for the serving benchmark, batch-1
   forwards (in the serving dtype, and in float64 for its identity checks);
3. turns work into FLOPs (``flops.train_flops_per_token``, ``forward_flops_per_token``:
   ``6 N`` / ``4 N + 2 n`` / ``2 N`` per real token) and FLOPs into seconds at the FLOP/s
   achieved in step 2, plus optimizer steps and model loads at their measured seconds
   (:func:`estimate`).

Nothing is written into the run directory (the base model's conversion cache is not in
it). Early stopping, pruning and the sanity check's early exit only shorten runs, and the
search's epochs are the largest of its choices: the work shown is an upper bound where a
stage may stop early, and the notes say where.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import data as D
from .config import StudyConfig

# Real tokens per timed calibration step: a train.batch_size batch is trimmed to this many,
# so the calibration stays near 30 s on a 2-core CPU with SmolLM2-135M (full fine-tuning
# runs ~100 tokens/s there); the FLOP/s of a CPU hardly change above a few hundred tokens.
TRAIN_TOKENS = 320
FORWARD_TOKENS = 640
TIMED_STEPS = 2          # after one warm-up step; the median is kept
STEP_BUDGET_S = 8.0      # ... or fewer (at least one) once the timed ones took this long

CHEAP = {"drift", "report"}  # stages that compute on arrays and files only: seconds
FORWARD_KINDS = {"batched": "forward", "batch1": "forward, batch 1",
                 "float64": "forward, batch 1, float64"}


# --------------------------------------------------------------------------- work

@dataclass
class StageWork:
    """One stage's work. Rows and tokens count every pass: a row trained for 3 epochs
    counts 3 times, an evaluation's rows count once per evaluation."""

    stage: str
    what: str = ""
    jobs: int = 0
    rows: int = 0
    train_tokens: dict[str, int] = field(default_factory=dict)    # method -> real tokens
    steps: dict[str, int] = field(default_factory=dict)           # method -> optimizer steps
    forward_tokens: dict[str, int] = field(default_factory=dict)  # FORWARD_KINDS key -> tokens
    loads: int = 0            # fresh copies of the base model built
    off: str = ""             # why the stage does no work ("" = it runs)
    cheap: str = ""           # why there is no estimate (drift, report: seconds)
    flops: float | None = None
    seconds: float | None = None

    @property
    def tokens(self) -> int:
        return sum(self.train_tokens.values()) + sum(self.forward_tokens.values())

    def train(self, method: str, tokens: float, rows: int, steps: int) -> None:
        self.train_tokens[method] = self.train_tokens.get(method, 0) + int(round(tokens))
        self.steps[method] = self.steps.get(method, 0) + steps
        self.rows += rows

    def forward(self, kind: str, tokens: float, rows: int) -> None:
        self.forward_tokens[kind] = self.forward_tokens.get(kind, 0) + int(round(tokens))
        self.rows += rows

    def scaled(self, k: int) -> "StageWork":
        """This work done ``k`` times (jobs, rows, tokens, steps, loads)."""
        return replace(self, jobs=self.jobs * k, rows=self.rows * k, loads=self.loads * k,
                       train_tokens={m: v * k for m, v in self.train_tokens.items()},
                       steps={m: v * k for m, v in self.steps.items()},
                       forward_tokens={m: v * k for m, v in self.forward_tokens.items()})

    def add(self, other: "StageWork") -> None:
        self.jobs += other.jobs
        self.loads += other.loads
        self.rows += other.rows
        for m, v in other.train_tokens.items():
            self.train_tokens[m] = self.train_tokens.get(m, 0) + v
        for m, v in other.steps.items():
            self.steps[m] = self.steps.get(m, 0) + v
        for k, v in other.forward_tokens.items():
            self.forward_tokens[k] = self.forward_tokens.get(k, 0) + v


def fit_work(w: StageWork, method: str, lengths: np.ndarray, tc,
             early_stop: np.ndarray | None = None) -> int:
    """Add one ``train.fit`` run to ``w`` (every epoch, no early stop), as fit steps it:
    ``steps_per_epoch`` optimizer steps per epoch, ``train.max_steps`` respected, an
    early-stopping evaluation of ``early_stop`` rows every ``eval_interval`` steps and at
    the last step of each epoch. Returns the number of evaluations."""
    from .train import eval_interval, steps_per_epoch

    n = len(lengths)
    per_epoch, interval = steps_per_epoch(n, tc), eval_interval(n, tc)
    steps = evals = rows = 0
    tokens = 0.0
    for _ in range(tc.epochs):
        k = 0
        for k in range(1, per_epoch + 1):
            steps += 1
            capped = bool(tc.max_steps and steps >= tc.max_steps)
            if early_stop is not None and (k % interval == 0 or k == per_epoch or capped):
                evals += 1
            if capped:
                break
        done = n if k == per_epoch else min(n, k * tc.batch_size * tc.grad_accum)
        rows += done
        tokens += float(lengths.sum()) * done / max(n, 1)
        if tc.max_steps and steps >= tc.max_steps:
            break
    w.train(method, tokens, rows, steps)
    if early_stop is not None and evals:
        w.forward("batched", evals * float(early_stop.sum()), evals * len(early_stop))
    return evals


def count_work(cfg: StudyConfig, stages: Sequence[str], tokenizer,
               prepared: dict) -> list[StageWork]:
    """Each stage's work, from the config and the tasks' data (``prepared``: task ->
    :class:`loralens.train.Prepared`), as the stage's code does it."""
    count = {"sanity": _sanity, "search": _search, "train": _train, "extract": _extract,
             "drift": _drift, "bench": _bench, "report": _report}
    return [count[s](cfg, tokenizer, prepared) for s in stages]


def _pairs(cfg: StudyConfig) -> list[tuple[str, str]]:
    return [(t, m) for t in cfg.tasks for m in cfg.methods]


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"


def _per_task(values: dict[str, object]) -> str:
    """``{"mrpc": 128, "sst2": 384}`` -> "mrpc 128, sst2 384" ("128" when all are equal)."""
    shown = {str(v) for v in values.values()}
    if len(shown) == 1:
        return shown.pop()
    return ", ".join(f"{t} {v}" for t, v in values.items())


def _sanity(cfg, tokenizer, prepared) -> StageWork:
    from .sanity import sanity_rows

    sc = cfg.sanity
    tc = replace(cfg.train, epochs=sc.epochs, batch_size=sc.batch_size, grad_accum=1,
                 max_steps=0, patience=0, eval_every=0)
    w, rows = StageWork("sanity"), {}
    for t, m in _pairs(cfg):
        tiny = sanity_rows(prepared[t].train, sc.examples)
        rows[t] = len(tiny)
        fit_work(w, m, tiny.lengths, tc)
        w.jobs += 1
        w.loads += 1
    w.what = (f"{w.jobs} (task, method) overfit {_per_task(rows)} training rows, "
              f"<= {_n(sc.epochs, 'epoch')}")
    return w


def _search(cfg, tokenizer, prepared) -> StageWork:
    from .train import prepare_task, with_overrides

    sc = cfg.search
    w = StageWork("search")
    if not sc.enabled:
        w.off = "search.enabled=false"
        w.what = "off: training uses the config's hyperparameters"
        return w
    # A trial trains on search.train_size rows (the data's otherwise, no per-task sizes)
    # and is scored on search.eval_size selection rows (search.run_search).
    tcfg = with_overrides(cfg, {"data": {"train_size": sc.train_size or cfg.data.train_size,
                                         "train_size_per_task": {}}})
    rows, evals = {}, {}
    for t in cfg.tasks:
        same = (tcfg.data.train_size == cfg.data.train_size
                and not cfg.data.train_size_per_task.get(t))
        p = prepared[t] if same else prepare_task(tcfg, t, tokenizer)
        eval_enc = D.encode_split(tokenizer, p.selection_rows(sc.eval_size, cfg.data.subset_seed),
                                  cfg.data.max_length)
        rows[t], evals[t] = len(p.train), len(eval_enc)
        for m in cfg.methods:
            # upper bounds: the largest epoch choice, the smallest batch (most steps, evals)
            batch = min(sc.batch_full if m == "full" else sc.batch_lora)
            trial_tc = replace(cfg.train, epochs=max(sc.epochs), batch_size=batch)
            trial = StageWork("search", jobs=1, loads=1)
            fit_work(trial, m, p.train.lengths, trial_tc, eval_enc.lengths)
            trial.forward("batched", float(eval_enc.lengths.sum()), len(eval_enc))
            w.add(trial.scaled(sc.trials))
    w.what = (f"{len(_pairs(cfg))} (task, method) x {sc.trials} trials: {_per_task(rows)} rows "
              f"x <= {_n(max(sc.epochs), 'epoch')}, scored on {_per_task(evals)} selection rows")
    return w


def train_settings(cfg: StudyConfig, method: str):
    """The ``TrainConfig`` a training job runs with, as far as it is known before the
    search: with the search on, its largest epoch choice and smallest batch (bounds)."""
    sc = cfg.search
    if not sc.enabled:
        return cfg.train
    return replace(cfg.train, epochs=max(sc.epochs),
                   batch_size=min(sc.batch_full if method == "full" else sc.batch_lora))


def _train(cfg, tokenizer, prepared) -> StageWork:
    w = StageWork("train")
    rows, epochs = {}, set()
    for t, m in _pairs(cfg):
        p, tc = prepared[t], train_settings(cfg, m)
        job = StageWork("train", jobs=1, loads=1)
        fit_work(job, m, p.train.lengths, tc, p.early_stop.lengths)
        # then the whole validation split, scored once (train.train_job)
        job.forward("batched", float(p.val.lengths.sum()), len(p.val))
        w.add(job.scaled(len(cfg.seeds)))
        rows[t], epochs = len(p.train), epochs | {tc.epochs}
    first = prepared[cfg.tasks[0]]
    w.what = (f"{_n(len(cfg.tasks), 'task')} x {_n(len(cfg.methods), 'method')} x "
              f"{_n(len(cfg.seeds), 'seed')}: "
              f"{_per_task(rows)} rows x {'/'.join(map(str, sorted(epochs)))} epoch(s), "
              f"early-stop evals of {len(first.early_stop)} rows, validation once")
    return w


def _extract(cfg, tokenizer, prepared) -> StageWork:
    from .extract import sample_split

    ec, w, rows = cfg.extract, StageWork("extract"), {}
    models = 1 + len(cfg.methods) * len(cfg.seeds)   # the base and every trained model
    for t in cfg.tasks:
        enc = D.encode_split(tokenizer, sample_split(prepared[t].val_split, ec.examples, ec.seed),
                             cfg.data.max_length)
        w.forward("batched", models * float(enc.lengths.sum()), models * len(enc))
        w.jobs += 1
        w.loads += models
        rows[t] = len(enc)
    w.what = f"{models} models per task x {_per_task(rows)} validation rows, forward"
    return w


def _drift(cfg, tokenizer, prepared) -> StageWork:
    models = len(cfg.methods) * len(cfg.seeds)
    return StageWork("drift", jobs=len(cfg.tasks), cheap="arithmetic on pooled arrays",
                     what=f"{models} models per task vs the base: CKA, cosine, tests")


def _report(cfg, tokenizer, prepared) -> StageWork:
    return StageWork("report", jobs=1, cheap="reads the run directory",
                     what="Markdown + HTML from the run directory's files")


def _bench(cfg, tokenizer, prepared) -> StageWork:
    """The serving benchmark (serving/bench*.py, identity.py): per task and benchmarked
    seed every served kind at each batch size (warm-up requests included), several
    adapters on one base, and the identity checks (float64 and the serving dtype)."""
    from .serving.bench_multi import choose_adapters
    from .tasks import get_task

    bc, w = cfg.bench, StageWork("bench", jobs=1)
    seeds = [s for s in cfg.seeds if not bc.seeds or s in bc.seeds]
    if not seeds:
        w.off = f"bench.seeds {bc.seeds} holds no training seed"
        w.what = "off: no model to benchmark"
        return w
    sizes = sorted(set(bc.batch_sizes))
    kinds = (1 if "full" in cfg.methods else 0) + (3 if "lora" in cfg.methods else 0)
    enc = {t: D.encode_split(tokenizer, prepared[t].val_split.subset(
        bc.requests, cfg.data.subset_seed), cfg.data.max_length).lengths.tolist()
        for t in cfg.tasks}

    def requests(lengths: list[int], batch: int) -> list[list[int]]:
        return [lengths[i:i + batch] for i in range(0, len(lengths), batch)]

    def warm(reqs: list, n: int) -> list:  # time_interleaved's warm-up: n calls, cycling
        return [reqs[i % len(reqs)] for i in range(n)]

    def serve(reqs: list[list[int]], passes: int, kind: str | None = None) -> None:
        """``passes`` models serve ``reqs`` (each a list of row lengths)."""
        if reqs:
            kind = kind or ("batch1" if max(map(len, reqs)) == 1 else "batched")
            w.forward(kind, passes * sum(map(sum, reqs)), passes * sum(map(len, reqs)))

    for t in cfg.tasks:  # bench_task: every served kind of every (task, seed)
        for _ in seeds:
            w.loads += kinds
            serve(requests(enc[t], sizes[0])[:bc.warmup], kinds)   # warm-up while loaded
            for b in sizes:
                reqs = requests(enc[t], b)
                serve(reqs + warm(reqs, bc.warmup), kinds)
    lora = [(t, s) for t in cfg.tasks for s in seeds] if "lora" in cfg.methods else []
    chosen = choose_adapters(list(cfg.tasks), [(t, "lora", s) for t, s in lora])
    peft = len({get_task(t).num_labels for t, _ in chosen}) == 1  # heads of one shape

    def round_robin(n: int) -> list[int]:  # row j: adapter j mod k, example j div k
        return [enc[chosen[j % len(chosen)][0]][j // len(chosen)]
                for j in range(n * len(chosen))]

    if len(chosen) >= 2:  # bench_multi: our runtime, PEFT, a merged model for reference
        rows = round_robin(min(len(enc[t]) for t, _ in chosen))
        for reqs, passes in ((requests(rows, 1), 1 + peft),
                             (requests(rows, bc.mixed_batch_size), 2 + peft)):
            serve(reqs + warm(reqs, min(bc.warmup, len(reqs))), passes)
        w.loads += 1 + peft
    # identity: float64 (the verdict), then the serving dtype; per adapter its first
    # examples at batch 1 (the reference), then our runtime and the merged model
    ident = 16  # serving.bench.run_bench's identity_examples
    for dtype in ("float64", None):
        for t, _ in lora:
            serve(requests(enc[t][:ident], 1), 1, dtype)
            for b in sizes:
                serve(requests(enc[t][:ident], b), 2, dtype)
            w.loads += 1
        if len(chosen) >= 2:
            rows = round_robin(min(len(enc[t][:ident]) for t, _ in chosen))
            for b in (1, bc.mixed_batch_size):  # stream, mixed: our runtime and PEFT
                serve(requests(rows, b), 1 + peft, dtype)
            w.loads += 1 + peft
    w.what = (f"{_n(len(cfg.tasks), 'task')} x {_n(len(seeds), 'seed')} x {kinds} served "
              f"models x {_per_task({t: len(e) for t, e in enc.items()})} requests at batch "
              f"{'/'.join(map(str, sizes))}, several adapters, identity checks")
    return w


# --------------------------------------------------------------------------- throughput

@dataclass
class Throughput:
    """This machine's measured speed on the study's model."""

    model: str
    device: str
    threads: int
    task: str                       # whose training rows were measured
    tokens: dict[str, int]          # what -> real tokens per timed step
    train_flops_s: dict[str, float] = field(default_factory=dict)    # method -> FLOP/s
    train_fpt: dict[str, int] = field(default_factory=dict)          # method -> FLOPs/token
    step_s: dict[str, float] = field(default_factory=dict)           # method -> optimizer step
    forward_flops_s: dict[str, float] = field(default_factory=dict)  # kind -> FLOP/s
    forward_fpt: int = 0
    load_s: float = 0.0             # a fresh copy of the base model
    seconds: float = 0.0            # the measurement's wall time
    contention: float | None = None  # CPU share other processes used meanwhile

    def tokens_s(self, what: str) -> float:
        if what in self.train_flops_s:
            return self.train_flops_s[what] / self.train_fpt[what]
        return self.forward_flops_s[what] / self.forward_fpt


def _trim(lengths: np.ndarray, batch: np.ndarray, budget: int) -> np.ndarray:
    """The first rows of ``batch`` holding at most ``budget`` real tokens (at least one)."""
    keep = int(np.searchsorted(np.cumsum(lengths[batch]), budget, side="right"))
    return batch[:max(1, keep)]


def calibration_rows(lengths: np.ndarray, batch_size: int, budget: int,
                     group_by_length: bool = True) -> np.ndarray:
    """A representative training batch: of one epoch's batches (drawn as training draws
    them), the one with the median real-token count, trimmed to ``budget`` real tokens."""
    batches = sorted(D.train_batches(lengths, batch_size, 0, group_by_length),
                     key=lambda b: (int(lengths[b].sum()), int(b[0])))
    return _trim(lengths, batches[len(batches) // 2], budget)


def measure(cfg: StudyConfig, base, prepared, methods: Sequence[str],
            kinds: Sequence[str] = ("batched",),
            log: Callable[[str], None] = lambda s: None) -> Throughput:
    """Time real steps of the study's model on ``prepared``'s training rows.

    Per method in ``methods``: one warm-up, then up to ``TIMED_STEPS`` forward + backward
    steps on a ``train.batch_size`` batch (trimmed to ``TRAIN_TOKENS`` real tokens) and
    optimizer steps (clipping, AdamW, zero_grad, as ``train.fit``), medians. No-grad
    forwards for ``kinds``: ``batched`` (``train.eval_batch_size`` rows, trimmed to
    ``FORWARD_TOKENS``), ``batch1`` (one row in the serving dtype), ``float64`` (one row in
    float64). The backbone is loaded once for all of it, after a first load that warms the
    imports; that second load is timed as the cost of building a model.
    """
    import torch

    from .devices import serving_dtype, training_device
    from .flops import forward_flops_per_token
    from .models import build_classifier
    from .timing import CpuContention

    tc, t_start = cfg.train, time.perf_counter()
    threads = torch.get_num_threads()
    if tc.threads:  # as every stage computes (stages.run_stage)
        torch.set_num_threads(tc.threads)
    device = training_device()
    lengths = prepared.train.lengths
    train_rows = calibration_rows(lengths, tc.batch_size, TRAIN_TOKENS, cfg.data.group_by_length)
    fwd_rows = calibration_rows(lengths, tc.eval_batch_size, FORWARD_TOKENS,
                                cfg.data.group_by_length)
    one = np.argsort(lengths, kind="stable")[len(lengths) // 2: len(lengths) // 2 + 1]
    try:
        with CpuContention() as contention:
            log(f"dry run: measuring {base.name} on {device.type} ({torch.get_num_threads()} "
                f"threads) with real {prepared.task.name} training rows ...")
            base.backbone()
            t0 = time.perf_counter()
            model = build_classifier(base.backbone(), prepared.task.num_labels, 0).to(device)
            tp = Throughput(base.name, str(device), torch.get_num_threads(), prepared.task.name,
                            {"train": int(lengths[train_rows].sum()),
                             "batched": int(lengths[fwd_rows].sum()),
                             "batch1": int(lengths[one].sum())},
                            forward_fpt=forward_flops_per_token(model),
                            load_s=time.perf_counter() - t0)
            dtypes = {"batched": None, "float64": torch.float64,
                      "batch1": serving_dtype(device, tc.precision)[0]}
            for kind in [k for k in FORWARD_KINDS if k in kinds]:
                rows = fwd_rows if kind == "batched" else one
                seconds = _time_forward(model, _batch(prepared, rows), dtypes[kind], tc, device)
                tp.forward_flops_s[kind] = int(lengths[rows].sum()) * tp.forward_fpt / seconds
                log(f"  {FORWARD_KINDS[kind]}: {tp.tokens_s(kind):.0f} tokens/s "
                    f"({len(rows)} rows, {int(lengths[rows].sum())} tokens)")
            # full first: LoRA wraps the backbone in place (PEFT), full fine-tuning does not
            for method in sorted(methods, key=lambda m: m != "full"):
                model, fpt, fb, step = _time_training(model, method, _batch(prepared, train_rows),
                                                      cfg, device)
                tp.train_fpt[method], tp.step_s[method] = fpt, step
                tp.train_flops_s[method] = tp.tokens["train"] * fpt / fb
                log(f"  training {method}: {tp.tokens_s(method):.0f} tokens/s "
                    f"({len(train_rows)} rows, {tp.tokens['train']} tokens), optimizer step "
                    f"{step:.2f} s")
            del model
    finally:
        torch.set_num_threads(threads)
    tp.seconds, tp.contention = time.perf_counter() - t_start, contention.share
    return tp


def _batch(prepared, rows: np.ndarray) -> D.Batch:
    return next(D.iter_batches(prepared.train, [rows], prepared.pad_id))


def _timed(*fns: Callable[[bool], None], device, repeats: int = TIMED_STEPS) -> list[float]:
    """Median seconds of each of ``fns``, run in turn: one untimed warm-up round
    (``fn(True)``: lazy initialisation, the optimizer's state; on one row, which is enough
    for that and cheap), then ``repeats`` timed rounds (``fn(False)``), or fewer (at least
    one) once the timed ones took ``STEP_BUDGET_S``."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns:
        fn(True)
    times: list[list[float]] = [[] for _ in fns]
    while len(times[0]) < repeats and sum(map(sum, times)) < STEP_BUDGET_S:
        for fn, t in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            fn(False)
            sync()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _time_forward(model, b: D.Batch, dtype, tc, device) -> float:
    """Seconds of one no-grad forward of ``b``: as evaluation runs it (``dtype`` None:
    autocast as ``train.precision`` says) or as serving does (the model in ``dtype``)."""
    import torch

    from .train import autocast_ctx

    ids, mask = b.input_ids.to(device), b.attention_mask.to(device)
    model.to(dtype or torch.float32).eval()

    @torch.no_grad()
    def forward(warm_up: bool):
        rows = slice(0, 1 if warm_up else None)
        with autocast_ctx(device, tc.precision) if dtype is None else contextlib.nullcontext():
            model(input_ids=ids[rows], attention_mask=mask[rows])

    try:
        (seconds,) = _timed(forward, device=device, repeats=3 if len(ids) == 1 else TIMED_STEPS)
    finally:
        model.to(torch.float32)
    return seconds


def _time_training(model, method: str, b: D.Batch, cfg: StudyConfig, device):
    """``(model made trainable for method, FLOPs per token, seconds of forward + backward,
    seconds of an optimizer step)`` on ``b``, as ``train.fit`` steps."""
    from torch import nn

    from .devices import make_optimizer, param_groups
    from .flops import train_flops_per_token
    from .models import apply_method
    from .train import autocast_ctx, learning_rate

    tc = cfg.train
    model = apply_method(model, method, cfg).to(device)
    model.train()
    if tc.gradient_checkpointing == "on" or (tc.gradient_checkpointing == "auto"
                                             and device.type == "cuda"):
        from .train import _enable_checkpointing  # as fit does: recomputes, so it counts

        _enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, _ = make_optimizer(param_groups(params, tc.weight_decay), learning_rate(tc, method),
                            method, tc.optimizer_full, device)
    ids, mask, labels = (b.input_ids.to(device), b.attention_mask.to(device), b.labels.to(device))

    def backward(warm_up: bool):
        rows = slice(0, 1 if warm_up else None)
        with autocast_ctx(device, tc.precision):
            out = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows])
        out.loss.backward()

    def step(warm_up: bool):
        if tc.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    fb, st = _timed(backward, step, device=device)
    return model, train_flops_per_token(model, method), fb, st


# --------------------------------------------------------------------------- estimate

def estimate(works: list[StageWork], tp: Throughput) -> list[StageWork]:
    """Fill each stage's FLOPs and seconds: its FLOPs at the FLOP/s measured for each kind
    of work, plus optimizer steps and model loads at their measured seconds."""
    for w in works:
        if w.off or w.cheap:
            continue
        w.flops = float(sum(v * tp.train_fpt[m] for m, v in w.train_tokens.items())
                        + sum(v * tp.forward_fpt for v in w.forward_tokens.values()))
        w.seconds = (sum(v * tp.train_fpt[m] / tp.train_flops_s[m]
                         for m, v in w.train_tokens.items())
                     + sum(v * tp.forward_fpt / tp.forward_flops_s[k]
                           for k, v in w.forward_tokens.items())
                     + sum(n * tp.step_s[m] for m, n in w.steps.items())
                     + w.loads * tp.load_s)
    return works


def needs(works: list[StageWork]) -> tuple[list[str], list[str]]:
    """(methods to time training for, forward kinds to time) for these stages' work."""
    methods = sorted({m for w in works if not w.off for m, v in w.train_tokens.items() if v})
    kinds = [k for k in FORWARD_KINDS
             if any(w.forward_tokens.get(k) for w in works if not w.off)]
    return methods, kinds


def plan_study(cfg: StudyConfig, stages: Sequence[str], base=None,
               log: Callable[[str], None] = lambda s: None
               ) -> tuple[list[StageWork], Throughput | None]:
    """Count every stage's work on the real data, measure this machine, estimate.

    Returns the stages' work (``flops`` and ``seconds`` filled where estimated) and the
    measurement (None when no selected stage computes with the model)."""
    from .models import load_base
    from .train import prepare_task

    if set(stages) <= CHEAP:  # nothing to count on the data, nothing to measure
        return count_work(cfg, stages, None, {}), None
    base = base or load_base(cfg)
    log(f"dry run: tokenizing the data of {', '.join(cfg.tasks)} ...")
    prepared = {t: prepare_task(cfg, t, base.tokenizer) for t in cfg.tasks}
    works = count_work(cfg, stages, base.tokenizer, prepared)
    methods, kinds = needs(works)
    if not (methods or kinds):
        return works, None
    tp = measure(cfg, base, prepared[cfg.tasks[0]], methods, kinds, log)
    return estimate(works, tp), tp


# --------------------------------------------------------------------------- text

def human(n: float) -> str:
    """1234 -> "1.2k", 5.6e6 -> "5.6M"."""
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.1f}{unit}"
    return f"{n:.0f}"


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def format_plan(cfg: StudyConfig, works: list[StageWork], tp: Throughput | None,
                run_dir: str | Path | None = None) -> str:
    """The plan as plain text: one row per stage, a total, how throughput was measured,
    and what the numbers leave out."""
    head = f"dry run{f' of {run_dir}' if run_dir else ''}: nothing was run or written"
    lines = [head,
             f"model {cfg.model.name}; tasks {', '.join(cfg.tasks)}; methods "
             f"{', '.join(cfg.methods)}; seeds {', '.join(map(str, cfg.seeds))}", ""]
    rows = [("stage", "jobs", "rows", "tokens", "FLOPs", "est. time", "what")]
    for w in works:
        if w.off:
            rows.append((w.stage, "off", "-", "-", "-", "-", w.what))
        elif w.cheap:
            rows.append((w.stage, str(w.jobs), "-", "-", "-", "seconds", w.what))
        else:
            rows.append((w.stage, str(w.jobs), human(w.rows), human(w.tokens),
                         f"{w.flops:.1e}" if w.flops is not None else "-",
                         duration(w.seconds), w.what))
    on = [w for w in works if not (w.off or w.cheap)]
    total = sum(w.seconds for w in on if w.seconds is not None) if on else None
    cheap = [w.stage for w in works if w.cheap]
    rows.append(("total", str(sum(w.jobs for w in works if not w.off)),
                 human(sum(w.rows for w in on)) if on else "-",
                 human(sum(w.tokens for w in on)) if on else "-",
                 f"{sum(w.flops or 0 for w in on):.1e}" if on else "-", duration(total),
                 f"+ seconds for {', '.join(cheap)}" if cheap else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(wd) for c, wd in zip(r[1:6], widths[1:])]
        lines.append("  ".join(cells + [r[6]]).rstrip())
    lines.append("")
    if tp is not None:
        lines += _measured(tp)
    lines += _notes(cfg, works, run_dir)
    return "\n".join(lines)


def _measured(tp: Throughput) -> list[str]:
    out = [f"throughput measured in this process ({tp.device}, {_n(tp.threads, 'thread')}, "
           f"{tp.seconds:.0f} s) on {tp.model}, real {tp.task} training rows; "
           f"FLOPs = 6N (full) / 4N+2n (LoRA) / 2N (forward) per real token:"]
    for m, fs in tp.train_flops_s.items():
        out.append(f"  training {m}: {tp.tokens_s(m):.0f} tokens/s = {fs / 1e9:.1f} GFLOP/s "
                   f"on {tp.tokens['train']} tokens per step; optimizer step "
                   f"{tp.step_s[m]:.2f} s")
    for k, fs in tp.forward_flops_s.items():
        n = tp.tokens["batch1" if k == "float64" else k]
        out.append(f"  scoring, {FORWARD_KINDS[k]}: {tp.tokens_s(k):.0f} tokens/s = "
                   f"{fs / 1e9:.1f} GFLOP/s on {n} tokens")
    out.append(f"  loading a fresh copy of the base model: {tp.load_s:.1f} s (once per model "
               "built)")
    if tp.contention is not None and tp.contention > 0.1:
        out.append(f"  other processes used {tp.contention:.0%} of this machine's CPU meanwhile: "
                   "the estimate holds under that load (shared cores slow torch down a lot)")
    return out


def _notes(cfg: StudyConfig, works: list[StageWork], run_dir) -> list[str]:
    from .store import RunDir

    names = {w.stage for w in works if not w.off}
    notes = ["rows and tokens count every pass (each epoch, each evaluation); tokens are real "
             "tokens (padding is work too: the estimate's throughput includes it)"]
    if "sanity" in names:
        notes.append(f"sanity: at most; it stops once the training loss < "
                     f"{cfg.sanity.loss_threshold}")
    if {"search", "train"} & names:
        bound = ("the search's largest epoch choice and smallest batch size "
                 f"(epochs {cfg.search.epochs}), since training uses the best trial's"
                 if cfg.search.enabled else f"train.epochs={cfg.train.epochs}")
        prune = "search" in names and cfg.search.enabled and cfg.search.prune
        notes.append(f"search/train: upper bounds: {bound}; early stopping (patience "
                     f"{cfg.train.patience})" + (" and pruning" if prune else "")
                     + " cut runs short")
    if "bench" in names:
        notes.append("bench: float64 identity checks timed at batch 1; latency timing "
                     "overheads not counted")
    notes.append("not counted: tokenization, saving models, Optuna, drift and report "
                 "(seconds each)")
    if run_dir is not None and RunDir(run_dir).is_run_dir():
        notes.append(f"{run_dir} exists: a run skips the work it finished; counted here "
                     "in full")
    return ["notes:"] + [f"  - {n}" for n in notes]


def dry_run(cfg: StudyConfig, stages: Sequence[str], run_dir: str | Path | None = None) -> str:
    """``loralens run --dry-run``: the plan of ``stages`` as text (progress on stderr)."""
    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    works, tp = plan_study(cfg, stages, log=log)
    return format_plan(cfg, works, tp, run_dir)
