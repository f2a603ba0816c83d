"""Drift: similarity of every trained model to the base model, layer by layer, and the tables.

Reads what ``extract`` wrote (``RUN_DIR/extract/<task>/``), the jobs' ``metrics.json`` and
``val_logits.npy``, and writes under ``RUN_DIR/drift/``:

- ``layers.csv`` / ``layers.json``: one row per task, method, seed and hidden state, every
  state kept (``layer`` 0 = embedding output, ``i`` = output of block ``i``, the last one
  after the model's final norm, as transformers builds ``hidden_states``; ``state`` says
  so in words, ``in_drift`` whether ``drift.layers`` selects it): linear CKA (biased and
  debiased), the same on features standardised per dimension, mean cosine of paired
  examples, orthogonal Procrustes distance and RBF CKA, all against the base model on the
  same examples, with drift = 1 - CKA; the share of the variance held by the top 1 and
  top 5 dimensions, of this model's and of the base model's pooled features; the real
  number of examples.
- ``table3.csv`` / ``table3.json``: the study's Table 3, per task the study metric
  (accuracy; F1 for MRPC) and accuracy beside it, per method (mean, sd over seeds, each
  seed's value), the majority baseline, LoRA vs full fine-tuning (paired t-test by seed
  of the study metric only; Bonferroni over the configured tasks; Cohen's d of LoRA -
  full); the JSON adds per seed a paired test over validation examples (exact McNemar on
  the saved logits, Wilson intervals on each accuracy).
- ``table4.csv`` / ``table4.json``: the study's Table 4, per task and measure (biased CKA,
  debiased CKA, cosine) the drift averaged over the states of ``drift.layers`` per
  method, Delta% = 100 (drift_full - drift_lora) / drift_full with a seed-paired
  bootstrap CI, the paired t-test (Bonferroni over measures x tasks), Cohen's d of full -
  LoRA (positive when full fine-tuning drifts more, as the paper), and the seed-noise
  floor (drift between two models of one method that differ only in seed); standardised
  CKA beside them, descriptive; the JSON adds the statistics per state (Bonferroni over
  states x tasks, per measure) and the outlier-dimension shares.

Families are the tests the study makes, counted from the config's tasks and seeds, not
from the tasks a command selected: ``loralens drift --task X`` recomputes X with the same
corrections a full run applies. Zero spread of the paired differences is undefined, never
significant (:mod:`loralens.analysis.stats`). Where a statistic is undefined (one seed, one method,
a degenerate layer) the value is null and a note says why; nothing is left out silently.

A study of more methods than LoRA and full fine-tuning also gets ``methods.json`` /
``methods.csv``: every method against the reference method (:func:`method_drift`).

The measures and states live in :mod:`loralens.analysis.drift.measures`; the families, the
comparisons and Table 3 (and its counterpart for more methods, :func:`.stats.method_accuracy`)
in :mod:`loralens.analysis.drift.stats`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from loralens.core.config import StudyConfig
from loralens.analysis.drift.measures import (
    DRIFT_MEASURES, DRIFT_SIGN, MEASURES, PAIR, STD_MEASURES, TOP_KS, drift_states, finite_or_none,
    layer_similarities, seed_floor, state_label, states_text, variance_profile,
)
from loralens.analysis.drift.stats import (
    accuracy_table, compare, correct_drift, describe, families, job_scores, method_accuracy,
)
from loralens.analysis.extract import BASE_KEY, job_fingerprint, load_task
from loralens.models.methods import get_method
from loralens.core.errors import RunDirError
from loralens.core.run_dir import DRIFT_FILES, RunDir
from loralens.core.files import atomic_write_json, write_csv


# --------------------------------------------------------------------------- stage

def run_drift(cfg: StudyConfig, run: RunDir, tasks: Sequence[str] | None = None, *,
              alpha: float = 0.05, n_resamples: int = 10_000, ci_seed: int = 0,
              progress: bool = True) -> dict:
    """Compute per-layer similarities and Tables 3 and 4; write them under RUN_DIR/drift/.

    Args:
        cfg: the run's config: ``cfg.tasks`` is the default task list and, with
            ``cfg.seeds``, defines the Bonferroni families (:func:`families`);
            ``cfg.drift.layers`` the states averaged, tested and drawn.
        run: the run directory (reads extract/ and models/).
        tasks: tasks to compute (default ``cfg.tasks``); a subset does not change the
            families, and the files then hold the subset only (a note says so).
        alpha: family-wise significance level.
        n_resamples, ci_seed: bootstrap resamples and seed (95% percentile intervals).
        progress: accepted for a uniform stage signature; the stage takes seconds and
            shows no bar.

    Returns:
        ``{"layers": [...], "table3": [...], "table4": [...], "notes": [...],
        "files": [...], **meta}``, the content of the files written.
    """
    tasks = list(tasks or cfg.tasks)
    family_tasks = list(cfg.tasks) + [t for t in tasks if t not in cfg.tasks]
    notes: list[str] = []
    if set(tasks) != set(family_tasks):
        notes.append(f"computed for {', '.join(tasks)} only (a --task selection); the "
                     f"families count every configured task ({', '.join(family_tasks)}) and "
                     "a test not computed as p = 1, so a corrected p is never smaller than "
                     "the full run's (Bonferroni: the same); rerun "
                     "`loralens drift` without --task for every task's rows")
    finished = run.finished_jobs()
    loaded = {t: x for t in tasks if (x := _load_extracted(run, t, finished, notes))}
    n_states = next((x[1].shape[1] for x in loaded.values()), None)
    states = drift_states(cfg.drift.layers, n_states) if n_states else []
    fam = families(family_tasks, cfg.seeds, states or None, alpha, cfg.stats.correction)
    meta = {"model": cfg.model.name, "alpha": alpha, "families": fam,
            "n_tests": fam["table4"]["size"],
            "alpha_per_test": fam["table4"]["alpha_per_test"],
            "bootstrap": {"n_resamples": n_resamples, "seed": ci_seed, "confidence": 0.95},
            "drift_layers": {"spec": cfg.drift.layers, "states": states,
                             "n_states": n_states,
                             "labels": [state_label(i, n_states) for i in states]
                             if n_states else []},
            "layer_numbering": "hidden states as transformers returns them: 0 = embedding "
                               "output, i = output of block i, the last one after the final "
                               "norm",
            "cohens_d": {"table3": "mean(lora - full) / sd(lora - full, ddof 1): positive "
                                   "when LoRA scores higher",
                         "table4": "mean(full - lora) / sd(full - lora, ddof 1): positive "
                                   "when full fine-tuning drifts more (the paper's sign)"},
            "tasks_computed": tasks, "tasks_configured": list(cfg.tasks)}
    layer_rows: list[dict] = []
    table4: list[dict] = []
    for task, (manifest, base, arrays) in loaded.items():
        if base.shape[1] != n_states:
            raise RunDirError(f"extract/{task} holds {base.shape[1]} hidden states, another "
                              f"task {n_states}: one model per run directory")
        meta.setdefault("model_note", manifest.get("model_note"))
        sims = layer_similarities(base, arrays, notes, f"{task}: ")
        shares = {BASE_KEY: variance_profile(base, notes, f"{task}: base")}
        shares.update({k: variance_profile(a, notes, f"{task}: {k}") for k, a in arrays.items()})
        floor = seed_floor(arrays, manifest["models"], states, notes, f"{task}: ")
        layer_rows += _layer_rows(task, manifest, sims, shares, n_states, states)
        table4.append(_drift_summary(task, manifest, sims, shares, floor, n_states, states,
                                     fam, alpha, n_resamples, ci_seed, notes))
    table3 = accuracy_table(run, tasks, alpha, n_resamples, ci_seed, notes,
                            family_tasks=family_tasks, family_seeds=cfg.seeds,
                            glue_dir=cfg.data.glue_dir)
    correct_drift(fam, table3, table4)  # Holm needs each family's p-values together

    files = _write_outputs(run, meta, notes, layer_rows, table3, table4)
    return {"layers": layer_rows, "table3": table3, "table4": table4, "notes": notes,
            "files": files, **meta}


def _load_extracted(run: RunDir, task: str, finished: list,
                    notes: list[str]) -> tuple[dict, np.ndarray, dict] | None:
    """``(manifest, base [n, states, d], {model key: [n, states, d]})`` of one task, or
    None (with a note) when the task has not been extracted or lacks the base model."""
    if not run.extract_manifest(task).is_file():
        notes.append(f"{task}: not extracted (no {run.extract_manifest(task)}); "
                     "run `loralens extract` first")
        return None
    manifest, arrays = load_task(run, task)
    if BASE_KEY not in arrays:
        notes.append(f"{task}: the base model was not extracted; no drift")
        return None
    base = arrays.pop(BASE_KEY)
    _check_fresh(run, task, manifest["models"], finished, notes)
    n, requested = int(manifest["n_examples"]), int(manifest["requested"])
    if n < requested:
        notes.append(f"{task}: {n} examples (the whole validation split), not the "
                     f"{requested} requested")
    return manifest, base, arrays


def _layer_rows(task: str, manifest: dict, sims: dict[str, dict], shares: dict,
                n_states: int, states: list[int]) -> list[dict]:
    """layers.csv rows of one task: one per model and hidden state (every state)."""
    n, requested = int(manifest["n_examples"]), int(manifest["requested"])
    chosen = set(states)
    rows = []
    for key, per in sims.items():
        e = manifest["models"][key]
        for layer in range(n_states):
            own, base = shares[key][layer] or {}, shares[BASE_KEY][layer] or {}
            row = {"task": task, "method": e["method"], "seed": e["seed"], "model": key,
                   "layer": layer, "state": state_label(layer, n_states),
                   "in_drift": layer in chosen, "n_examples": n, "requested": requested}
            row.update({m: finite_or_none(per[m][layer]) for m in MEASURES})
            for out, m in (("drift", "cka"), ("drift_debiased", "cka_debiased"),
                           ("drift_std", "cka_std"), ("drift_std_debiased", "cka_std_debiased")):
                row[out] = finite_or_none(1.0 - per[m][layer])
            for k in TOP_KS:
                row[f"var_top{k}"] = own.get(f"top{k}")
                row[f"var_top{k}_base"] = base.get(f"top{k}")
            row["top_dim"] = (own.get("top_dims") or [None])[0]
            row["top_dim_base"] = (base.get("top_dims") or [None])[0]
            rows.append(row)
    return rows


def _check_fresh(run: RunDir, task: str, entries: dict, finished: list, notes: list) -> None:
    """Every extracted model must come from the job as it is now; report jobs not extracted."""
    for key, e in entries.items():
        if e.get("kind") != "trained":
            continue
        job = run.job_dir(task, e["method"], e["seed"])
        if not run.metrics_path(task, e["method"], e["seed"]).is_file():
            notes.append(f"{task}: {key} was extracted but its job {job} is gone")
            continue
        if job_fingerprint(job) != e.get("metrics_sha256"):
            raise RunDirError(f"extract/{task}/{e['file']} comes from an earlier version of {job} "
                              "(trained again since); re-extract it before computing drift")
    missing = [f"{m}-seed{s}" for t, m, s in finished if t == task
               and f"{m}-seed{s}" not in entries]
    if missing:
        notes.append(f"{task}: finished jobs not extracted (left out of drift): "
                     f"{', '.join(missing)}; rerun `loralens extract`")


def _drift_summary(task, manifest, sims, shares, floor, n_states, states, fam, alpha,
                   n_resamples, ci_seed, notes) -> dict:
    """Table 4's entry of one task: layer-averaged drift per measure and method, tests,
    the seed-noise floor, standardised CKA beside, per-state statistics, outlier shares."""
    entries = manifest["models"]
    by_method = {m: {entries[k]["seed"]: k for k in sims if entries[k]["method"] == m}
                 for m in PAIR}
    chosen = set(states)
    entry = {"task": task, "n_examples": int(manifest["n_examples"]),
             "requested": int(manifest["requested"]), "sample_seed": manifest["seed"],
             "n_layers": n_states, "n_states": n_states, "layers": states,
             "states": [state_label(i, n_states) for i in states],
             "seeds": {m: sorted(v) for m, v in by_method.items()},
             "measures": {}, "per_layer": {}, "seed_floor": floor}
    n4, n_layer = fam["table4"]["size"], fam["per_layer"]["size"]
    for measure, label in {**DRIFT_MEASURES, **STD_MEASURES}.items():
        drift = {m: {s: 1.0 - sims[k][measure] for s, k in by_method[m].items()} for m in PAIR}
        mean = {}
        for m in PAIR:
            mean[m] = {}
            for s, d in drift[m].items():
                v = float(np.mean(d[states]))
                if math.isfinite(v):
                    mean[m][s] = v
                else:
                    notes.append(f"{task}: {m}-seed{s} {measure}: some layer is undefined; "
                                 "left out of the layer average")
        c = compare(mean["lora"], mean["full"], n4, alpha, n_resamples, ci_seed, DRIFT_SIGN)
        if measure in STD_MEASURES:
            describe(c, "descriptive: standardised features, beside the tested measures "
                        "(not in a family)")
        else:
            c["seed_floor"] = {m: {k: floor[measure][m][k] for k in ("mean", "min", "max",
                                                                        "n_pairs")}
                               for m in PAIR}
        entry["measures"][measure] = {"drift": label, **c}
        if measure in STD_MEASURES:
            continue
        per_layer = []
        for layer in range(n_states):
            lo = {s: float(d[layer]) for s, d in drift["lora"].items() if math.isfinite(d[layer])}
            fu = {s: float(d[layer]) for s, d in drift["full"].items() if math.isfinite(d[layer])}
            c = compare(lo, fu, n_layer, alpha, n_resamples, ci_seed, DRIFT_SIGN)
            if layer not in chosen:
                describe(c, "descriptive: outside drift.layers, not tested")
            per_layer.append({"layer": layer, "state": state_label(layer, n_states),
                              "in_drift": layer in chosen, **c})
        entry["per_layer"][measure] = per_layer
    entry["outliers"] = _outlier_summary(shares, by_method, states, n_states)
    notes_task = {c["note"] for m, c in entry["measures"].items()
                  if c.get("note") and m in DRIFT_MEASURES}
    for note in sorted(notes_task):
        notes.append(f"{task}: {note}")
    return entry


def _outlier_summary(shares: dict, by_method: dict, states: list[int], n_states: int) -> dict:
    """Per model group (base, each method averaged over seeds): the top-k variance share
    averaged over the selected states, its largest value and where."""
    def group(keys: list[str]) -> dict | None:
        out = {}
        for k in TOP_KS:
            per = np.array([[np.nan if shares[key][i] is None else shares[key][i][f"top{k}"]
                             for i in states] for key in keys], dtype=np.float64)
            if not keys or not np.isfinite(per).any():
                return None
            curve = np.nanmean(per, axis=0)
            at = int(np.nanargmax(curve))
            out[f"top{k}"] = {"mean": float(np.nanmean(curve)), "max": float(curve[at]),
                              "max_state": states[at],
                              "max_state_label": state_label(states[at], n_states)}
        if len(keys) == 1:
            best = states[int(np.nanargmax([np.nan if shares[keys[0]][i] is None
                                            else shares[keys[0]][i]["top1"] for i in states]))]
            out["top_dims_at_max"] = (shares[keys[0]][best] or {}).get("top_dims")
        out["n_models"] = len(keys)
        return out

    result = {"base": group([BASE_KEY])}
    for m in PAIR:
        result[m] = group(list(by_method[m].values()))
    return result


# --------------------------------------------------------------------------- files

LAYER_COLUMNS = ("task", "method", "seed", "model", "layer", "state", "in_drift", "n_examples",
                 "requested", *MEASURES, "drift", "drift_debiased", "drift_std",
                 "drift_std_debiased", "var_top1", "var_top5", "var_top1_base", "var_top5_base",
                 "top_dim", "top_dim_base")
TABLE3_COLUMNS = ("task", "metric", "study_metric", "n_validation", "majority_baseline",
                  "lora_mean", "lora_sd", "lora_per_seed", "full_mean", "full_sd",
                  "full_per_seed", "difference", "n_seeds", "tested", "t", "p",
                  "p_bonferroni", "n_tests", "alpha_per_test", "significant", "zero_spread",
                  "cohens_d", "note")
TABLE4_COLUMNS = ("task", "measure", "drift", "n_examples", "requested", "layers_averaged",
                  "n_seeds", "lora_mean", "lora_sd", "lora_ci_low", "lora_ci_high",
                  "lora_per_seed", "full_mean", "full_sd", "full_ci_low", "full_ci_high",
                  "full_per_seed", "lora_seed_floor", "full_seed_floor", "delta_percent",
                  "delta_ci_low", "delta_ci_high", "bootstrap_distinct_resamples", "tested",
                  "t", "p", "p_bonferroni", "n_tests", "alpha_per_test", "significant",
                  "zero_spread", "cohens_d", "note")


def _method_cells(c: dict, m: str) -> dict:
    s = c.get(m) or {}
    ci = s.get("ci") or [None, None]
    return {f"{m}_mean": s.get("mean"), f"{m}_sd": s.get("sd"), f"{m}_ci_low": ci[0],
            f"{m}_ci_high": ci[1], f"{m}_per_seed": s.get("per_seed")}


def _test_cells(c: dict) -> dict:
    return {k: c.get(k) for k in ("n_seeds", "tested", "t", "p", "p_bonferroni", "n_tests",
                                  "alpha_per_test", "significant", "zero_spread", "cohens_d",
                                  "note")}


def table3_rows(table3: list[dict]) -> list[dict]:
    rows = []
    for e in table3:
        for metric, c in e["metrics"].items():
            base = e.get("majority_baseline") or {}
            rows.append({"task": e["task"], "metric": metric,
                         "study_metric": metric == e.get("selection_metric"),
                         "n_validation": e["n_validation"],
                         "majority_baseline": base.get(metric), "difference": c["difference"],
                         **_method_cells(c, "lora"), **_method_cells(c, "full"),
                         **_test_cells(c)})
    return rows


def table4_rows(table4: list[dict]) -> list[dict]:
    rows = []
    for e in table4:
        for measure, c in e["measures"].items():
            ci = c.get("delta_percent_ci") or [None, None]
            floor = c.get("seed_floor") or {}
            rows.append({"task": e["task"], "measure": measure, "drift": c["drift"],
                         "n_examples": e["n_examples"], "requested": e["requested"],
                         "layers_averaged": states_text(e["layers"]),
                         "delta_percent": c["delta_percent"], "delta_ci_low": ci[0],
                         "delta_ci_high": ci[1],
                         "bootstrap_distinct_resamples": c.get("bootstrap_distinct_resamples"),
                         "lora_seed_floor": (floor.get("lora") or {}).get("mean"),
                         "full_seed_floor": (floor.get("full") or {}).get("mean"),
                         **_method_cells(c, "lora"), **_method_cells(c, "full"),
                         **_test_cells(c)})
    return rows


def _write_outputs(run: RunDir, meta, notes, layer_rows, table3, table4) -> list[str]:
    write_csv(run.drift_path("layers.csv"), layer_rows, LAYER_COLUMNS)
    write_csv(run.drift_path("table3.csv"), table3_rows(table3), TABLE3_COLUMNS)
    write_csv(run.drift_path("table4.csv"), table4_rows(table4), TABLE4_COLUMNS)
    common = {**meta, "notes": notes}
    atomic_write_json(run.drift_path("layers.json"), {
        **common, "columns": list(LAYER_COLUMNS),
        "variance_shares": "share of the summed per-dimension variance (across examples) of "
                           "the pooled features held by the 1 and 5 dimensions of largest "
                           "variance; _base: of the base model's features",
        "rows": layer_rows})
    atomic_write_json(run.drift_path("table3.json"), {
        **common, "table": "3: the study metric per task (accuracy; F1 for MRPC), accuracy "
                           "beside F1, example-level tests per seed", "tasks": table3})
    atomic_write_json(run.drift_path("table4.json"), {
        **common, "table": "4: representation drift to the base model",
        "delta_percent": "100 * (drift_full - drift_lora) / drift_full, means over seeds first",
        "seed_floor": "drift between two models of one method that differ only in seed, "
                      "averaged over the same states; mean over the pairs of seeds",
        "tasks": table4})
    return [str(run.drift_path(n)) for n in DRIFT_FILES]


# --------------------------------------------------------------------------- more methods

HEAD_NOTE = ("undefined: a head-only method's backbone is the base model's, its drift 0 by "
             "construction (not tested, never significant)")
CSV_KEYS = ("task", "measure", "method", "family", "reference", "n_seeds", "mean", "sd",
            "per_seed", "reference_mean", "delta_percent", "t", "p", "p_bonferroni",
            "significant", "cohens_d", "tested", "note")


def method_drift(cfg: StudyConfig, run: RunDir, tasks: Sequence[str] | None = None, *,
                 alpha: float = 0.05, n_resamples: int = 10_000, ci_seed: int = 0) -> dict:
    """Drift of every method against the study's reference method (``reference_method``,
    default ``full``), for studies with more than the two methods of Tables 3 and 4;
    returns ``{"rows", "notes", ...}``.

    Writes ``RUN_DIR/drift/methods.json`` and ``methods.csv``: per task, tested drift
    measure (:data:`~loralens.analysis.drift.measures.DRIFT_MEASURES`) and method, the
    drift averaged over the states of ``drift.layers`` (mean, sd and each seed's value), and
    the method against the reference, seed-paired (:func:`.stats.compare`: paired t-test,
    Bonferroni over the tests made: (methods other than the reference and the head-only
    ones) x configured tasks x measures, Cohen's d of reference - method, positive when the
    reference drifts more; Delta% = 100 (drift_ref - drift_method) / drift_ref), and, beside
    them, each method's study metric against the reference's
    (:func:`.stats.method_accuracy`).

    A method of the ``head`` family trains only the classification head: its backbone is
    the base model's, its drift 0 by construction, so its tests are undefined (never
    significant, in no family) and say so.
    """
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
                rows.append(_method_row(task, measure, m, ref, means, n_tests, alpha, n_resamples,
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
    files = [run.drift_methods_json, run.drift_methods_csv]
    atomic_write_json(files[0], {**meta, "rows": rows, "notes": notes})
    write_csv(files[1], [{k: _cell(r.get(k)) for k in CSV_KEYS} for r in rows], list(CSV_KEYS))
    return {**meta, "rows": rows, "notes": notes, "files": [str(f) for f in files]}


def _method_row(task, measure, m, ref, means, n_tests, alpha, n_resamples, ci_seed, cfg) -> dict:
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


def _cell(v):
    if isinstance(v, dict):
        return ";".join(f"{k}={x:.6g}" for k, x in v.items())
    return v


def summary_lines(result: dict) -> list[str]:
    """One line per task for the command line: drift (1 - debiased CKA, comparable across
    tasks) per method and Delta%, then biased CKA's means, the published column (its bias
    depends on examples vs dimensions, so tasks cannot be compared on it)."""
    lines = []
    for e in result["table4"]:
        measures = e["measures"]
        form = "debiased" if "cka_debiased" in measures else "biased"
        c = measures["cka_debiased"] if form == "debiased" else measures["cka"]
        b = measures.get("cka") if form == "debiased" else None

        def fmt(s):
            return "n/a" if not s else f"{s['mean']:.4f}" + (
                f" ± {s['sd']:.4f}" if s.get("sd") is not None else "")

        delta = "n/a" if c.get("delta_percent") is None else f"{c['delta_percent']:+.1f}%"
        if c.get("zero_spread"):
            p = ", p undefined (zero spread)"
        elif c.get("p") is None:
            p = ""
        else:
            p = f", p = {c['p']:.3g} (Bonferroni over {c['n_tests']}: {c['p_bonferroni']:.3g})"
        published = (f"; biased CKA, the published column: LoRA {fmt(b['lora'])}, full "
                     f"{fmt(b['full'])}" if b else "")
        lines.append(f"drift {e['task']} (1 - {form} CKA over states "
                     f"{states_text(e['layers'])}, {e['n_examples']} examples of "
                     f"{e['requested']} requested): LoRA {fmt(c['lora'])}, full "
                     f"{fmt(c['full'])}, Delta {delta}{p}{published}")
    lines += [f"note: {n}" for n in result["notes"]]
    return lines
