"""The weights stage's analysis: intruder dimensions, the change's spectrum and forgetting, per
model (the stage that runs it over a study's models is :mod:`.stage`).

For every finished (task, method, seed), the trained classifier is loaded through
:func:`models.load_trained` (a LoRA adapter merged into its base weights first) and
each analysed matrix is compared with the base model's (:mod:`.weight_measures`,
float64; the base's SVDs are computed once per process and reused by every model):

- each method's own matrix set (:func:`method_matrices`) in every layer, marked ``group =
  common`` (the name kept from when every method had the same set): a PEFT method's own
  target modules (IA3: k, v and down; LoRA-all-linear: every linear layer of the blocks;
  LoRA: ``lora.target_modules``, q and v by default); full fine-tuning and head-only on
  the union of the configured methods' targets (so that each method can be compared with
  full fine-tuning on its own set); ``weights.matrices``, where set, for every method
  alike;
- for full fine-tuning (a method that trains every parameter, ``Method.trains_all``),
  which changes every linear layer, also ``weights.full_extra``
  (k/o projections and the MLP) in ``weights.extra_layers`` evenly spaced layers: a
  cheap subset, marked ``group = extra`` and never mixed into the comparison.

A comparison of two methods uses the matrices both analysed (a method against full
fine-tuning: the method's own set, full fine-tuning restricted to it), and every summary
row names that set (``matrix_set``).

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
from loralens.analysis.families import (
    apply as apply_family, by_construction, method_weight_families, weight_families,
)
from loralens.core.config import StudyConfig
from loralens.analysis.extract import job_fingerprint
from loralens.analysis.weights.forgetting import (
    base_lm_head, encode_texts, lm_cross_entropy, skip_reason, text_sample,
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


def settings(cfg: StudyConfig, method: str | None = None) -> dict:
    """What a model's results depend on besides its weights (a change redoes it)."""
    wc = cfg.weights
    mats = method_matrices(cfg, method) if method is not None else common_matrices(cfg)
    return {"format": FORMAT, "matrices": mats, "full_extra": wc.full_extra,
            "extra_layers": wc.extra_layers, "top_k": wc.top_k,
            "forgetting": wc.forgetting and {
                "text": wc.forgetting_text, "examples": wc.forgetting_examples,
                "max_length": wc.forgetting_max_length, "seed": wc.forgetting_seed}}


def common_matrices(cfg: StudyConfig) -> list[str]:
    """``weights.matrices`` where set, else ``lora.target_modules``: the study's LoRA's."""
    return list(cfg.weights.matrices or cfg.lora.target_modules)


ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer of the blocks


def _targets(cfg: StudyConfig, name: str) -> list[str] | str | None:
    m = get_method(name, cfg)
    t = m.peft.get("target_modules") if m.is_adapter else None
    return t if t == ALL_LINEAR or not t else list(t)


def union_matrices(cfg: StudyConfig) -> list[str] | str:
    """Every configured PEFT method's target modules, in first-seen order (``all-linear``
    if any method adapts every linear layer; ``lora.target_modules`` if none has targets):
    the set full fine-tuning and head-only are analysed on."""
    out: list[str] = []
    for name in cfg.methods:
        t = _targets(cfg, name)
        if t == ALL_LINEAR:
            return ALL_LINEAR
        out += [x for x in t or [] if x not in out]
    return out or list(cfg.lora.target_modules)


def method_matrices(cfg: StudyConfig, method: str) -> list[str] | str:
    """The matrix set analysed for ``method`` (a list of names, or ``all-linear``):
    ``weights.matrices`` where set (every method alike); else a PEFT method's own target
    modules; else (full fine-tuning, head only, a PEFT method without targets) the
    union of the configured methods' (:func:`union_matrices`)."""
    if cfg.weights.matrices:
        return list(cfg.weights.matrices)
    return _targets(cfg, method) or union_matrices(cfg)


def matrix_set_label(names) -> str:
    """A matrix set as rows show it: ``all linear layers`` or ``q_proj, v_proj``."""
    return "all linear layers" if names == ALL_LINEAR else ", ".join(names)


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


def linear_names(backbone: nn.Module) -> list[str]:
    """Names of ``backbone``'s linear layers, in model order."""
    return [n for n, mod in backbone.named_modules() if isinstance(mod, nn.Linear)]


def select_matrices(backbone: nn.Module | Sequence[str], common: Sequence[str] | str,
                    extra: Sequence[str], extra_layers: int) -> list[tuple[str, int, str, str]]:
    """(module name, layer, matrix, group) of every analysed linear layer, in model order
    (``backbone``: the model, or its :func:`linear_names`; ``common``: the method's own
    set, ``all-linear`` for every linear layer of the blocks)."""
    names = linear_names(backbone) if isinstance(backbone, nn.Module) else backbone
    found = []
    for name in names:
        m = LAYER_RE.search(name)
        if m:
            found.append((name, int(m.group(1)), m.group(2)))
    n_layers = 1 + max((layer for _, layer, _ in found), default=-1)
    keep = set(spaced_layers(n_layers, extra_layers))
    if common == ALL_LINEAR:
        common = sorted({mat for _, _, mat in found})
    out = [(n, li, mat, "common") for n, li, mat in found if mat in common]
    out += [(n, li, mat, "extra") for n, li, mat in found
            if mat in extra and mat not in common and li in keep]
    return out


def analysed(cfg: StudyConfig, method: str, names: Sequence[str]) -> list[tuple[str, int, str, str]]:
    """:func:`select_matrices` of ``method`` as :meth:`Analyzer.analyze` picks them: its own
    set (:func:`method_matrices`), and full fine-tuning's extra matrices."""
    wc = cfg.weights
    extra = wc.full_extra if get_method(method, cfg).trains_all else []
    return select_matrices(names, method_matrices(cfg, method), extra, wc.extra_layers)


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
            self._samples[task] = {"source": s.source, "record": s.record,
                                   "n_texts": len(ids), "ids": ids,
                                   "n_tokens": n, "ce_base": ce}
        return self._samples[task]

    def cross_entropy(self, backbone: nn.Module, ids) -> tuple[float, int]:
        return lm_cross_entropy(backbone, self.head, ids, self.base.tokenizer.pad_token_id,
                                self.cfg.weights.batch_size)

    def analyze(self, backbone: nn.Module, method: str, desc: str = "",
                progress: bool = False) -> list[dict]:
        """One row per analysed matrix of a loaded (merged) backbone."""
        wc = self.cfg.weights
        todo = analysed(self.cfg, method, linear_names(backbone))
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
                "ce_base": s["ce_base"], "ce_tuned": ce, "forgetting": ce - s["ce_base"],
                "corpus_sha256": s["record"].get("sha256"),
                "line_numbers": s["record"].get("line_numbers")}


def is_done(run: RunDir, cfg: StudyConfig, task: str, method: str, seed: int) -> bool:
    path = run.weightspace_model_path(task, method, seed)
    if not path.is_file():
        return False
    old = read_json(path)
    return (old.get("metrics_sha256") == job_fingerprint(run.job_dir(task, method, seed))
            and old.get("settings") == _json_roundtrip(settings(cfg, method)))


def _json_roundtrip(obj):
    return json.loads(json.dumps(obj))


def analyze_job(an: Analyzer, run: RunDir, task: str, method: str, seed: int,
                progress: bool = False) -> dict:
    """Analyse one trained model and write its JSON; returns it."""
    t0 = time.perf_counter()
    job_dir = run.job_dir(task, method, seed)
    model = load_trained(job_dir, an.base.backbone(), get_task(task).num_labels)
    backbone = backbone_of(model).eval()
    mats = an.analyze(backbone, method, f"weights {task}/{method}-seed{seed}", progress)
    out = {"task": task, "method": method, "seed": seed,
           "metrics_sha256": job_fingerprint(job_dir), "settings": settings(an.cfg, method),
           "model": an.base.name,
           "matrix_set": matrix_set_label(method_matrices(an.cfg, method)),
           "matrix_names": own_matrix_names({"matrices": mats}),
           "matrices": mats}
    if an.cfg.weights.forgetting:
        reason = skip_reason(an.cfg.weights)  # no corpus here: the rest still runs
        if reason:
            log.warning(reason)
            out["forgetting_skipped"] = reason
        else:
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


def own_matrix_names(r: dict) -> list[str]:
    """The distinct matrix names of a model's own set (group ``common``), sorted."""
    return sorted({m["matrix"] for m in r["matrices"] if m["group"] == "common"
                   and m.get("matrix")})


def model_summary(r: dict, only=None) -> dict:
    """One model's numbers over its own matrices (intruders summed; the rest averaged),
    or over those of them named in ``only`` (a comparison's shared set; None: all)."""
    mats = [m for m in r["matrices"] if m["group"] == "common"
            and (only is None or m.get("matrix") in only)]
    key = str(SUMMARY_EPSILON)
    out = {}
    if mats:
        out = {"intruders": float(sum(m["intruders"][key] for m in mats)),
               "rel_change": float(np.mean([m["rel_change"] for m in mats])),
               "effective_rank": float(np.mean([m["effective_rank"] for m in mats])),
               "rank90": float(np.mean([m["rank90"] for m in mats]))}
    if r.get("forgetting"):
        out["forgetting"] = r["forgetting"]["forgetting"]
    return out


MEASURES = ("intruders", "rel_change", "effective_rank", "rank90", "forgetting")


def summarize(results: Sequence[dict], tasks: Sequence[str],
              cfg: StudyConfig | None = None) -> dict:
    """Per task and measure, LoRA vs full fine-tuning over paired seeds
    (:func:`stats.compare_methods`), corrected within the families declared from the config
    alone (:func:`families.weight_families`: one per measure, members the configured
    tasks; ``cfg`` None: the defaults with these ``tasks``). A zero-spread test stays in its
    family, undefined; a contrast true by construction (a rank-r update's effective rank)
    is stated, not tested (``test``: ``tested`` False and ``by_construction``)."""
    cfg = cfg or StudyConfig(tasks=list(tasks))
    fams = weight_families(cfg)
    names = _names(results)
    out: dict = {"epsilon": SUMMARY_EPSILON, "correction": cfg.stats.correction,
                 "n_tests": len(cfg.tasks), "families": {k: f.to_dict() for k, f in fams.items()},
                 "stated_not_tested": [w for f in fams.values() for w in f.stated],
                 "tasks": []}
    tests: dict[str, dict[str, dict]] = {}
    for task in tasks:
        only = _shared(names, task, *PAIR)
        entry = {"task": task, "measures": {}, "matrix_set": _label(only)}
        per = {(r["task"], r["method"], r["seed"]): model_summary(r, only)
               for r in results if r["task"] == task}
        for measure in MEASURES:
            vals = {m: {s: v[measure] for (t, mm, s), v in per.items()
                        if t == task and mm == m and measure in v} for m in PAIR}
            if not (vals["lora"] or vals["full"]):
                continue
            seeds = sorted(set(vals["lora"]) & set(vals["full"]))
            c = {m: _describe(list(vals[m].values())) for m in PAIR}
            fam = fams.get(measure)
            if fam is not None and fam.stated:
                c["test"] = {"tested": False, "by_construction": fam.stated[0],
                             "note": fam.stated[0]}
            elif len(seeds) >= 2 and fam is not None and f"{task} {measure}" in fam.members:
                c["test"] = stats.compare_methods([vals["lora"][s] for s in seeds],
                                                  [vals["full"][s] for s in seeds], seeds,
                                                  n_tests=fam.size, sign="lora - full")
                tests.setdefault(measure, {})[f"{task} {measure}"] = c["test"]
            entry["measures"][measure] = c
        out["tasks"].append(entry)
    for measure, group in tests.items():
        apply_family(fams[measure], group)
    return out


def _names(results: Sequence[dict]) -> dict[tuple[str, str], set[str]]:
    """(task, method) -> the matrix names of its own set, over its seeds."""
    out: dict = {}
    for r in results:
        out.setdefault((r["task"], r["method"]), set()).update(own_matrix_names(r))
    return out


def _shared(names: dict, task: str, method: str, reference: str) -> set[str] | None:
    """The matrices a comparison of ``method`` with ``reference`` uses: those both
    analysed (a method vs full fine-tuning: the method's own set). None where either's
    names are unknown (results written before matrix names were recorded): every matrix."""
    a, b = names.get((task, method)), names.get((task, reference))
    if not a or not b:
        return a or b or None
    return a & b


def _label(only: set[str] | None) -> str | None:
    return ", ".join(sorted(only)) if only else None


def _describe(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"n": len(a), "mean": float(a.mean()) if len(a) else None,
            "sd": float(a.std(ddof=1)) if len(a) > 1 else None}


def write_outputs(run: RunDir, results: Sequence[dict], tasks: Sequence[str],
                  cfg: StudyConfig | None = None) -> dict:
    """layers.*, forgetting.* and summary.json from every model's results."""
    rows = layer_rows(results)
    write_csv(run.weightspace_layers_csv, rows)
    atomic_write_json(run.weightspace_layers_json, {"epsilons": list(EPSILONS), "rows": rows})
    forget = [{"task": r["task"], "method": r["method"], "seed": r["seed"], **r["forgetting"]}
              for r in results if r.get("forgetting")]
    write_csv(run.weightspace_forgetting_csv, forget)
    atomic_write_json(run.weightspace_forgetting_json, {"rows": forget})
    summary = summarize(results, tasks, cfg)
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
    reference``), corrected within the families declared from the config alone
    (:func:`families.method_weight_families`, one per measure: a zero-spread test stays in
    its family, undefined; a member with fewer than two paired seeds counts as p = 1). A
    contrast true by construction is stated, not tested: a ``head``-family method leaves
    the backbone as the base model's (weight change and forgetting 0), a rank-r update's
    effective rank and rank90 cannot exceed r."""
    ref = cfg.reference_method
    fams = method_weight_families(cfg)
    names = _names(results)
    rows, tests = [], {}
    for task in cfg.tasks:
        for measure in MEASURES:
            for m in cfg.methods:
                # the method and the reference on the matrices both analysed (vs full
                # fine-tuning: the method's own set); the reference's own row: its own set
                only = names.get((task, m)) if m == ref else _shared(names, task, m, ref)
                vals = {mm: {r["seed"]: v[measure] for r in results
                             if r["task"] == task and r["method"] == mm
                             for v in [model_summary(r, only)] if measure in v}
                        for mm in (m, ref)}
                if not vals[m]:
                    continue
                seeds = sorted(set(vals[m]) & set(vals[ref]))
                family = get_method(m, cfg).family
                row = {"task": task, "measure": measure, "method": m, "family": family,
                       "reference": ref, "matrix_set": _label(only),
                       **_describe(list(vals[m].values())),
                       "per_seed": {str(s): vals[m][s] for s in sorted(vals[m])},
                       "test": None}
                why = None if m == ref else by_construction(cfg, m, measure)
                member = f"{task} {m} {measure}"
                if m == ref:
                    row["note"] = "the reference method"
                elif family == "head":
                    row["note"] = HEAD_NOTE
                elif why:
                    row["note"] = why
                elif len(seeds) >= 2 and measure in fams and member in fams[measure].members:
                    row["test"] = stats.compare_methods(
                        [vals[m][s] for s in seeds], [vals[ref][s] for s in seeds], seeds,
                        n_tests=fams[measure].size, sign="lora - full")
                    tests.setdefault(measure, {})[member] = row["test"]
                else:
                    row["note"] = ("not tested: fewer than two paired seeds (in its family as "
                                   "p = 1)")
                rows.append(row)
    for measure, group in tests.items():
        apply_family(fams[measure], group)
    out = {"reference_method": ref, "methods": list(cfg.methods),
           "n_tests": max((f.size for f in fams.values()), default=0),
           "correction": cfg.stats.correction,
           "families": {k: f.to_dict() for k, f in fams.items()},
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
