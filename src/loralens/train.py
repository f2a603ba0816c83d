"""Training: ONE loop for every method.

The method is an adapter configuration: ``lora`` wraps the classifier with a PEFT
LoRA adapter (the head trained and saved with it), ``full`` is "no adapter" and
trains every parameter. Everything else (data order, optimizer, schedule,
clipping, early stopping, evaluation) is the same code path, so the comparison is
controlled.

Reads like a methods section: setup (data, model, method) -> fit (AdamW, cosine
schedule with warm-up, clipping, accumulation, early stopping on the selection rows'
loss, evaluated a few times per epoch, with the best checkpoint restored) -> evaluate
(the whole validation split, once, after everything that selects) -> save.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import data as D
from .config import StudyConfig, TrainConfig
from .models import Base, apply_method, build_classifier, load_base, save_trained
from .store import RunDir, atomic_path, atomic_write_json, read_json
from .tasks import TaskSpec, get_task


# --------------------------------------------------------------------------- setup

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def learning_rate(train: TrainConfig, method: str) -> float:
    if train.lr is not None:
        return train.lr
    return train.lr_lora if method == "lora" else train.lr_full


@dataclass
class Prepared:
    """A task's data, tokenized once and shared by every method and seed.

    ``selection_split`` is what selects (search objective, pruning, early stopping):
    under ``data.selection: train_slice`` a stratified slice held out of the training
    split (``train_split`` is drawn from the rest, so the model never trains on it);
    under ``validation`` (the published protocol) the validation split itself.
    ``val`` is the reported split, scored once per finished model.
    """

    task: TaskSpec
    tokenizer: object
    train_split: D.Split
    val_split: D.Split
    train: D.Encoded
    val: D.Encoded
    early_stop: D.Encoded     # selection rows scored for early stopping
    selection_split: D.Split
    protocol: str = "train_slice"
    selection_info: dict = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def selection_rows(self, n: int | None, seed: int) -> D.Split:
        """The fixed selection rows a search trial is scored on (all when n is None)."""
        return self.selection_split.subset(n, seed)

    def stats(self) -> dict:
        return {"train": self.train_split.stats(), "validation": self.val_split.stats(),
                "early_stop_rows": len(self.early_stop),
                "selection": {**self.selection_info, "early_stop_rows": len(self.early_stop)},
                "mean_tokens": {"train": float(self.train.lengths.mean()),
                                "validation": float(self.val.lengths.mean())}}


def prepare_task(cfg: StudyConfig, task: str, tokenizer) -> Prepared:
    """Load, split and tokenize a task: training rows, selection rows, reported rows."""
    spec, dc = get_task(task), cfg.data
    size = dc.train_size_per_task.get(spec.name, dc.train_size)
    full_train = D.load_split(spec, "train", dc.glue_dir)
    val_split = D.load_split(spec, "validation", dc.glue_dir)
    if dc.selection == "train_slice":
        selection, rest = full_train.carve(dc.selection_fraction, dc.selection_min,
                                           dc.subset_seed)
    else:
        selection, rest = val_split, full_train
    train_split = rest.subset(size, dc.subset_seed)
    val = D.encode_split(tokenizer, val_split, dc.max_length)
    es_split = selection.subset(dc.early_stop_size, dc.subset_seed)
    early = val if es_split is val_split else D.encode_split(tokenizer, es_split, dc.max_length)
    info = {"protocol": dc.selection, "split": "train" if dc.selection == "train_slice"
            else "validation", "seed": dc.subset_seed,
            "fraction": dc.selection_fraction if dc.selection == "train_slice" else None,
            "rows": len(selection), "row_ids": selection.ids(),
            "label_counts": selection.stats()["label_counts"],
            "early_stop_row_ids": es_split.ids(), "train_pool_rows": len(rest),
            "search_eval_rows": (min(cfg.search.eval_size or len(selection), len(selection))
                                 if cfg.search.enabled else None),
            "search_seed": cfg.search.seed,
            "sampler_seeding": f"TPE seed per trial = sha256(task/method/{cfg.search.sampler_seed}"
                               "/trials in the study when asked)"}
    return Prepared(spec, tokenizer, train_split, val_split,
                    D.encode_split(tokenizer, train_split, dc.max_length), val, early,
                    selection, dc.selection, info)


# --------------------------------------------------------------------------- fit / evaluate

def autocast_ctx(device: torch.device, precision: str):
    """bf16 autocast on a CUDA device (``bf16``, or ``auto``); nothing on the CPU, where a
    model that trains in bfloat16 is cast once (``precision.CastOnce``)."""
    from .precision import autocast

    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return autocast(device, torch.bfloat16 if use_bf16 else torch.float32)


@torch.no_grad()
def evaluate(model: nn.Module, enc: D.Encoded, pad_id: int, batch_size: int = 32,
             group_by_length: bool = True, precision: str = "fp32") -> dict:
    """Loss, accuracy, F1 (positive class 1) and per-example logits, in split order."""
    was_training = model.training
    model.eval()
    device = device_of(model)
    logits = np.zeros((len(enc), model_num_labels(model)), dtype=np.float32)
    batches = D.eval_batches(enc.lengths, batch_size, group_by_length)
    for b in D.iter_batches(enc, batches, pad_id):
        with autocast_ctx(device, precision):
            out = model(input_ids=b.input_ids.to(device),
                        attention_mask=b.attention_mask.to(device))
        logits[b.index] = out.logits.float().cpu().numpy()
    model.train(was_training)
    return {**classification_metrics(logits, enc.labels), "logits": logits}


def model_num_labels(model: nn.Module) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.num_labels


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    lt = torch.as_tensor(logits, dtype=torch.float64)
    loss = float(nn.functional.cross_entropy(lt, torch.as_tensor(labels)).item())
    pred = logits.argmax(axis=1)
    return {"loss": loss, "accuracy": float((pred == labels).mean()),
            "f1": f1_binary(pred, labels), "n": int(len(labels))}


def f1_binary(pred: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    tp = int(((pred == positive) & (labels == positive)).sum())
    fp = int(((pred == positive) & (labels != positive)).sum())
    fn = int(((pred != positive) & (labels == positive)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def majority_baseline(train_labels: np.ndarray, val_labels: np.ndarray, num_labels: int) -> dict:
    """Predict the most frequent training label for every validation example."""
    majority = int(np.bincount(train_labels, minlength=num_labels).argmax())
    pred = np.full_like(val_labels, majority)
    return {"label": majority, "accuracy": float((pred == val_labels).mean()),
            "f1": f1_binary(pred, val_labels)}


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
    mfu: float = math.nan
    mfu_model_shapes: float = math.nan

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def fit(model: nn.Module, train_enc: D.Encoded, early_stop_enc: D.Encoded | None, pad_id: int,
        tc: TrainConfig, lr: float, seed: int, *, group_by_length: bool = True,
        stop_below_train_loss: float | None = None, pad_to: int | None = None,
        progress: bool = True, desc: str = "train", on_eval=None,
        method: str = "lora") -> FitResult:
    """Train ``model`` in place; restore the parameters with the best selection loss.

    ``on_eval(entry)`` is called after each early-stopping evaluation (search pruning).
    ``method`` picks the optimizer (``train.optimizer_full`` applies to ``full``).
    """
    from . import flops
    from . import precision as P
    from .devices import make_optimizer, param_groups

    device = device_of(model)
    res = FitResult()
    dtype, res.precision_note = P.choose(tc.precision, device, model_config(model),
                                         _tokens_per_batch(train_enc, tc.batch_size))
    res.precision = P.dtype_label(dtype)
    res.flops_per_token = flops.train_flops_per_token(model, method)
    peak = _measure_peaks(model, dtype, device, train_enc, tc, res)
    # bfloat16 on the CPU: cast once (P.CastOnce); on a GPU: autocast (P.autocast)
    mp = P.CastOnce(model, dtype if device.type == "cpu" else torch.float32)
    params = mp.params
    step_model = model
    if tc.compile:
        step_model, res.compiled = torch.compile(model, dynamic=True), True
    opt, note = make_optimizer(param_groups(params, tc.weight_decay), lr, method,
                               tc.optimizer_full, device)
    if note and rank_zero():
        print(f"{desc}: {note}", flush=True)
    sched, total = _cosine_schedule(opt, len(train_enc), tc)
    use_ckpt = tc.gradient_checkpointing == "on" or (
        tc.gradient_checkpointing == "auto" and device.type == "cuda")
    if use_ckpt:
        _enable_checkpointing(model)

    rank, world = dist_info()
    best_state, bad = None, 0
    res.eval_every = eval_interval(len(train_enc), tc)
    bar = tqdm(total=total, desc=desc, disable=not progress or rank > 0, unit="step",
               dynamic_ncols=True)
    t0 = time.perf_counter()
    model.train()
    stop = False
    for epoch in range(tc.epochs):
        batches = D.train_batches(train_enc.lengths, tc.batch_size, seed * 1000 + epoch,
                                  group_by_length)
        # Data parallel: every rank takes its share of each global batch.
        local = [b[rank::world] for b in batches] if world > 1 else batches
        epoch_loss, epoch_n, step_in_epoch = 0.0, 0, 0
        for i, idx in enumerate(local):
            if len(idx):
                # weight = rows / rows of the accumulation window (all ranks): exact mean
                weight = len(idx) / _accum_rows(batches, i, tc.grad_accum)
                t_step = time.perf_counter()
                epoch_loss += _backward(step_model, train_enc, idx, pad_id, pad_to, dtype,
                                        weight, res) * len(idx)
                res.step_seconds += time.perf_counter() - t_step
                epoch_n += len(idx)
            if (i + 1) % tc.grad_accum and i + 1 != len(batches):
                continue
            t_step = time.perf_counter()
            mp.grads_to_masters()
            if world > 1:
                _all_reduce_grads(params)
            if tc.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            opt.step()
            mp.masters_to_model()
            sched.step()
            opt.zero_grad(set_to_none=True)
            res.step_seconds += time.perf_counter() - t_step
            res.steps += 1
            achieved = res.flops_per_token * res.real_tokens / max(res.step_seconds, 1e-9)
            bar.set_postfix(loss=f"{epoch_loss / max(epoch_n, 1):.4f}",
                            tok_s=f"{res.real_tokens * world / max(res.step_seconds, 1e-9):.0f}",
                            mfu=f"{100 * achieved / peak:.0f}%")
            bar.update(1)
            step_in_epoch += 1
            last = i + 1 == len(batches) or bool(tc.max_steps and res.steps >= tc.max_steps)
            if early_stop_enc is not None and (step_in_epoch % res.eval_every == 0 or last):
                t_eval = time.perf_counter()
                best_state, bad, stop = _early_stop_check(model, early_stop_enc, pad_id, tc, res,
                                                          best_state, bad, epoch, mp)
                res.eval_seconds += time.perf_counter() - t_eval
                on_eval and on_eval(res.history[-1])
            if stop or (tc.max_steps and res.steps >= tc.max_steps):
                stop = True
                break
        if world > 1:
            epoch_loss, epoch_n = _all_reduce_sum([epoch_loss, float(epoch_n)])
        res.final_train_loss = epoch_loss / max(epoch_n, 1)
        res.epochs = epoch + 1
        if stop_below_train_loss is not None and res.final_train_loss < stop_below_train_loss:
            break
        if res.history:
            res.history[-1].setdefault("train_loss", res.final_train_loss)
        if stop:
            break
    bar.close()
    res.train_seconds = time.perf_counter() - t0
    if best_state is not None:
        mp.restore(best_state)
    mp.finish()  # float32 again: reported scores, extraction and saving read float32
    res.train_flops = float(res.flops_per_token * res.real_tokens)
    if res.step_seconds > 0:
        res.achieved_flops_per_s = res.train_flops / res.step_seconds
        res.mfu = flops.mfu(res.achieved_flops_per_s, res.peak_flops_per_s)
        res.mfu_model_shapes = flops.mfu(res.achieved_flops_per_s, res.peak_model_flops_per_s)
    model.eval()
    return res


def model_config(model: nn.Module):
    """The backbone's transformers config (of a classifier, PEFT-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "config", None)


def _tokens_per_batch(enc: D.Encoded, batch_size: int) -> int:
    return int(max(1, round(float(np.mean(enc.lengths)) * batch_size))) if len(enc) else 64


def _measure_peaks(model, dtype, device, train_enc, tc, res: FitResult) -> float:
    """Measure (once per process) the square-GEMM and model-shape peaks in ``dtype``."""
    from . import flops

    dev = "cuda" if device.type == "cuda" else "cpu"
    res.peak_flops_per_s = flops.gemm_peak(dtype, dev)
    cfg = model_config(model)
    if cfg is not None and hasattr(cfg, "intermediate_size"):
        res.peak_model_flops_per_s = flops.model_gemm_peak(
            cfg, _tokens_per_batch(train_enc, tc.batch_size), dtype, dev)
    return res.peak_flops_per_s


def _backward(model: nn.Module, enc: D.Encoded, idx: np.ndarray, pad_id: int,
              pad_to: int | None, dtype: torch.dtype, weight: float, res: FitResult) -> float:
    """Forward and backward of one micro-batch (loss scaled by ``weight``); counts its
    tokens into ``res``; returns the batch's mean loss."""
    from .precision import autocast

    device = device_of(model)
    b = next(D.iter_batches(enc, [idx], pad_id, pad_to))
    with autocast(device, dtype):
        out = model(input_ids=b.input_ids.to(device),
                    attention_mask=b.attention_mask.to(device), labels=b.labels.to(device))
    (out.loss * weight).backward()
    res.real_tokens += b.real_tokens
    res.padded_tokens += b.attention_mask.numel()
    return float(out.loss.detach())


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
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


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
                        "val_f1": m["f1"]})
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


def _enable_checkpointing(model: nn.Module) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


# --------------------------------------------------------------------------- one job

def count_parameters(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def with_overrides(cfg: StudyConfig, overrides: dict | None) -> StudyConfig:
    """``cfg`` with nested overrides (e.g. a search's best {"train": {...}, "lora": {...}})."""
    from .config import StudyConfig as _S, merge

    return merge(_S, cfg, overrides) if overrides else cfg


def train_model(cfg: StudyConfig, prepared: Prepared, method: str, seed: int, base: Base,
                progress: bool = True, desc: str | None = None, on_eval=None):
    """Build, train and return (model, FitResult) for one method and seed."""
    tc = cfg.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(seed)
    model = apply_method(build_classifier(base.backbone(), prepared.task.num_labels, seed),
                         method, cfg).to(device)
    fitres = fit(model, prepared.train, prepared.early_stop, prepared.pad_id, tc,
                 learning_rate(tc, method), seed, group_by_length=cfg.data.group_by_length,
                 progress=progress, desc=desc or f"{prepared.task.name}/{method}/seed{seed}",
                 on_eval=on_eval, method=method)
    return model, fitres


def train_job(cfg: StudyConfig, run: RunDir, task: str, method: str, seed: int, *,
              prepared: Prepared | None = None, base: Base | None = None,
              overwrite: bool = False, overrides: dict | None = None,
              progress: bool = True) -> dict:
    """Train and evaluate one (task, method, seed) and write its job directory.

    A finished job (metrics.json present) is returned as it is unless ``overwrite``.
    ``overrides`` replaces hyperparameters (e.g. a search's best), as nested keys.
    Kill-safe: an overwritten job first loses its metrics.json (it is then unfinished),
    weights and logits are written atomically, and metrics.json comes last.
    """
    metrics_path = run.metrics_path(task, method, seed)
    if metrics_path.is_file() and not overwrite:
        return {**read_json(metrics_path), "skipped": True}
    base = base or load_base(cfg)
    prepared = prepared or prepare_task(cfg, task, base.tokenizer)
    jcfg = with_overrides(cfg, overrides)
    model, fitres = train_model(jcfg, prepared, method, seed, base, progress)
    tc = jcfg.train
    val = evaluate(model, prepared.val, prepared.pad_id, tc.eval_batch_size)  # float32
    logits = val.pop("logits")
    rank, world = dist_info()
    if rank > 0:  # data parallel: rank 0 writes the job's files
        return {"task": task, "method": method, "seed": seed, "validation": val, "rank": rank}
    metrics_path.unlink(missing_ok=True)
    save_trained(model, method, run.weights_dir(task, method, seed))
    with atomic_path(run.val_logits_path(task, method, seed), suffix=".npy") as tmp:
        np.save(tmp, logits)
    metrics = {
        "task": task, "method": method, "seed": seed, "model": base.name,
        "model_note": base.note,
        "validation": val,
        "selection_metric": prepared.task.metric,
        "score": val[prepared.task.metric],
        "majority_baseline": majority_baseline(prepared.train.labels, prepared.val.labels,
                                               prepared.task.num_labels),
        "hyperparameters": {**tc.__dict__, "lr": learning_rate(tc, method),
                            **({"lora": jcfg.lora.__dict__} if method == "lora" else {})},
        "overrides": overrides or {},
        "parameters": count_parameters(model),
        "fit": fitres.to_dict(),
        "data": prepared.stats(),
        "device": str(device_of(model)),
        "data_parallel_processes": world,
    }
    atomic_write_json(metrics_path, metrics)
    return metrics


def summary_line(m: dict) -> str:
    v = m["validation"]
    base = m["majority_baseline"]
    return (f"{m['task']}/{m['method']}/seed{m['seed']}: accuracy {v['accuracy']:.4f} "
            f"f1 {v['f1']:.4f} on {v['n']} validation rows (majority {base['accuracy']:.4f}), "
            f"{m['fit']['steps']} steps in {m['fit']['train_seconds']:.0f} s"
            + (" [already done, skipped]" if m.get("skipped") else ""))
