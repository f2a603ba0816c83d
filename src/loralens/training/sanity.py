"""The study's sanity check: every task and method can overfit a handful of rows.

A pipeline that cannot drive the training loss of 10 examples below 0.1 within
10 epochs has a bug (labels misaligned, head reading the wrong token, frozen
parameters); the check runs the same training loop as production.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from loralens.training import batches as B
from loralens.core.config import StudyConfig
from loralens.training.devices import training_device
from loralens.models.methods import get_method
from loralens.models.classifier import Base, apply_method, build_classifier
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json, read_json
from loralens.training.loop import fit
from loralens.training.job import seed_everything

log = logging.getLogger(__name__)


def sanity_rows(train: B.Encoded, examples: int, seed: int = 42) -> B.Encoded:
    """The rows the check overfits: the same fixed rows for every method, a class-balanced
    draw of ``examples`` training rows when possible."""
    labels = train.labels
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    take = np.sort(np.concatenate([c[: examples // len(per_class) + 1] for c in per_class])
                   [: examples])
    return B.Encoded([train.input_ids[i] for i in take], labels[take], train.ids[take])


def sanity_pair(cfg: StudyConfig, task: str, method: str, prepared, base: Base,
                seed: int = 42, progress: bool = True) -> dict:
    sc = cfg.sanity
    tiny = sanity_rows(prepared.train, sc.examples, seed)
    tc = replace(cfg.train, epochs=sc.epochs, batch_size=sc.batch_size, grad_accum=1,
                 warmup_ratio=0.0, weight_decay=0.0, max_steps=0, patience=0, eval_every=0)
    meth = get_method(method, cfg)
    kind = meth.optimizer_kind
    lr = sc.lr_full if meth.trains_all else sc.lr_lora
    # The training device, as train_model chooses it: the check runs the production loop
    # where production runs (bf16 autocast and checkpointing on a GPU, by train.*).
    device = training_device()
    seed_everything(seed)
    model = apply_method(build_classifier(base.backbone(), prepared.task.num_labels, seed),
                         method, cfg).to(device)
    res = fit(model, tiny, None, prepared.pad_id, tc, lr, seed, progress=progress,
              stop_below_train_loss=sc.loss_threshold, desc=f"sanity {task}/{method}",
              method=kind, lr_ratio=meth.lr_ratio)
    passed = res.final_train_loss < sc.loss_threshold
    return {"task": task, "method": method, "examples": int(len(tiny)),
            "epochs_run": res.epochs,
            "steps": res.steps, "final_train_loss": res.final_train_loss,
            "threshold": sc.loss_threshold, "lr": lr, "device": str(device),
            "passed": bool(passed)}


def sanity_job(cfg: StudyConfig, run: RunDir, task: str, method: str, base: Base, prepared,
               progress: bool = True) -> dict:
    """One (task, method) check, stored on its own; a stored result is reused."""
    path = run.sanity_path(task, method)
    if path.is_file():
        return read_json(path)
    r = sanity_pair(cfg, task, method, prepared, base, progress=progress)
    r["model"] = base.name
    atomic_write_json(path, r)
    log.info(f"sanity {task}/{method}: {'PASS' if r['passed'] else 'FAIL'} "
             f"(training loss {r['final_train_loss']:.4f} after {r['epochs_run']} epochs, "
             f"threshold {r['threshold']})")
    return r


def collect_sanity(run: RunDir, tasks: list[str], methods: list[str]) -> list[dict]:
    """Gather the stored per-pair results into sanity.json (missing pairs are listed)."""
    results, missing = [], []
    for t in tasks:
        for m in methods:
            p = run.sanity_path(t, m)
            (results.append(read_json(p)) if p.is_file() else missing.append(f"{t}/{m}"))
    atomic_write_json(run.sanity_summary_path, {"results": results, "missing": missing})
    return results
