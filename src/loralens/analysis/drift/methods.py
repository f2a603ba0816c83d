"""Drift of every method against the study's reference method (``reference_method``,
default ``full``), for studies with more than the two methods of Tables 3 and 4.

Writes ``RUN_DIR/drift/methods.json`` and ``methods.csv``: per task, tested drift measure
(:data:`~loralens.analysis.drift.measures.DRIFT_MEASURES`) and method, the drift averaged over the
states of ``drift.layers`` (mean, sd and each seed's value), and the method against the
reference, seed-paired (:func:`loralens.analysis.drift.stats.compare`: paired t-test, Bonferroni
over the tests made: (methods other than the reference and the head-only ones) x
configured tasks x measures, Cohen's d of reference - method, positive when the reference
drifts more; Delta% = 100 (drift_ref - drift_method) / drift_ref).

A method of the ``head`` family trains only the classification head: its backbone is the
base model's, its drift 0 by construction, so its tests are undefined (never
significant, in no family) and say so.

:func:`method_accuracy` is Table 3's counterpart: each method's study metric against the
reference's (written beside the drift rows, and computed by the report from metrics.json).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from loralens.core.config import StudyConfig
from loralens.analysis.drift.measures import (
    DRIFT_MEASURES, DRIFT_SIGN, SCORE_SIGN, drift_states, layer_similarities,
)
from loralens.analysis.drift.stats import compare, describe
from loralens.analysis.extract import BASE_KEY, load_task
from loralens.models.methods import get_method
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json, write_csv

HEAD_NOTE = ("undefined: a head-only method's backbone is the base model's, its drift 0 by "
             "construction (not tested, never significant)")
CSV_KEYS = ("task", "measure", "method", "family", "reference", "n_seeds", "mean", "sd",
            "per_seed", "reference_mean", "delta_percent", "t", "p", "p_bonferroni",
            "significant", "cohens_d", "tested", "note")


def method_drift(cfg: StudyConfig, run: RunDir, tasks: Sequence[str] | None = None, *,
                 alpha: float = 0.05, n_resamples: int = 10_000, ci_seed: int = 0) -> dict:
    """Compute and write the per-method drift table; returns ``{"rows", "notes", ...}``."""
    ref = cfg.reference_method
    tested = [m for m in cfg.methods if m != ref and get_method(m, cfg).family != "head"]
    n_tests = max(1, len(tested) * len(cfg.tasks) * len(DRIFT_MEASURES))
    notes: list[str] = []
    if ref not in cfg.methods:
        notes.append(f"reference method {ref!r} is not among the methods {cfg.methods}: "
                     "no comparisons")
    rows: list[dict] = []
    for task in list(tasks or cfg.tasks):
        if not run.extract_manifest(task).is_file():
            notes.append(f"{task}: not extracted; run `loralens extract` first")
            continue
        manifest, arrays = load_task(run, task)
        base = arrays.pop(BASE_KEY)
        states = drift_states(cfg.drift.layers, base.shape[1])
        sims = layer_similarities(base, arrays, notes, f"{task}: ")
        entries = manifest["models"]
        means = {m: {measure: {} for measure in DRIFT_MEASURES} for m in cfg.methods}
        for key, sim in sims.items():
            m, seed = entries[key]["method"], entries[key]["seed"]
            if m in means:
                for measure in DRIFT_MEASURES:
                    v = float(np.mean(1.0 - sim[measure][states]))
                    if math.isfinite(v):
                        means[m][measure][seed] = v
        for measure in DRIFT_MEASURES:
            for m in cfg.methods:
                rows.append(_row(task, measure, m, ref, means, n_tests, alpha, n_resamples,
                                 ci_seed, cfg))
    meta = {"reference_method": ref, "methods": list(cfg.methods), "alpha": alpha,
            "n_tests": n_tests, "alpha_per_test": alpha / n_tests,
            "family": "methods other than the reference and the head-only ones x configured "
                      "tasks x measures",
            "cohens_d": f"sign {DRIFT_SIGN!r} with lora = the method, full = the reference: "
                        "positive when the reference drifts more",
            "drift_layers": cfg.drift.layers}
    meta["accuracy"] = method_accuracy(job_scores(run, cfg.tasks), cfg.tasks, cfg.methods,
                                       ref, alpha, n_resamples, ci_seed)
    files = [run.drift_dir / "methods.json", run.drift_dir / "methods.csv"]
    atomic_write_json(files[0], {**meta, "rows": rows, "notes": notes})
    write_csv(files[1], [{k: _cell(r.get(k)) for k in CSV_KEYS} for r in rows], list(CSV_KEYS))
    return {**meta, "rows": rows, "notes": notes, "files": [str(f) for f in files]}


def _row(task, measure, m, ref, means, n_tests, alpha, n_resamples, ci_seed, cfg) -> dict:
    vals = means[m][measure]
    seeds = sorted(vals)
    mean = float(np.mean([vals[s] for s in seeds])) if seeds else None
    sd = float(np.std([vals[s] for s in seeds], ddof=1)) if len(seeds) > 1 else None
    row = {"task": task, "measure": measure, "method": m, "family": get_method(m, cfg).family,
           "reference": ref, "n_seeds": len(seeds), "mean": mean, "sd": sd,
           "per_seed": {str(s): vals[s] for s in seeds}, "tested": False}
    if m == ref or ref not in means:
        row["note"] = "the reference method" if m == ref else "no reference method"
        return row
    c = compare(vals, means[ref][measure], n_tests, alpha, n_resamples, ci_seed, DRIFT_SIGN)
    if row["family"] == "head":
        describe(c, HEAD_NOTE)
    row.update({k: c.get(k) for k in ("t", "p", "p_bonferroni", "significant", "cohens_d",
                                      "tested", "note", "delta_percent", "delta_percent_ci",
                                      "zero_spread", "n_tests")})
    row["reference_mean"] = (c.get("full") or {}).get("mean")
    return row


def job_scores(run: RunDir, tasks: Sequence[str]) -> dict:
    """``{(task, method, seed): study metric on the validation split}`` of finished jobs."""
    from loralens.core.files import read_json
    from loralens.tasks.registry import get_task

    out = {}
    for t, m, s in run.finished_jobs():
        if t in tasks:
            v = (read_json(run.metrics_path(t, m, s)).get("validation") or {}).get(
                get_task(t).metric)
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[(t, m, s)] = float(v)
    return out


def _cell(v):
    if isinstance(v, dict):
        return ";".join(f"{k}={x:.6g}" for k, x in v.items())
    return v


def method_accuracy(scores: dict, tasks: Sequence[str], methods: Sequence[str], ref: str,
                    alpha: float = 0.05, n_resamples: int = 10_000, ci_seed: int = 0) -> dict:
    """Each method's study metric against the reference method's, per task.

    ``scores``: ``{(task, method, seed): score}`` (the task's study metric on the whole
    validation split). Seed-paired :func:`~loralens.analysis.drift.stats.compare` of method -
    reference (``SCORE_SIGN`` with lora = the method, full = the reference: t and Cohen's
    d positive when the method scores higher). Bonferroni family: every method but the
    reference x configured ``tasks`` (a head-only method's score is a real test), fixed
    by the config so a correction never changes with what has finished. Returns
    ``{"rows": [{task, method, mean, sd, per_seed, difference, t, p, ...}], "n_tests",
    "alpha", "family", "sign"}``.
    """
    others = [m for m in methods if m != ref]
    n_tests = max(1, len(others) * len(tasks))
    rows = []
    for task in tasks:
        by = {m: {s: v for (t, mm, s), v in scores.items() if t == task and mm == m}
              for m in methods}
        if not any(by.values()):
            continue
        for m in methods:
            vals = by[m]
            seeds = sorted(vals)
            row = {"task": task, "method": m, "reference": ref, "n_seeds": len(seeds),
                   "mean": float(np.mean([vals[s] for s in seeds])) if seeds else None,
                   "sd": float(np.std([vals[s] for s in seeds], ddof=1))
                   if len(seeds) > 1 else None,
                   "per_seed": {str(s): vals[s] for s in seeds}, "tested": False}
            if m == ref or not by.get(ref):
                row["note"] = "the reference method" if m == ref else "no reference results"
            elif vals:
                c = compare(vals, by[ref], n_tests, alpha, n_resamples, ci_seed, SCORE_SIGN)
                row.update({k: c.get(k) for k in ("t", "p", "p_bonferroni", "significant",
                                                  "cohens_d", "tested", "note", "zero_spread",
                                                  "n_tests")})
                if c["lora"] and c["full"]:
                    row["difference"] = c["lora"]["mean"] - c["full"]["mean"]
            rows.append(row)
    return {"rows": rows, "reference_method": ref, "n_tests": n_tests, "alpha": alpha,
            "family": "methods other than the reference x configured tasks (study metric)",
            "sign": "method - reference: t and Cohen's d positive when the method scores "
                    "higher"}
