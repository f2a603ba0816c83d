"""Training jobs: ONE loop (``loop.fit``) for every method.

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

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from loralens.tasks import rows as D
from loralens.tasks import sources as TS
from loralens.training import batches as B
from loralens.training import checkpoint as C
from loralens.core.config import StudyConfig, TrainConfig
from loralens.training.loop import device_of, dist_info, end_together, evaluate, fit
from loralens.training.metrics import scores
from loralens.models.methods import get_method, job_record, kind_trains_all
from loralens.models.classifier import Base, apply_method, build_classifier, load_base
from loralens.models.saving import save_trained
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_path, atomic_write_json, read_json
from loralens.tasks.spec import TaskSpec
from loralens.tasks.registry import get_task
from loralens.training.tracking import open_job


# --------------------------------------------------------------------------- setup

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def learning_rate(train: TrainConfig, method: str, kind: str | None = None) -> float:
    """``train.lr``, else the method's default: ``lr_full`` for full fine-tuning, ``lr_lora``
    for adapter and head methods (``kind``: :attr:`loralens.models.methods.Method.optimizer_kind`,
    ``method`` itself when omitted)."""
    if train.lr is not None:
        return train.lr
    return train.lr_full if kind_trains_all(kind or method) else train.lr_lora


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
    train: B.Encoded
    val: B.Encoded
    early_stop: B.Encoded     # selection rows scored for early stopping
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
    full_train = TS.load_split(spec, "train", dc.glue_dir)
    val_split = TS.load_split(spec, "validation", dc.glue_dir)
    if dc.selection == "train_slice":
        selection, rest = full_train.carve(dc.selection_fraction, dc.selection_min,
                                           dc.subset_seed)
    else:
        selection, rest = val_split, full_train
    train_split = rest.subset(size, dc.subset_seed)
    val = B.encode_split(tokenizer, val_split, dc.max_length)
    es_split = selection.subset(dc.early_stop_size, dc.subset_seed)
    early = val if es_split is val_split else B.encode_split(tokenizer, es_split, dc.max_length)
    info = {"protocol": dc.selection, "split": "train" if dc.selection == "train_slice"
            else "validation", "seed": dc.subset_seed,
            "fraction": dc.selection_fraction if dc.selection == "train_slice" else None,
            "rows": len(selection), "row_ids": selection.ids(),
            "label_counts": selection.stats()["label_counts"],
            "early_stop_row_ids": es_split.ids(), "train_pool_rows": len(rest),
            "search_eval_rows": (min(cfg.search.eval_size or len(selection), len(selection))
                                 if cfg.search.enabled else None),
            "search_seed": cfg.search.seed,
            "sampler_seeding": f"TPE seed per trial and parameter = sha256(task/method/"
                               f"{cfg.search.sampler_seed}/trials in the study when asked"
                               "/parameter)"}
    return Prepared(spec, tokenizer, train_split, val_split,
                    B.encode_split(tokenizer, train_split, dc.max_length), val, early,
                    selection, dc.selection, info)

def majority_baseline(train_labels: np.ndarray, val_labels: np.ndarray, num_labels: int) -> dict:
    """Predict the most frequent training label for every validation example."""
    majority = int(np.bincount(train_labels, minlength=num_labels).argmax())
    pred = np.full_like(val_labels, majority)
    return {"label": majority, **scores(pred, val_labels, num_labels)}


# --------------------------------------------------------------------------- one job

def count_parameters(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def with_overrides(cfg: StudyConfig, overrides: dict | None) -> StudyConfig:
    """``cfg`` with nested overrides (e.g. a search's best, by section: train, lora)."""
    from loralens.core.config import StudyConfig as _S, merge

    return merge(_S, cfg, overrides) if overrides else cfg


def train_model(cfg: StudyConfig, prepared: Prepared, method: str, seed: int, base: Base,
                progress: bool = True, desc: str | None = None, on_eval=None, on_step=None,
                checkpoint=None):
    """Build, train and return (model, FitResult) for one method and seed (``checkpoint``:
    the job's checkpoint file, ``loop.fit``'s, resumed from where it is this job's)."""
    tc = cfg.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(seed)
    meth = get_method(method, cfg)
    kind = meth.optimizer_kind
    model = apply_method(build_classifier(base.backbone(), prepared.task.num_labels, seed),
                         method, cfg).to(device)
    fitres = fit(model, prepared.train, prepared.early_stop, prepared.pad_id, tc,
                 learning_rate(tc, method, kind), seed, group_by_length=cfg.data.group_by_length,
                 progress=progress, desc=desc or f"{prepared.task.name}/{method}/seed{seed}",
                 on_eval=on_eval, method=kind, on_step=on_step, lr_ratio=meth.lr_ratio,
                 checkpoint=checkpoint)
    return model, fitres


def train_job(cfg: StudyConfig, run: RunDir, task: str, method: str, seed: int, *,
              prepared: Prepared | None = None, base: Base | None = None,
              overwrite: bool = False, overrides: dict | None = None,
              progress: bool = True) -> dict:
    """Train and evaluate one (task, method, seed) and write its job directory.

    A finished job (metrics.json present) is returned as it is unless ``overwrite``.
    ``overrides`` replaces hyperparameters (e.g. a search's best), as nested keys.
    Kill-safe: an overwritten job first loses its metrics.json (it is then unfinished),
    weights and logits are written atomically, and metrics.json comes last. Resumable: the
    fit checkpoints every ``train.checkpoint_every`` optimizer steps
    (:meth:`RunDir.checkpoint_path`), a restarted job continues from its last checkpoint,
    and the checkpoint is removed once metrics.json is written.
    """
    metrics_path = run.metrics_path(task, method, seed)
    ckpt = run.checkpoint_path(task, method, seed)
    if metrics_path.is_file() and not overwrite:
        C.remove(ckpt)  # a finished job's: left by a killed --overwrite of it
        return {**read_json(metrics_path), "skipped": True}
    base = base or load_base(cfg)
    prepared = prepared or prepare_task(cfg, task, base.tokenizer)
    jcfg = with_overrides(cfg, overrides)
    tracker = open_job(cfg, run.root, task, method, seed) if dist_info()[0] == 0 else None
    try:
        model, fitres = train_model(jcfg, prepared, method, seed, base, progress,
                                    on_eval=tracker and tracker.on_eval,
                                    on_step=tracker and tracker.on_step, checkpoint=ckpt)
        metrics = _finish_job(jcfg, run, task, method, seed, prepared, base, model, fitres,
                              overrides)
        if dist_info()[0] == 0:
            C.remove(ckpt)  # metrics.json is written: the job is finished
        end_together()  # data parallel: no rank leaves while rank 0 still writes
    except BaseException:
        tracker and tracker.close(ok=False)
        raise
    if tracker:
        tracker.params({"hyperparameters": metrics["hyperparameters"], "task": task,
                        "method": method, "seed": seed, "model": base.name})
        tracker.finish(metrics)
        tracker.close()
    return metrics


def _finish_job(jcfg, run, task, method, seed, prepared, base, model, fitres, overrides):
    """Score the trained model on the reported split once; write weights, logits and
    metrics.json (last)."""
    cfg, tc = jcfg, jcfg.train
    metrics_path = run.metrics_path(task, method, seed)
    val = evaluate(model, prepared.val, prepared.pad_id, tc.eval_batch_size)  # float32
    logits = val.pop("logits")
    rank, world = dist_info()
    if rank > 0:  # data parallel: rank 0 writes the job's files
        return {"task": task, "method": method, "seed": seed, "validation": val, "rank": rank}
    metrics_path.unlink(missing_ok=True)
    meth = get_method(method, jcfg)
    save_trained(model, method, run.weights_dir(task, method, seed, adapter=meth.is_adapter),
                 base.tokenizer,
                 prepared.task.label_names,
                 card={"task": task, "base": base.name, "base_note": base.note, "seed": seed,
                       "base_revision": cfg.model.revision, **prepared.task.card_dataset(),
                       "scores": {m: val[m] for m in prepared.task.metrics},
                       "score_split": "validation", "max_length": cfg.data.max_length})
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
        "hyperparameters": {**tc.__dict__, "lr": learning_rate(tc, method, meth.optimizer_kind),
                            **job_record(meth, jcfg)},
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
