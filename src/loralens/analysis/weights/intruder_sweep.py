"""The causal test: remove LoRA's intruder dimensions, and see what happens to drift.

For each LoRA model (``weights.sweep_seeds`` seeds per task), PEFT's own mitigation
``reduce_intruder_dimension`` (peft/tuners/lora/intruders.py; Shuttleworth et al., 2024,
arXiv:2410.21228, their Figure 8) rescales the top-``k`` singular directions of each merged
matrix ``W0 + dW`` whose largest |cosine| with the base's left singular vectors is below
``weights.sweep_epsilon`` by ``lambda`` (1 = unchanged, 0 = removed), and refactors the
result as a rank-r adapter. For every ``lambda`` in ``weights.sweep_lambdas`` the model is
re-measured, in float32:

- the task's validation score (its metric, and accuracy), on the whole validation split or
  ``weights.sweep_eval_examples`` rows of it (a fixed subset);
- activation drift: 1 - debiased linear CKA against the base model, per hidden state, on
  the extract stage's rows (the base's pooled states are read from ``extract/<task>/``),
  averaged over the states of ``drift.layers`` as the drift stage does;
- forgetting (:mod:`.forgetting`, the weights stage's text sample);
- the weights stage's own intruder count (epsilon 0.5, the compared matrices) of the result,
  beside the count PEFT detected: an independent check of what the mitigation removed.

Two PEFT 0.21.2 pitfalls are fixed here: the function leaves the model in train mode (LoRA
dropout active), and the new adapter's ``modules_to_save`` copy of the classification head
starts from the untrained head; the trained head is copied in (with both fixes lambda = 1
gives the original logits up to float rounding; a test checks it).

Layout: ``RUN_DIR/weightspace/sweep/<task>-lora-seed<seed>.json`` (one model, one entry per
lambda, written after each: resumable), ``weightspace/sweep.csv`` and ``sweep.json``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Sequence

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from loralens.tasks import sources as TS
from loralens.training import batches as B
from loralens.analysis.drift.measures import drift_states
from loralens.analysis.extract import (
    BASE_KEY, SPLIT, job_fingerprint, load_pooled, pooled_hidden_states, sample_split,
)
from loralens.training.loop import evaluate
from loralens.models.methods import STUDY_LORA, is_study_lora
from loralens.models.saving import load_trained
from loralens.analysis.similarity import cka_against_base
from loralens.core.errors import RunDirError
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json, read_json, write_csv
from loralens.tasks.registry import get_task

log = logging.getLogger(__name__)

FORMAT = "loralens-sweep-1"
REDUCED = "intruder_reduced"
LOG_RE = re.compile(r"^(.+): (?:Intruders: (\d+)|No intruders)$")


# --------------------------------------------------------------------------- PEFT, fixed

def reduce_intruders(model: nn.Module, lam: float, top_k: int = 10,
                     epsilon: float = 0.5) -> dict[str, int]:
    """Apply PEFT's ``reduce_intruder_dimension`` to a LoRA ``PeftModel`` in place (the new
    adapter ``intruder_reduced`` becomes the active one), with the trained head copied into
    the new adapter and the model put in eval mode; returns PEFT's per-module counts."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from peft.utils.other import ModulesToSaveWrapper

    lines: list[str] = []
    reduce_intruder_dimension(model, old_adapter_name="default", new_adapter_name=REDUCED,
                              top_k=top_k, threshold_epsilon=epsilon, mitigation_lambda=lam,
                              logging_sink=lambda *a: lines.append(" ".join(map(str, a))))
    for mod in model.modules():
        if isinstance(mod, ModulesToSaveWrapper) and REDUCED in mod.modules_to_save:
            mod.modules_to_save[REDUCED].load_state_dict(
                mod.modules_to_save["default"].state_dict())
    model.eval()
    counts = {}
    for ln in lines:
        m = LOG_RE.match(ln)
        if m:
            counts[m.group(1)] = int(m.group(2) or 0)
    return counts


# --------------------------------------------------------------------------- per task

def settings(cfg) -> dict:
    wc = cfg.weights
    return {"format": FORMAT, "epsilon": wc.sweep_epsilon, "top_k": wc.top_k,
            "eval_examples": wc.sweep_eval_examples, "drift_layers": cfg.drift.layers,
            "forgetting": wc.forgetting, "max_length": cfg.data.max_length}


class TaskData:
    """A task's scored rows, the extract stage's rows and the base's pooled states on them."""

    def __init__(self, cfg, run: RunDir, base, task: str):
        spec = get_task(task)
        split = TS.load_split(spec, SPLIT, cfg.data.glue_dir)
        n = cfg.weights.sweep_eval_examples
        self.eval_enc = B.encode_split(base.tokenizer, split.subset(n, 0) if n else split,
                                       cfg.data.max_length)
        path = run.extract_manifest(task)
        if not path.is_file():
            raise RunDirError(f"{path} not found: the sweep measures drift on the extract "
                              "stage's rows; run `loralens extract` first")
        manifest = read_json(path)
        entry = manifest["models"].get(BASE_KEY)
        if entry is None:
            raise RunDirError(f"{path}: no base model entry; rerun `loralens extract`")
        self.base_states, ids, _ = load_pooled(run.extract_dir(task) / entry["file"])
        sample = sample_split(split, manifest["requested"], manifest["seed"])
        self.extract_enc = B.encode_split(base.tokenizer, sample, manifest["max_length"])
        if not np.array_equal(self.extract_enc.ids, ids):
            raise RunDirError(f"{path}: its rows could not be drawn again from the split")
        self.states = drift_states(cfg.drift.layers, self.base_states.shape[1])
        self.metric = spec.metric


def drift_of(base_states: np.ndarray, states: np.ndarray, selected: Sequence[int]) -> dict:
    """1 - debiased linear CKA per hidden state, and its mean over ``selected`` states."""
    per = 1.0 - np.asarray(cka_against_base(base_states, {"m": states}, debiased=True)[0],
                           dtype=np.float64)
    return {"per_state": [float(x) for x in per],
            "mean": float(np.mean(per[list(selected)]))}


def measure(an, cfg, td: TaskData, model: nn.Module, task: str) -> dict:
    """Score, drift, forgetting and the remaining intruder count of a (reduced) model."""
    from loralens.analysis.weights.analyzer import SUMMARY_EPSILON, backbone_of

    pad = an.base.tokenizer.pad_token_id
    ev = evaluate(model, td.eval_enc, pad, cfg.train.eval_batch_size)
    hidden = pooled_hidden_states(model, td.extract_enc, pad, cfg.extract.batch_size)
    out = {"metric": td.metric, "score": ev[td.metric], "accuracy": ev["accuracy"],
           "n_eval": ev["n"], "n_drift": len(td.extract_enc),
           "drift": drift_of(td.base_states, hidden, td.states)}
    backbone = backbone_of(model).eval()  # merges the active (reduced) adapter
    rows = an.analyze(backbone, STUDY_LORA)
    out["intruders_after"] = int(sum(r["intruders"][str(SUMMARY_EPSILON)] for r in rows))
    if cfg.weights.forgetting:
        out["forgetting"] = an.forgetting(backbone, task)["forgetting"]
    return out


def sweep_model(an, run: RunDir, td: TaskData, task: str, seed: int,
                progress: bool = False) -> dict:
    """Every lambda of one LoRA model not measured yet; the file is rewritten after each."""
    cfg = an.cfg
    wc = cfg.weights
    path = run.weightspace_sweep_path(task, seed)
    job_dir = run.job_dir(task, STUDY_LORA, seed)
    head = {"task": task, "seed": seed, "metrics_sha256": job_fingerprint(job_dir),
            "settings": settings(cfg)}
    old = read_json(path) if path.is_file() else {}
    res = {**head, "lambdas": old.get("lambdas", {}) if all(
        old.get(k) == v for k, v in head.items()) else {}}
    todo = [lam for lam in wc.sweep_lambdas if f"{lam:g}" not in res["lambdas"]]
    for lam in tqdm(todo, desc=f"sweep {task}/lora-seed{seed}", disable=not progress,
                    leave=False):
        t0 = time.perf_counter()
        model = load_trained(job_dir, an.base.backbone(), get_task(task).num_labels)
        counts = reduce_intruders(model, lam, wc.top_k, wc.sweep_epsilon)
        r = {"lambda": lam, "peft_intruders": int(sum(counts.values())),
             "peft_modules_changed": int(sum(1 for c in counts.values() if c))}
        same = next((k for k, e in res["lambdas"].items() if e["peft_intruders"] == 0), None)
        if r["peft_intruders"] == 0 and same is not None:
            # nothing detected (detection does not depend on lambda): PEFT copied the adapter
            # unchanged, so the model is the one already measured, bit for bit
            r.update({k: v for k, v in res["lambdas"][same].items()
                      if k not in ("lambda", "seconds", "same_as")}, same_as=same)
        else:
            r.update(measure(an, cfg, td, model, task))
        r["seconds"] = time.perf_counter() - t0
        res["lambdas"][f"{lam:g}"] = r
        atomic_write_json(path, res)
    return res


def is_done(run: RunDir, cfg, task: str, seed: int) -> bool:
    path = run.weightspace_sweep_path(task, seed)
    if not path.is_file():
        return False
    old = read_json(path)
    return (old.get("metrics_sha256") == job_fingerprint(run.job_dir(task, STUDY_LORA, seed))
            and old.get("settings") == json.loads(json.dumps(settings(cfg)))
            and all(f"{lam:g}" in old.get("lambdas", {}) for lam in cfg.weights.sweep_lambdas))


# --------------------------------------------------------------------------- outputs

def sweep_rows(results: Sequence[dict], lambdas: Sequence[float]) -> list[dict]:
    rows = []
    for r in results:
        for lam in lambdas:
            e = r["lambdas"].get(f"{lam:g}")
            if e:
                rows.append({"task": r["task"], "seed": r["seed"], "lambda": lam,
                             "metric": e["metric"], "score": e["score"],
                             "accuracy": e["accuracy"], "n_eval": e["n_eval"],
                             "drift": e["drift"]["mean"], "forgetting": e.get("forgetting"),
                             "peft_intruders": e["peft_intruders"],
                             "peft_modules_changed": e["peft_modules_changed"],
                             "intruders_after": e["intruders_after"], "n_drift": e["n_drift"]})
    return rows


def write_outputs(run: RunDir, cfg, results: Sequence[dict]) -> list[dict]:
    rows = sweep_rows(results, cfg.weights.sweep_lambdas)
    write_csv(run.weightspace_sweep_csv, rows)
    atomic_write_json(run.weightspace_sweep_json, {
        "settings": settings(cfg), "lambdas": list(cfg.weights.sweep_lambdas), "rows": rows,
        "per_state": [{"task": r["task"], "seed": r["seed"], "lambda": e["lambda"],
                       "drift": e["drift"]["per_state"]}
                      for r in results for e in r["lambdas"].values()]})
    return rows


def sweep_seeds(cfg) -> list[int]:
    n = cfg.weights.sweep_seeds
    return list(cfg.seeds) if n == 0 else list(cfg.seeds)[:n]


def sweep_keys(ctx) -> list[tuple[str, int]]:
    """(task, seed) of the study's LoRA models the sweep takes: finished, of the selected
    tasks, of the first ``weights.sweep_seeds`` seeds (its jobs in the stage table)."""
    wanted = set(sweep_seeds(ctx.cfg))
    return [(t, s) for t, m, s in ctx.run.finished_jobs()
            if is_study_lora(m) and t in ctx.tasks and s in wanted]


def run_sweep(ctx, an_factory) -> list[dict]:
    """The sweep through the job queue (``an_factory()``: the weights stage's Analyzer)."""
    cfg, run = ctx.cfg, ctx.run
    keys = sweep_keys(ctx)
    tasks: dict = {}

    def one(p):
        an = an_factory()
        if p["task"] not in tasks:
            tasks[p["task"]] = TaskData(cfg, run, an.base, p["task"])
        res = sweep_model(an, run, tasks[p["task"]], p["task"], p["seed"], ctx.progress)
        for lam in cfg.weights.sweep_lambdas:
            e = res["lambdas"][f"{lam:g}"]
            log.info(f"sweep {p['task']}/lora-seed{p['seed']} lambda {lam:g}: PEFT intruders "
                     f"{e['peft_intruders']}, left (eps 0.5) {e['intruders_after']}, "
                     f"{e['metric']} {e['score']:.4f}, drift {e['drift']['mean']:.4g}"
                     + (f", forgetting {e['forgetting']:+.4f}" if "forgetting" in e else ""))

    ctx.run_queue("weights-sweep", one)  # jobs: sweep_keys; done: is_done (the stage table)
    results = [read_json(run.weightspace_sweep_path(t, s)) for t, s in keys
               if run.weightspace_sweep_path(t, s).is_file()]
    return write_outputs(run, cfg, results)
