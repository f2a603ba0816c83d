"""The training loop: ``fit`` (one loop for every method), ``evaluate`` and the
distributed helpers they share.

``fit`` trains a classifier in place, one step at a time as ``step.py`` builds it (AdamW,
fused where available; gradient clipping; the precision of ``train.precision``,
``precision.py``: bfloat16 cast once on the CPU where it pays, autocast on a GPU; gradient
checkpointing), with a cosine schedule with linear warm-up, gradient accumulation, early
stopping on the selection rows' loss a few times per epoch with the best parameters
restored, and FLOPs utilisation against peaks measured in this process (``flops.py``). Data parallel when ``torch.distributed`` is initialised (accelerate
launch, torchrun): every rank takes its share of each global batch.

Given a checkpoint file, ``fit`` writes it every ``train.checkpoint_every`` optimizer steps
and, when it finds one of the same job, continues from it (``checkpoint.py``: parameters,
optimizer, schedule, RNG states, the position in the data order, early stopping's state)
to the same weights as an uninterrupted fit. Single-process fits only: a data-parallel
fit's ranks hold different RNG states, so it trains without checkpoints.

``evaluate`` scores an encoded split in float32 unless told otherwise; reported scores
always come from it in float32, after everything that selects.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from loralens.training import batches as B
from loralens.training import checkpoint as C
from loralens.core.config import TrainConfig
from loralens.training.metrics import scores
from loralens.training.step import build_train_step, model_config, tokens_per_batch

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- scoring

def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device



def model_num_labels(model: nn.Module) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.num_labels


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    lt = torch.as_tensor(logits, dtype=torch.float64)
    loss = float(nn.functional.cross_entropy(lt, torch.as_tensor(labels)).item())
    pred = logits.argmax(axis=1)
    s = scores(pred, labels, logits.shape[1])  # f1: binary for 2 classes, macro for more
    return {"loss": loss, "accuracy": s["accuracy"], "f1": s["f1"], "n": int(len(labels)),
            "mcc": s["mcc"]}


def autocast_ctx(device: torch.device, precision: str):
    """bf16 autocast on a CUDA device (``bf16``, or ``auto``); nothing on the CPU, where a
    model that trains in bfloat16 is cast once (``precision.CastOnce``)."""
    from loralens.training.precision import autocast

    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return autocast(device, torch.bfloat16 if use_bf16 else torch.float32)


@torch.no_grad()
def evaluate(model: nn.Module, enc: B.Encoded, pad_id: int, batch_size: int = 32,
             group_by_length: bool = True, precision: str = "fp32") -> dict:
    """Loss, accuracy, F1 (positive class 1) and per-example logits, in split order."""
    was_training = model.training
    model.eval()
    device = device_of(model)
    logits = np.zeros((len(enc), model_num_labels(model)), dtype=np.float32)
    batches = B.eval_batches(enc.lengths, batch_size, group_by_length)
    for b in B.iter_batches(enc, batches, pad_id):
        with autocast_ctx(device, precision):
            out = model(input_ids=b.input_ids.to(device),
                        attention_mask=b.attention_mask.to(device))
        logits[b.index] = out.logits.float().cpu().numpy()
    model.train(was_training)
    return {**classification_metrics(logits, enc.labels), "logits": logits}



# --------------------------------------------------------------------------- fit

@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)   # one entry per evaluation
    steps: int = 0
    best_step: int = 0
    best_val_loss: float = math.inf
    stopped_early: bool = False
    train_seconds: float = 0.0
    real_tokens: int = 0
    padded_tokens: int = 0
    final_train_loss: float = math.nan
    epochs: int = 0
    eval_every: int = 0               # optimizer steps between early-stopping evaluations
    stopped_step: int | None = None   # the step at which patience ran out (None: it did not)
    # throughput (flops.py): FLOPs of the training steps over their seconds, against
    # peaks measured in this process in the dtype training computed in
    precision: str = "fp32"
    precision_note: str = ""
    compiled: bool = False
    flops_per_token: int = 0
    train_flops: float = 0.0
    step_seconds: float = 0.0         # forward, backward and optimizer steps
    eval_seconds: float = 0.0         # early-stopping evaluations inside the fit
    achieved_flops_per_s: float = math.nan
    peak_flops_per_s: float = math.nan
    peak_model_flops_per_s: float = math.nan
    # the load when the kept peaks were measured (1-minute average, os.getloadavg), the
    # machine's CPU count and how many measurements each peak is the best of
    peak_load: float | None = None
    peak_model_load: float | None = None
    peak_cpus: int | None = None
    peak_measurements: int = 0
    mfu: float = math.nan
    mfu_model_shapes: float = math.nan
    resumed_at: list[int] = field(default_factory=list)  # steps resumed from a checkpoint at

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# what a checkpoint carries of the FitResult: the progress so far (the rest is measured by
# the process that finishes the fit)
PROGRESS = ("history", "steps", "best_step", "best_val_loss", "stopped_early", "stopped_step",
            "real_tokens", "padded_tokens", "final_train_loss", "epochs", "step_seconds",
            "eval_seconds", "train_seconds", "resumed_at")


@dataclass
class Position:
    """Where a fit stands at an optimizer-step boundary: the epoch, the next micro-batch of
    its data order, optimizer steps taken in it, and the epoch's running loss sums."""

    epoch: int
    batch: int
    step_in_epoch: int
    loss_sum: float
    rows: int
    window: tuple[float, int]   # (loss_sum, rows) at the previous optimizer step



class _Loop:
    """One ``fit`` call's state: the training step (``step.py``: the model ready to train,
    its precision and optimizer), the schedule, early stopping's best state, the progress
    bar and the result."""

    def __init__(self, model: nn.Module, train_enc: B.Encoded, early_stop_enc, pad_id: int,
                 tc: TrainConfig, lr: float, seed: int, opts: dict):
        from loralens.training import precision as P

        self.model, self.train_enc, self.early_stop_enc = model, train_enc, early_stop_enc
        self.pad_id, self.tc, self.seed, self.opts = pad_id, tc, seed, opts
        device = device_of(model)
        self.res = res = FitResult()
        self.step = step = build_train_step(model, tc, lr, opts["method"],
                                            lr_ratio=opts.get("lr_ratio"),
                                            tokens=tokens_per_batch(train_enc, tc.batch_size))
        self.mp = step.mp
        res.precision, res.precision_note = P.dtype_label(step.dtype), step.precision_note
        res.flops_per_token, res.compiled = step.flops_per_token, step.compiled
        self.peak = _measure_peaks(model, step.dtype, device, train_enc, tc, res)
        if step.optimizer_note and rank_zero():
            log.info(f"{opts['desc']}: {step.optimizer_note}")
        self.sched, total = _cosine_schedule(step.opt, len(train_enc), tc)
        step.total_steps = total  # a method's step hook runs over it (AdaLoRA's budget)
        self.rank, self.world = dist_info()
        self.best_state, self.bad = None, 0
        res.eval_every = eval_interval(len(train_enc), tc)
        self.bar = tqdm(total=total, desc=opts["desc"], unit="step", dynamic_ncols=True,
                        disable=not opts["progress"] or self.rank > 0)
        self.start: Position | None = None   # where a resumed fit continues
        self.seconds_before = 0.0            # train_seconds of the killed processes
        self.ckpt = Path(opts["checkpoint"]) if opts.get("checkpoint") and tc.checkpoint_every \
            else None
        if self.ckpt is not None and self.world > 1:
            log.info(f"{opts['desc']}: data parallel: no checkpoints (ranks differ in RNG state)")
            self.ckpt = None
        if self.ckpt is not None:
            self.fingerprint = C.fingerprint(tc, lr, seed, opts, train_enc, early_stop_enc,
                                             self.trained(), step.opt)
            self.resume()

    def trained(self) -> dict[str, torch.Tensor]:
        """The trained parameters (float32 masters where there are) by name, not copied."""
        return {self.mp.names[id(q)]: q.detach() for q in self.mp.params}

    def run(self) -> FitResult:
        res, tc = self.res, self.tc
        self.t0 = t0 = time.perf_counter()
        self.model.train()
        for epoch in range(self.start.epoch if self.start else 0, tc.epochs):
            stop = self.epoch(epoch)
            if (self.opts["stop_below_train_loss"] is not None
                    and res.final_train_loss < self.opts["stop_below_train_loss"]):
                break
            if res.history:
                res.history[-1].setdefault("train_loss", res.final_train_loss)
            if stop:
                break
        self.bar.close()
        res.train_seconds = self.seconds_before + time.perf_counter() - t0
        if self.best_state is not None:
            self.mp.restore(self.best_state)
        self.step.finish()  # float32 again: reported scores, extraction and saving read float32
        self.finish_throughput()
        self.model.eval()
        return res

    def epoch(self, epoch: int) -> bool:
        """One epoch; True when training stops (patience ran out or ``max_steps``)."""
        res, tc = self.res, self.tc
        batches = B.train_batches(self.train_enc.lengths, tc.batch_size,
                                  self.seed * 1000 + epoch, self.opts["group_by_length"])
        # Data parallel: every rank takes its share of each global batch.
        local = [b[self.rank::self.world] for b in batches] if self.world > 1 else batches
        loss_sum, rows, step_in_epoch, stop = 0.0, 0, 0, False
        window = (0.0, 0)  # (loss_sum, rows) at the previous optimizer step
        first = 0
        if self.start is not None:  # resumed: this epoch's order, from the checkpoint's batch
            start, self.start = self.start, None
            first, step_in_epoch, loss_sum, rows = (start.batch, start.step_in_epoch,
                                                    start.loss_sum, start.rows)
            window = tuple(start.window)
        for i, idx in enumerate(local):
            if i < first:
                continue
            if len(idx):
                # weight = rows / rows of the accumulation window (all ranks): exact mean
                weight = len(idx) / _accum_rows(batches, i, tc.grad_accum)
                t_step = time.perf_counter()
                b = next(B.iter_batches(self.train_enc, [idx], self.pad_id, self.opts["pad_to"]))
                loss_sum += self.step.forward_backward(b, weight) * len(idx)
                res.real_tokens += b.real_tokens
                res.padded_tokens += b.attention_mask.numel()
                res.step_seconds += time.perf_counter() - t_step
                rows += len(idx)
            if (i + 1) % tc.grad_accum and i + 1 != len(batches):
                continue
            self.optimizer_step(loss_sum / max(rows, 1),
                                (loss_sum - window[0]) / max(rows - window[1], 1))
            window = (loss_sum, rows)
            step_in_epoch += 1
            last = i + 1 == len(batches) or bool(tc.max_steps and res.steps >= tc.max_steps)
            if self.early_stop_enc is not None and (step_in_epoch % res.eval_every == 0 or last):
                stop = self.evaluate_selection(epoch)
            if stop or (tc.max_steps and res.steps >= tc.max_steps):
                stop = True
                break
            if self.ckpt is not None and res.steps % tc.checkpoint_every == 0:
                self.save_checkpoint(Position(epoch, i + 1, step_in_epoch, loss_sum, rows,
                                              window))
        if self.world > 1:
            loss_sum, rows = _all_reduce_sum([loss_sum, float(rows)])
        res.final_train_loss = loss_sum / max(rows, 1)
        res.epochs = epoch + 1
        return stop

    def save_checkpoint(self, pos: Position) -> None:
        """Write the checkpoint (``checkpoint.py``) at an optimizer-step boundary."""
        res, t = self.res, time.perf_counter()
        opt_tensors, opt_meta = C.optimizer_state(self.step.opt)
        rng_tensors, rng_meta = C.rng_state()
        tensors = {"params": self.trained(), "optim": opt_tensors, "rng": rng_tensors}
        if self.best_state is not None:
            tensors["best"] = self.best_state
        progress = {k: getattr(res, k) for k in PROGRESS}
        progress["train_seconds"] = self.seconds_before + t - self.t0
        meta = {"fingerprint": self.fingerprint, "position": asdict(pos), "bad": self.bad,
                "result": json.loads(json.dumps(progress, default=_plain)),
                "optim": json.loads(json.dumps(opt_meta, default=_plain)),
                "schedule": json.loads(json.dumps(self.sched.state_dict(), default=_plain)),
                "rng": rng_meta, "precision": res.precision}
        C.write(self.ckpt, tensors, meta)
        log.debug(f"{self.opts['desc']}: checkpoint at step {res.steps} "
                  f"({time.perf_counter() - t:.2f} s): {self.ckpt}")

    def resume(self) -> None:
        """Continue from the checkpoint where there is one of this job (else start at 0)."""
        loaded = C.read(self.ckpt)
        if loaded is None:
            return
        res, meta = self.res, loaded.meta
        differ = C.differences(meta.get("fingerprint", {}), self.fingerprint)
        if differ:
            log.warning(f"{self.opts['desc']}: checkpoint {self.ckpt} is of another "
                        f"configuration ({', '.join(differ[:5])} differ); training starts at "
                        "step 0")
            return
        self.mp.restore(loaded.tensors["params"])
        C.load_optimizer_state(self.step.opt, loaded.tensors.get("optim", {}), meta["optim"])
        self.sched.load_state_dict(meta["schedule"])
        self.best_state = loaded.tensors.get("best")
        self.bad = meta["bad"]
        for k in PROGRESS:
            setattr(res, k, meta["result"][k])
        self.seconds_before = res.train_seconds
        self.start = Position(**meta["position"])
        C.set_rng_state(loaded.tensors["rng"], meta["rng"])
        self.step.steps_done = res.steps  # a method's step hook counts the steps taken
        res.resumed_at.append(res.steps)
        self.bar.update(res.steps)
        note = ("" if meta.get("precision") == res.precision else
                f" (it trained in {meta.get('precision')}, this process in {res.precision}: "
                "the result can differ from an uninterrupted run's)")
        log.info(f"{self.opts['desc']}: resuming from the checkpoint at step {res.steps}"
                 f"{note}")

    def optimizer_step(self, running_loss: float, step_loss: float = math.nan) -> None:
        res = self.res
        t_step = time.perf_counter()
        self.step.optimizer_step(_all_reduce_grads if self.world > 1 else None, self.sched)
        res.step_seconds += time.perf_counter() - t_step
        res.steps += 1
        on_step = self.opts.get("on_step")  # (step, this step's mean loss, learning rate)
        on_step and on_step(res.steps, step_loss, self.sched.get_last_lr()[0])
        seconds = max(res.step_seconds, 1e-9)
        achieved = res.flops_per_token * res.real_tokens / seconds
        self.bar.set_postfix(loss=f"{running_loss:.4f}",
                             tok_s=f"{res.real_tokens * self.world / seconds:.0f}",
                             mfu=f"{100 * achieved / self.peak:.0f}%")
        self.bar.update(1)

    def evaluate_selection(self, epoch: int) -> bool:
        t_eval = time.perf_counter()
        self.best_state, self.bad, stop = _early_stop_check(
            self.model, self.early_stop_enc, self.pad_id, self.tc, self.res, self.best_state,
            self.bad, epoch, self.mp)
        self.res.eval_seconds += time.perf_counter() - t_eval
        on_eval = self.opts["on_eval"]
        on_eval and on_eval(self.res.history[-1])
        return stop

    def finish_throughput(self) -> None:
        from loralens.training import flops

        res = self.res
        # the peaks measured again after training (the first measurement may have shared
        # the cores with other work): the maximum is kept, with its load (flops.py)
        _measure_peaks(self.model, self.step.dtype, device_of(self.model), self.train_enc,
                       self.tc, res, max_age_s=REMEASURE_AFTER_S)
        res.train_flops = float(res.flops_per_token * res.real_tokens)
        if res.step_seconds > 0:
            res.achieved_flops_per_s = res.train_flops / res.step_seconds
            res.mfu = flops.mfu(res.achieved_flops_per_s, res.peak_flops_per_s)
            res.mfu_model_shapes = flops.mfu(res.achieved_flops_per_s,
                                             res.peak_model_flops_per_s)


def fit(model: nn.Module, train_enc: B.Encoded, early_stop_enc: B.Encoded | None, pad_id: int,
        tc: TrainConfig, lr: float, seed: int, *, group_by_length: bool = True,
        stop_below_train_loss: float | None = None, pad_to: int | None = None,
        progress: bool = True, desc: str = "train", on_eval=None,
        method: str = "lora", on_step=None, lr_ratio: float | None = None,
        checkpoint: Path | None = None) -> FitResult:
    """Train ``model`` in place; restore the parameters with the best selection loss.

    ``on_eval(entry)`` is called after each early-stopping evaluation (search pruning),
    ``on_step(step, loss, lr)`` after each optimizer step (experiment tracking).
    ``method`` picks the optimizer (``train.optimizer_full`` applies to ``full``);
    ``lr_ratio`` (LoRA+) trains LoRA's B matrices at ``lr_ratio * lr``.
    ``checkpoint``: the job's checkpoint file, written every ``train.checkpoint_every``
    optimizer steps and resumed from when it is this job's (None: no checkpoints); the
    caller removes it once the job's results are safe.
    """
    opts = {"group_by_length": group_by_length, "stop_below_train_loss": stop_below_train_loss,
            "pad_to": pad_to, "progress": progress, "desc": desc, "on_eval": on_eval,
            "method": method, "on_step": on_step, "lr_ratio": lr_ratio,
            "checkpoint": checkpoint}
    return _Loop(model, train_enc, early_stop_enc, pad_id, tc, lr, seed, opts).run()


# a peak whose latest measurement is older than this is measured again after a fit
REMEASURE_AFTER_S = 60.0


def _measure_peaks(model, dtype, device, train_enc, tc, res: FitResult,
                   max_age_s: float | None = None) -> float:
    """Set ``res``'s square-GEMM and model-shape peaks in ``dtype``, each the best of every
    measurement in this process (measured when there is none, or the latest is older than
    ``max_age_s`` seconds), with the load they were measured under; return the square one."""
    from loralens.training import flops

    dev = "cuda" if device.type == "cuda" else "cpu"
    square = flops.gemm_peak_info(dtype, dev, max_age_s=max_age_s)
    res.peak_flops_per_s, res.peak_load = square.flops_per_s, square.load
    res.peak_cpus, res.peak_measurements = square.cpus, square.measurements
    cfg = model_config(model)
    if cfg is not None and hasattr(cfg, "intermediate_size"):
        shaped = flops.model_gemm_peak_info(cfg, tokens_per_batch(train_enc, tc.batch_size),
                                            dtype, dev, max_age_s=max_age_s)
        res.peak_model_flops_per_s, res.peak_model_load = shaped.flops_per_s, shaped.load
    return res.peak_flops_per_s


def _plain(obj):
    """JSON for numpy scalars (``json.dumps``'s ``default``)."""
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def steps_per_epoch(n_rows: int, tc: TrainConfig) -> int:
    return math.ceil(math.ceil(n_rows / tc.batch_size) / tc.grad_accum)


def eval_interval(n_rows: int, tc: TrainConfig) -> int:
    """Optimizer steps between early-stopping evaluations: ``train.eval_every``, else
    ``evals_per_epoch`` evenly spread evaluations per epoch (so that patience can act
    within the study's 2-4 epochs; the last step of each epoch is evaluated too)."""
    return tc.eval_every or max(1, math.ceil(steps_per_epoch(n_rows, tc) / tc.evals_per_epoch))


def _cosine_schedule(opt, n_rows: int, tc: TrainConfig):
    """(cosine schedule with linear warm-up, total optimizer steps) for ``n_rows`` rows."""
    from transformers import get_cosine_schedule_with_warmup

    total = steps_per_epoch(n_rows, tc) * tc.epochs
    if tc.max_steps:
        total = min(total, tc.max_steps)
    return get_cosine_schedule_with_warmup(opt, round(tc.warmup_ratio * total), total), total


def rank_zero() -> bool:
    return dist_info()[0] == 0


def dist_info() -> tuple[int, int]:
    """(rank, world size) of a torch.distributed run (accelerate launch, torchrun), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Join the process group that ``accelerate launch`` / torchrun describe in the environment
    (gloo on the CPU, NCCL on GPUs). A no-op in a single process."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import atexit

        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
        atexit.register(_leave_process_group)


def end_together() -> None:
    """Wait until every rank of a data-parallel run has got here (a no-op in one process).

    A job's ranks end together: rank 0 still scores and writes the job's files when the
    others are done, and a rank that exits meanwhile (tearing down its gloo group) made a
    rank abort now and then ("terminate called without an active exception", exit code -6)
    after the results were written. Called on the success path only: a rank that failed
    raises instead, and its peers' collective calls fail with it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _leave_process_group() -> None:
    """Destroy the process group before the interpreter exits: left to gloo's destructors
    at exit, a rank whose peer was still running aborted now and then ("terminate called
    without an active exception", exit code -6), failing a finished run under torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _all_reduce_grads(params: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in params])
    dist.all_reduce(flat)  # SUM: each rank's loss already carries its share of the mean
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _all_reduce_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _accum_rows(batches: list[np.ndarray], i: int, accum: int) -> int:
    """Rows in the accumulation window of micro-batch i (for an exact mean loss)."""
    start = (i // accum) * accum
    return sum(len(b) for b in batches[start:start + accum])


def _early_stop_check(model, enc, pad_id, tc, res: FitResult, best_state, bad, epoch, mp):
    # in the dtype training computes in (selection only; reported scores are float32)
    m = evaluate(model, enc, pad_id, tc.eval_batch_size,
                 precision="bf16" if res.precision == "bf16" else "fp32")
    improved = m["loss"] < res.best_val_loss - 1e-12
    # "val_*": the selection rows (a slice of the training split unless data.selection is
    # validation), never the reported split under the default protocol.
    res.history.append({"eval": len(res.history) + 1, "step": res.steps, "epoch": epoch + 1,
                        "val_loss": m["loss"], "val_accuracy": m["accuracy"],
                        "val_f1": m["f1"], "val_mcc": m["mcc"]})
    if improved:
        res.best_val_loss, res.best_step, bad = m["loss"], res.steps, 0
        best_state = mp.state()
    else:
        bad += 1
    stop = tc.patience > 0 and bad >= tc.patience
    if stop and not res.stopped_early:
        res.stopped_step = res.steps
    res.stopped_early = res.stopped_early or stop
    model.train()
    return best_state, bad, stop


