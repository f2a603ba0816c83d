"""The weights stage's analysis: intruder dimensions, the change's spectrum and forgetting, per
model (the stage that runs it over a study's models is :mod:`.stage`).

For every finished (task, method, seed), the trained classifier is loaded through
:func:`models.load_trained` (a LoRA adapter merged into its base weights first) and
each analysed matrix is compared with the base model's (:mod:`.weight_measures`,
float64; the base's SVDs are computed once per process and reused by every model):

- ``weights.matrices`` (default: ``lora.target_modules``, q_proj and v_proj) in every
  layer, for both methods: the like-for-like comparison;
- for full fine-tuning (a method that trains every parameter, ``Method.trains_all``),
  which changes every linear layer, also ``weights.full_extra``
  (k/o projections and the MLP) in ``weights.extra_layers`` evenly spaced layers: a
  cheap subset, marked ``group = extra`` and never mixed into the comparison.

Forgetting (:mod:`.forgetting`) is measured on the same loaded model.

Layout::

    RUN_DIR/weightspace/
      models/<task>-<method>-seed<seed>.json   one model: every matrix, forgetting
      layers.csv, layers.json                  one row per model and matrix
      forgetting.csv, forgetting.json          one row per model
      summary.json                             per task and measure: LoRA vs full, paired
      methods.json                             a study of more methods: each vs the reference
                                               (:func:`method_summary`)

A model's JSON carries the sha256 of its ``metrics.json`` and the settings it was
computed with: a rerun skips it when both still match (resumable), else redoes it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from loralens.analysis import stats
from loralens.core.config import StudyConfig
from loralens.analysis.extract import job_fingerprint
from loralens.analysis.weights.forgetting import (
    base_lm_head, encode_texts, lm_cross_entropy, text_sample,
)
from loralens.models.classifier import Base
from loralens.models.methods import PAIR, get_method
from loralens.models.saving import load_trained
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json, read_json, write_csv
from loralens.tasks.registry import get_task
from loralens.analysis.weights.measures import EPSILONS, base_svd, matrix_measures, one_thread

log = logging.getLogger(__name__)

FORMAT = "loralens-weights-1"
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.+\.)?([A-Za-z0-9_]+)$")
SUMMARY_EPSILON = 0.5  # the paper's and PEFT's threshold, used in the summary


def settings(cfg: StudyConfig) -> dict:
    """What a model's results depend on besides its weights (a change redoes it)."""
    wc = cfg.weights
    return {"format": FORMAT, "matrices": common_matrices(cfg), "full_extra": wc.full_extra,
            "extra_layers": wc.extra_layers, "top_k": wc.top_k,
            "forgetting": wc.forgetting and {
                "text": wc.forgetting_text, "examples": wc.forgetting_examples,
                "max_length": wc.forgetting_max_length, "seed": wc.forgetting_seed}}


def common_matrices(cfg: StudyConfig) -> list[str]:
    return list(cfg.weights.matrices or cfg.lora.target_modules)


def spaced_layers(n_layers: int, count: int) -> list[int]:
    """``count`` evenly spaced layer indices of ``n_layers``, first and last included."""
    if count <= 0 or n_layers <= 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, min(count, n_layers))})


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer inside a loaded classifier (a PEFT wrapper merged away first)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if hasattr(model, "backbone"):
        return model.backbone
    return model.base_model  # a transformers PreTrainedModel: its base_model_prefix part


def select_matrices(backbone: nn.Module, common: Sequence[str], extra: Sequence[str],
                    extra_layers: int) -> list[tuple[str, int, str, str]]:
    """(module name, layer, matrix, group) of every analysed linear layer, in model order."""
    found = []
    for name, mod in backbone.named_modules():
        m = LAYER_RE.search(name)
        if m and isinstance(mod, nn.Linear):
            found.append((name, int(m.group(1)), m.group(2)))
    n_layers = 1 + max((layer for _, layer, _ in found), default=-1)
    keep = set(spaced_layers(n_layers, extra_layers))
    out = [(n, li, mat, "common") for n, li, mat in found if mat in common]
    out += [(n, li, mat, "extra") for n, li, mat in found
            if mat in extra and mat not in common and li in keep]
    return out


class Analyzer:
    """Per-process state: the base model's weights, their SVDs (cached) and LM head, and the
    forgetting samples with the base's cross-entropy on them (once per task)."""

    def __init__(self, cfg: StudyConfig, base: Base):
        self.cfg, self.base = cfg, base
        self.base_bb = base.backbone().eval()
        self.base_weights = {n: m.weight for n, m in self.base_bb.named_modules()
                             if isinstance(m, nn.Linear)}
        self._svd: dict = {}
        self._head = None
        self._samples: dict = {}

    def svd(self, name: str):
        if name not in self._svd:
            self._svd[name] = base_svd(self.base_weights[name])
        return self._svd[name]

    @property
    def head(self) -> torch.Tensor:
        if self._head is None:
            self._head = base_lm_head(self.base)
        return self._head

    def sample(self, task: str) -> dict:
        """The task's text sample, token ids, and the base's cross-entropy on them."""
        if task not in self._samples:
            wc = self.cfg.weights
            s = text_sample(task, wc, self.cfg.data.glue_dir)
            ids = encode_texts(self.base.tokenizer, s.texts, wc.forgetting_max_length)
            ce, n = self.cross_entropy(self.base_bb, ids)
            self._samples[task] = {"source": s.source, "n_texts": len(ids), "ids": ids,
                                   "n_tokens": n, "ce_base": ce}
        return self._samples[task]

    def cross_entropy(self, backbone: nn.Module, ids) -> tuple[float, int]:
        return lm_cross_entropy(backbone, self.head, ids, self.base.tokenizer.pad_token_id,
                                self.cfg.weights.batch_size)

    def analyze(self, backbone: nn.Module, method: str, desc: str = "",
                progress: bool = False) -> list[dict]:
        """One row per analysed matrix of a loaded (merged) backbone."""
        wc = self.cfg.weights
        extra = wc.full_extra if get_method(method, self.cfg).trains_all else []
        todo = select_matrices(backbone, common_matrices(self.cfg), extra, wc.extra_layers)
        mods = dict(backbone.named_modules())
        rows = []
        for name, layer, mat, group in tqdm(todo, desc=desc, disable=not progress, leave=False):
            with one_thread():
                r = matrix_measures(mods[name].weight, self.base_weights[name], self.svd(name),
                                    k=wc.top_k)
            rows.append({"layer": layer, "matrix": mat, "module": name, "group": group, **r})
        return rows

    def forgetting(self, backbone: nn.Module, task: str) -> dict:
        s = self.sample(task)
        ce, _ = self.cross_entropy(backbone, s["ids"])
        return {"source": s["source"], "n_texts": s["n_texts"], "n_tokens": s["n_tokens"],
                "ce_base": s["ce_base"], "ce_tuned": ce, "forgetting": ce - s["ce_base"]}


def is_done(run: RunDir, cfg: StudyConfig, task: str, method: str, seed: int) -> bool:
    path = run.weightspace_model_path(task, method, seed)
    if not path.is_file():
        return False
    old = read_json(path)
    return (old.get("metrics_sha256") == job_fingerprint(run.job_dir(task, method, seed))
            and old.get("settings") == _json_roundtrip(settings(cfg)))


def _json_roundtrip(obj):
    return json.loads(json.dumps(obj))


def analyze_job(an: Analyzer, run: RunDir, task: str, method: str, seed: int,
                progress: bool = False) -> dict:
    """Analyse one trained model and write its JSON; returns it."""
    t0 = time.perf_counter()
    job_dir = run.job_dir(task, method, seed)
    model = load_trained(job_dir, an.base.backbone(), get_task(task).num_labels)
    backbone = backbone_of(model).eval()
    out = {"task": task, "method": method, "seed": seed,
           "metrics_sha256": job_fingerprint(job_dir), "settings": settings(an.cfg),
           "model": an.base.name,
           "matrices": an.analyze(backbone, method, f"weights {task}/{method}-seed{seed}",
                                  progress)}
    if an.cfg.weights.forgetting:
        out["forgetting"] = an.forgetting(backbone, task)
    out["seconds"] = time.perf_counter() - t0
    atomic_write_json(run.weightspace_model_path(task, method, seed), out)
    return out


# --------------------------------------------------------------------------- aggregation

def layer_rows(results: Sequence[dict]) -> list[dict]:
    rows = []
    for r in results:
        for m in r["matrices"]:
            row = {k: r[k] for k in ("task", "method", "seed")}
            row.update({k: m[k] for k in ("layer", "matrix", "group", "shape", "rel_change",
                                          "effective_rank", "rank90")})
            row.update({f"intruders_{e:g}": m["intruders"].get(str(e)) for e in EPSILONS})
            row["max_cos"] = m["max_cos"]
            rows.append(row)
    return rows


def model_summary(r: dict) -> dict:
    """One model's numbers over the common matrices (intruders summed; the rest averaged)."""
    mats = [m for m in r["matrices"] if m["group"] == "common"]
    key = str(SUMMARY_EPSILON)
    out = {"intruders": float(sum(m["intruders"][key] for m in mats)),
           "rel_change": float(np.mean([m["rel_change"] for m in mats])),
           "effective_rank": float(np.mean([m["effective_rank"] for m in mats])),
           "rank90": float(np.mean([m["rank90"] for m in mats]))}
    if r.get("forgetting"):
        out["forgetting"] = r["forgetting"]["forgetting"]
    return out


MEASURES = ("intruders", "rel_change", "effective_rank", "rank90", "forgetting")


def summarize(results: Sequence[dict], tasks: Sequence[str]) -> dict:
    """Per task and measure, LoRA vs full fine-tuning over paired seeds
    (:func:`stats.compare_methods`; Bonferroni over the measures x tasks compared)."""
    per = {(r["task"], r["method"], r["seed"]): model_summary(r) for r in results}
    cells = []
    for task in tasks:
        for measure in MEASURES:
            vals = {m: {s: v[measure] for (t, mm, s), v in per.items()
                        if t == task and mm == m and measure in v} for m in PAIR}
            seeds = sorted(set(vals["lora"]) & set(vals["full"]))
            cells.append((task, measure, vals, seeds))
    # the family is the tests actually made: two paired seeds at least, and not zero spread
    n_tests = sum(1 for _, _, vals, seeds in cells if len(seeds) >= 2 and not stats.zero_spread(
        [vals["lora"][s] for s in seeds], [vals["full"][s] for s in seeds])) or 1
    out: dict = {"epsilon": SUMMARY_EPSILON, "n_tests": n_tests, "tasks": []}
    for task in tasks:
        entry = {"task": task, "measures": {}}
        for t, measure, vals, seeds in cells:
            if t != task or not (vals["lora"] or vals["full"]):
                continue
            c = {m: _describe(list(vals[m].values())) for m in PAIR}
            if len(seeds) >= 2:
                c["test"] = stats.compare_methods([vals["lora"][s] for s in seeds],
                                                  [vals["full"][s] for s in seeds], seeds,
                                                  n_tests=n_tests, sign="lora - full")
            entry["measures"][measure] = c
        out["tasks"].append(entry)
    return out


def _describe(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"n": len(a), "mean": float(a.mean()) if len(a) else None,
            "sd": float(a.std(ddof=1)) if len(a) > 1 else None}


def write_outputs(run: RunDir, results: Sequence[dict], tasks: Sequence[str]) -> dict:
    """layers.*, forgetting.* and summary.json from every model's results."""
    rows = layer_rows(results)
    write_csv(run.weightspace_layers_csv, rows)
    atomic_write_json(run.weightspace_layers_json, {"epsilons": list(EPSILONS), "rows": rows})
    forget = [{"task": r["task"], "method": r["method"], "seed": r["seed"], **r["forgetting"]}
              for r in results if r.get("forgetting")]
    write_csv(run.weightspace_forgetting_csv, forget)
    atomic_write_json(run.weightspace_forgetting_json, {"rows": forget})
    summary = summarize(results, tasks)
    atomic_write_json(run.weightspace_summary_json, summary)
    return summary


# --------------------------------------------------------------------------- more methods

HEAD_NOTE = ("undefined: a head-only method's backbone is the base model's (no weight "
             "change, no forgetting by construction); not tested")


def method_summary(cfg, run: RunDir, results: Sequence[dict]) -> dict:
    """A study with more than the two study methods: every method against the reference
    method (``reference_method``, default ``full``), written to ``weightspace/methods.json``.

    Per task, measure (:data:`MEASURES`, over the common matrices) and method: the mean
    and sd over seeds and each seed's value, and the method vs the reference over paired
    seeds (:func:`loralens.analysis.stats.compare_methods` with sign ``method -
    reference``; Bonferroni over the tests actually made: two paired seeds at least, not
    zero spread). A ``head``-family method leaves the backbone as the base model's: its
    weight change and forgetting are 0 by construction and its tests undefined (never
    significant).
    """
    ref = cfg.reference_method
    per = {(r["task"], r["method"], r["seed"]): model_summary(r) for r in results}
    cells = []
    for task in cfg.tasks:
        for measure in MEASURES:
            vals = {m: {s: v[measure] for (t, mm, s), v in per.items()
                        if t == task and mm == m and measure in v} for m in cfg.methods}
            for m in cfg.methods:
                seeds = sorted(set(vals[m]) & set(vals.get(ref, {})))
                testable = (m != ref and get_method(m, cfg).family != "head"
                            and len(seeds) >= 2 and not stats.zero_spread(
                                [vals[m][s] for s in seeds], [vals[ref][s] for s in seeds]))
                cells.append((task, measure, m, vals, seeds, testable))
    n_tests = sum(1 for c in cells if c[-1]) or 1
    rows = []
    for task, measure, m, vals, seeds, testable in cells:
        if not vals[m]:
            continue
        row = {"task": task, "measure": measure, "method": m,
               "family": get_method(m, cfg).family, "reference": ref,
               **_describe(list(vals[m].values())),
               "per_seed": {str(s): vals[m][s] for s in sorted(vals[m])}, "test": None}
        if m == ref:
            row["note"] = "the reference method"
        elif row["family"] == "head":
            row["note"] = HEAD_NOTE
        elif testable:
            row["test"] = stats.compare_methods([vals[m][s] for s in seeds],
                                                [vals[ref][s] for s in seeds], seeds,
                                                n_tests=n_tests, sign="lora - full")
        else:
            row["note"] = "not tested: fewer than two paired seeds, or zero spread"
        rows.append(row)
    out = {"reference_method": ref, "methods": list(cfg.methods), "n_tests": n_tests,
           "sign": "method - reference (compare_methods' lora = the method, full = the "
                   "reference)", "rows": rows}
    atomic_write_json(run.weightspace_methods_json, out)
    return out


def load_results(run: RunDir, jobs: Sequence[tuple[str, str, int]]) -> list[dict]:
    return [read_json(run.weightspace_model_path(*k)) for k in jobs
            if run.weightspace_model_path(*k).is_file()]


def summary_lines(summary: dict) -> list[str]:
    lines = []
    for e in summary["tasks"]:
        ms = e["measures"]
        parts = [f"{name} LoRA {_g(ms[k]['lora']['mean'])} vs full {_g(ms[k]['full']['mean'])}"
                 for k, name in (("intruders", f"intruders (eps {summary['epsilon']:g})"),
                                 ("rel_change", "|dW|/|W0|"), ("forgetting", "forgetting"))
                 if k in ms]
        lines.append(f"weights {e['task']}: " + "; ".join(parts))
    return lines


def _g(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"
