"""Dry run, step 2: this machine's throughput on the study's own model (:func:`measure`):
a few training steps per method on real training rows of the first task (the step
``loop.fit`` takes, built by ``loralens.training.step.build_train_step``), a no-grad
forward at ``train.eval_batch_size``, and, for the serving benchmark, batch-1 forwards
(in the serving dtype, and in float64 for its identity checks). Timed with
``loralens.core.timing``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from loralens.core.config import StudyConfig
from loralens.core.timing import Timings, median, stopwatch, time_interleaved
from loralens.study.plan.work import FORWARD_KINDS
from loralens.training import batches as B
from loralens.models.methods import kind_trains_all

# Real tokens per timed calibration step: a train.batch_size batch is trimmed to this many,
# so the calibration stays near 30 s on a 2-core CPU with SmolLM2-135M (full fine-tuning
# runs ~100 tokens/s there); the FLOP/s of a CPU hardly change above a few hundred tokens.
TRAIN_TOKENS = 320
FORWARD_TOKENS = 640
TIMED_STEPS = 2          # after one warm-up step (on one row); the median is kept
STEP_BUDGET_S = 8.0      # ... or fewer (at least one) once the timed ones took this long


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
    basis: dict[str, str] = field(default_factory=dict)  # method -> how priced (plan.cost_basis)
    kernel_s: dict[tuple, float] = field(default_factory=dict)  # kernel -> s per call (plan.kernels)
    forward_flops_s: dict[str, float] = field(default_factory=dict)  # kind -> FLOP/s
    forward_fpt: int = 0
    load_s: float = 0.0             # a fresh copy of the base model
    seconds: float = 0.0            # the measurement's wall time
    contention: float | None = None  # CPU share other processes used meanwhile
    # float32 model-shape GEMM peak measured here (FLOP/s; measure(peak=True)), and the
    # peak of the machine the plan is for (dry_run.for_machine), None: planned for this one
    peak_here: float | None = None
    peak_target: float | None = None

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
    batches = sorted(B.train_batches(lengths, batch_size, 0, group_by_length),
                     key=lambda b: (int(lengths[b].sum()), int(b[0])))
    return _trim(lengths, batches[len(batches) // 2], budget)


def measure(cfg: StudyConfig, base, prepared, methods: Sequence[str],
            kinds: Sequence[str] = ("batched",),
            log: Callable[[str], None] = lambda s: None, peak: bool = False,
            kernels: Sequence[tuple] = ()) -> Throughput:
    """Time real steps of the study's model on ``prepared``'s training rows.

    Per method in ``methods``: one warm-up, then up to ``TIMED_STEPS`` training steps as
    ``loop.fit`` takes them (``training.step``: its precision, gradient checkpointing and
    optimizer; uncompiled, since compiling takes minutes) on a ``train.batch_size`` batch
    (trimmed to ``TRAIN_TOKENS`` real tokens): medians of the forward + backward and of
    the optimizer step (clipping, AdamW, zero_grad). No-grad
    forwards for ``kinds``: ``batched`` (``train.eval_batch_size`` rows, trimmed to
    ``FORWARD_TOKENS``), ``batch1`` (one row in the serving dtype), ``float64`` (one row in
    float64). The backbone is loaded once for all of it, after a first load that warms the
    imports; that second load is timed as the cost of building a model. ``peak``: also
    this machine's float32 peak at the model's linear-layer shapes with ``TRAIN_TOKENS``
    tokens (``training.flops.model_gemm_peak_info``, the peak MFU is reported against), for
    planning another machine (:func:`loralens.study.plan.dry_run.for_machine`).
    ``kernels``: the weights and drift stages' kernels to time
    (:func:`loralens.study.plan.kernels.time_kernels`).
    """
    import torch

    from loralens.training.devices import serving_dtype, training_device
    from loralens.training.flops import forward_flops_per_token
    from loralens.models.classifier import build_classifier
    from loralens.core.timing import CpuContention

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
            if peak:
                from loralens.training.flops import model_gemm_peak_info

                tp.peak_here = model_gemm_peak_info(model.config, TRAIN_TOKENS,
                                                    torch.float32, str(device)).flops_per_s
                log(f"  float32 peak at the model's shapes: {tp.peak_here / 1e9:.1f} GFLOP/s")
            dtypes = {"batched": None, "float64": torch.float64,
                      "batch1": serving_dtype(device, tc.precision)[0]}
            for kind in [k for k in FORWARD_KINDS if k in kinds]:
                rows = fwd_rows if kind == "batched" else one
                seconds = _time_forward(model, _batch(prepared, rows), dtypes[kind], tc, device)
                tp.forward_flops_s[kind] = int(lengths[rows].sum()) * tp.forward_fpt / seconds
                log(f"  {FORWARD_KINDS[kind]}: {tp.tokens_s(kind):.0f} tokens/s "
                    f"({len(rows)} rows, {int(lengths[rows].sum())} tokens)")
            # full first: LoRA wraps the backbone in place (PEFT), full fine-tuning does not
            for method in sorted(methods, key=lambda m: not kind_trains_all(m)):
                model, fpt, fb, step, dtype = _time_training(
                    model, method, _batch(prepared, train_rows), cfg, device, prepared)
                tp.train_fpt[method], tp.step_s[method] = fpt, step
                tp.train_flops_s[method] = tp.tokens["train"] * fpt / fb
                log(f"  training {method}: {tp.tokens_s(method):.0f} tokens/s "
                    f"({len(train_rows)} rows, {tp.tokens['train']} tokens), optimizer step "
                    f"{step:.2f} s, computing in {dtype}")
            del model
            if kernels:
                from loralens.study.plan.kernels import time_kernels

                log(f"  timing {len(set(kernels))} kernels of the weights and drift stages ...")
                tp.kernel_s = time_kernels(kernels)
    finally:
        torch.set_num_threads(threads)
    tp.seconds, tp.contention = time.perf_counter() - t_start, contention.share
    return tp


def _batch(prepared, rows: np.ndarray) -> B.Batch:
    return next(B.iter_batches(prepared.train, [rows], prepared.pad_id))


def _on(b: B.Batch, device) -> B.Batch:
    """``b``'s tensors on ``device`` (moved once, outside the timed calls)."""
    return B.Batch(b.input_ids.to(device), b.attention_mask.to(device), b.labels.to(device),
                   b.index)


def _first_row(b: B.Batch) -> B.Batch:
    """The batch's first row (padded as in the batch): the untimed warm-up's input, enough
    for lazy initialisation and the optimizer's state, and cheap."""
    return B.Batch(b.input_ids[:1], b.attention_mask[:1], b.labels[:1], b.index[:1])


def _timed(fn: Callable[[], object], device, repeats: int = TIMED_STEPS) -> Timings:
    """``repeats`` timed calls of ``fn`` (side ``"step"``, results kept), or fewer (at least
    one) once they took ``STEP_BUDGET_S``; CUDA synchronised around each. The garbage
    collector runs as it does while training (and a full collection first would cost the
    dry run ~0.3 s per call)."""
    return time_interleaved({"step": fn}, repeats=repeats, device=device, keep="all",
                            budget_s=STEP_BUDGET_S, pause_gc=False)


def _time_forward(model, b: B.Batch, dtype, tc, device) -> float:
    """Seconds of one no-grad forward of ``b``: as evaluation runs it (``dtype`` None:
    autocast as ``train.precision`` says) or as serving does (the model in ``dtype``)."""
    import torch

    from loralens.training.loop import autocast_ctx

    b = _on(b, device)
    model.to(dtype or torch.float32).eval()

    @torch.no_grad()
    def forward(batch: B.Batch = b):
        with autocast_ctx(device, tc.precision) if dtype is None else contextlib.nullcontext():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)

    try:
        forward(_first_row(b))  # warm-up
        t = _timed(forward, device, repeats=3 if len(b.input_ids) == 1 else TIMED_STEPS)
    finally:
        model.to(torch.float32)
    return t.median("step")


def _time_training(model, method: str, b: B.Batch, cfg: StudyConfig, device, prepared):
    """``(model made trainable for method, FLOPs per token, seconds of forward + backward,
    seconds of an optimizer step, the dtype it computed in)`` on ``b``: the step
    ``loop.fit`` takes (:func:`loralens.training.step.build_train_step`: on the CPU,
    ``train.precision`` auto times bfloat16 where training would use it), the model left in
    float32 afterwards."""
    from loralens.models.classifier import apply_method
    from loralens.models.methods import get_method
    from loralens.training.job import learning_rate
    from loralens.training.precision import dtype_label
    from loralens.training.step import build_train_step, tokens_per_batch

    tc, meth, b = cfg.train, get_method(method, cfg), _on(b, device)
    model = apply_method(model, method, cfg).to(device)
    model.train()
    step = build_train_step(model, tc, learning_rate(tc, method, meth.optimizer_kind),
                            meth.optimizer_kind, lr_ratio=meth.lr_ratio,
                            tokens=tokens_per_batch(prepared.train, tc.batch_size),
                            compile=False)

    def train_step(batch: B.Batch = b) -> float:
        """One step; returns its optimizer step's seconds."""
        step.forward_backward(batch)
        with stopwatch(device) as sw:
            step.optimizer_step()
        return sw.seconds

    try:
        train_step(_first_row(b))  # warm-up
        t = _timed(train_step, device)
    finally:
        step.finish()
    opt_s = t.results["step"]
    fb = median([s - o for s, o in zip(t.seconds["step"], opt_s)])
    return model, step.flops_per_token, fb, median(opt_s), dtype_label(step.dtype)
