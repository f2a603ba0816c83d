"""Drift: similarity of every trained model to the base model, layer by layer, and the tables.

Reads what ``extract`` wrote (``RUN_DIR/extract/<task>/``) and the jobs' ``metrics.json``,
and writes under ``RUN_DIR/drift/``:

- ``layers.csv`` / ``layers.json``: one row per task, method, seed and layer (layer 0 =
  embedding output): linear CKA (biased and debiased), mean cosine of paired examples,
  orthogonal Procrustes distance and RBF CKA, all against the base model on the same
  examples, with drift = 1 - CKA, and the real number of examples next to the numbers.
- ``table3.csv`` / ``table3.json``: the study's Table 3, accuracy and F1 per task and
  method (mean, sd over seeds, each seed's value), the majority baseline, and LoRA vs
  full fine-tuning (paired t-test by seed, Bonferroni over tasks, Cohen's d).
- ``table4.csv`` / ``table4.json``: the study's Table 4, per task and measure (biased
  CKA, debiased CKA, cosine) the drift averaged over layers per method, Delta% =
  100 (drift_full - drift_lora) / drift_full with a seed-paired bootstrap CI, the paired
  t-test, Bonferroni over tasks and Cohen's d; the JSON adds the same statistics per
  layer.

The numbers come from :mod:`loralens.similarity` (linear CKA through
``cka_against_base``: the base model's Gram matrix once per layer) and
:func:`loralens.stats.compare_methods`. Where a statistic is undefined (one seed, one
method, a degenerate layer) the value is null and a note says why; nothing is left out
silently.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from . import similarity, stats
from .config import StudyConfig
from .extract import BASE_KEY, job_fingerprint, load_task
from .store import DRIFT_FILES, RunDir, RunDirError, atomic_write_json, read_json, write_csv
from .tasks import get_task

# Per-layer measures (similarity to the base model) and the ones summarised as drift.
MEASURES = ("cka", "cka_debiased", "cosine", "procrustes", "cka_rbf")
DRIFT_MEASURES = {"cka": "1 - linear CKA (biased)", "cka_debiased": "1 - linear CKA (debiased)",
                  "cosine": "1 - mean cosine of paired examples"}
ACCURACY_METRICS = ("accuracy", "f1")
PAIR = ("lora", "full")


# --------------------------------------------------------------------------- per layer

def layer_similarities(base: np.ndarray, models: dict[str, np.ndarray],
                       notes: list[str] | None = None, label: str = "") -> dict[str, dict]:
    """Every measure, every layer, every model against the base: ``{key: {measure: [L]}}``.

    Args:
        base: ``[n, layers, d]`` pooled states of the base model.
        models: ``{key: [n, layers, d]}`` of the compared models (same examples, order).
        notes: list that receives one line per value that could not be computed (the
            value is then NaN).

    Returns:
        For each key a dict of float64 arrays ``[layers]``: ``cka`` and
        ``cka_debiased`` (linear CKA, via :func:`similarity.cka_against_base`),
        ``cosine``, ``procrustes`` (a distance: 0 = same up to rotation and scale) and
        ``cka_rbf`` (Gaussian kernel, biased).
    """
    notes = notes if notes is not None else []
    keys = list(models)
    n_layers = base.shape[1]
    out = {k: {} for k in keys}
    for name, debiased in (("cka", False), ("cka_debiased", True)):
        try:
            table = similarity.cka_against_base(base, models, debiased=debiased)
        except ValueError as e:
            notes.append(f"{label}{name}: {e}; computed pair by pair instead")
            table = _cka_pair_by_pair(base, models, debiased, notes, label, name)
        for j, k in enumerate(keys):
            out[k][name] = np.asarray(table[j], dtype=np.float64)
    pairwise = {"cosine": similarity.cosine_similarity,
                "procrustes": similarity.procrustes_distance, "cka_rbf": similarity.rbf_cka}
    for k in keys:
        for name, fn in pairwise.items():
            out[k][name] = np.array([
                _safe(lambda: fn(base[:, i], models[k][:, i]), notes,
                      f"{label}{k} layer {i} {name}") for i in range(n_layers)])
    return out


def _cka_pair_by_pair(base: np.ndarray, models: dict[str, np.ndarray], debiased: bool,
                      notes: list[str], label: str, name: str) -> np.ndarray:
    """``[models, layers]`` linear CKA one pair at a time (NaN, with a note, where undefined)."""
    n_layers = base.shape[1]
    return np.array([[_safe(lambda: similarity.linear_cka(base[:, i], models[k][:, i],
                                                          debiased=debiased),
                            notes, f"{label}{k} layer {i} {name}")
                      for i in range(n_layers)] for k in models]).reshape(len(models), n_layers)


def _safe(fn, notes: list[str], what: str) -> float:
    try:
        return float(fn())
    except ValueError as e:
        notes.append(f"{what}: undefined ({e})")
        return math.nan


# --------------------------------------------------------------------------- statistics

def compare(lora: dict[int, float], full: dict[int, float], n_tests: int, alpha: float = 0.05,
            n_resamples: int = 10_000, ci_seed: int = 0) -> dict:
    """LoRA vs full fine-tuning for one quantity, given ``{seed: value}`` per method.

    Seeds present for both methods are paired; with at least two pairs the result is
    :func:`stats.compare_methods`. Otherwise the same keys are returned with the
    paired statistics (t, p, CIs, d, sd) set to None and a ``note`` saying why, so one
    seed (the smoke preset) gives means and Delta% but no test.

    Adds ``alpha_per_test`` (alpha / n_tests, Bonferroni) and ``unpaired_seeds``.
    """
    paired = sorted(set(lora) & set(full))
    unpaired = {m: sorted(set(v) - set(paired)) for m, v in (("lora", lora), ("full", full))}
    if len(paired) >= 2:
        out = stats.compare_methods([lora[s] for s in paired], [full[s] for s in paired],
                                    paired, n_tests=n_tests, alpha=alpha,
                                    n_resamples=n_resamples, seed=ci_seed)
        out["note"] = None
    else:
        out = _untested(lora, full, paired, n_tests, alpha)
    out["alpha_per_test"] = stats.bonferroni_alpha(n_tests, alpha)
    out["unpaired_seeds"] = unpaired
    out["bootstrap"] = {"n_resamples": n_resamples, "seed": ci_seed, "confidence": 0.95}
    return out


def _untested(lora: dict[int, float], full: dict[int, float], paired: list[int], n_tests: int,
              alpha: float) -> dict:
    """:func:`compare`'s keys for fewer than two paired seeds: means and Delta%, no test."""
    def summary(values: dict[int, float]) -> dict | None:
        seeds = paired or sorted(values)
        if not seeds:
            return None
        x = np.array([values[s] for s in seeds], dtype=np.float64)
        return {"mean": float(x.mean()), "sd": float(x.std(ddof=1)) if x.size > 1 else None,
                "per_seed": [float(v) for v in x], "ci": None}

    lo, fu = summary(lora), summary(full)
    delta = None
    if lo and fu and paired and fu["mean"] != 0.0:
        delta = stats.delta_percent([full[s] for s in paired], [lora[s] for s in paired])
    if not lora or not full:
        why = f"only {'LoRA' if lora else 'full fine-tuning' if full else 'no method'} " \
              "results: no comparison"
    else:
        why = (f"{len(paired)} seed(s) with both methods: the paired t-test, Cohen's d and "
               "the bootstrap CIs need at least 2 paired seeds, so they are null")
    return {"seeds": paired, "n_seeds": len(paired), "lora": lo, "full": fu,
            "delta_percent": delta, "delta_percent_ci": None, "t": None, "p": None,
            "n_tests": int(n_tests), "alpha": float(alpha), "p_bonferroni": None,
            "significant": None, "cohens_d": None,
            "test": "two-sided paired t-test (scipy.stats.ttest_rel) of lora - full, "
                    "paired by seed", "note": why}


def accuracy_table(run: RunDir, tasks: Sequence[str], alpha: float = 0.05,
                   n_resamples: int = 10_000, ci_seed: int = 0,
                   notes: list[str] | None = None) -> list[dict]:
    """Table 3: accuracy and F1 per task and method over seeds, from the jobs' metrics.json."""
    notes = notes if notes is not None else []
    jobs = run.finished_jobs()
    rows = []
    for task in tasks:
        metrics = {(m, s): read_json(run.metrics_path(task, m, s))
                   for t, m, s in jobs if t == task}
        if not metrics:
            notes.append(f"{task}: no finished training job; no accuracy row")
            continue
        first = next(iter(metrics.values()))
        entry = {"task": task, "selection_metric": get_task(task).metric,
                 "n_validation": sorted({int(m["validation"]["n"]) for m in metrics.values()}),
                 "majority_baseline": first.get("majority_baseline"),
                 "model": first.get("model"), "model_note": first.get("model_note"),
                 "metrics": {}}
        if len(entry["n_validation"]) > 1:
            notes.append(f"{task}: jobs were evaluated on different numbers of validation rows "
                         f"{entry['n_validation']}")
        for metric in ACCURACY_METRICS:
            by = {meth: {s: float(m["validation"][metric]) for (mm, s), m in metrics.items()
                         if mm == meth} for meth in PAIR}
            c = compare(by["lora"], by["full"], len(tasks), alpha, n_resamples, ci_seed)
            # Delta% is a drift-reduction quantity; for scores the signed difference reads better.
            c.pop("delta_percent"), c.pop("delta_percent_ci")
            c["difference"] = (c["lora"]["mean"] - c["full"]["mean"]
                               if c["lora"] and c["full"] else None)
            c["all_seeds"] = {meth: by[meth] for meth in PAIR}
            entry["metrics"][metric] = c
        rows.append(entry)
    return rows


# --------------------------------------------------------------------------- stage

def run_drift(cfg: StudyConfig, run: RunDir, tasks: Sequence[str] | None = None, *,
              first_layer: int = 0, alpha: float = 0.05, n_resamples: int = 10_000,
              ci_seed: int = 0, progress: bool = True) -> dict:
    """Compute per-layer similarities and Tables 3 and 4; write them under RUN_DIR/drift/.

    Args:
        cfg: the run's config (``cfg.tasks`` is the default task list).
        run: the run directory (reads extract/ and models/).
        tasks: tasks to include; the Bonferroni family size is ``len(tasks)``.
        first_layer: first layer in the layer-averaged drift of Table 4 (0 includes the
            embedding output; every layer is always in layers.csv).
        alpha: family-wise significance level (per test: alpha / len(tasks)).
        n_resamples, ci_seed: bootstrap resamples and seed (95% percentile intervals).
        progress: accepted for a uniform stage signature; the stage takes seconds and
            shows no bar.

    Returns:
        ``{"layers": [...], "table3": [...], "table4": [...], "notes": [...],
        "files": [...]}``, the content of the files written.
    """
    tasks = list(tasks or cfg.tasks)
    n_tests = len(tasks)
    notes: list[str] = []
    finished = run.finished_jobs()
    layer_rows: list[dict] = []
    table4: list[dict] = []
    meta = {"model": cfg.model.name, "alpha": alpha, "n_tests": n_tests,
            "alpha_per_test": stats.bonferroni_alpha(n_tests, alpha),
            "bootstrap": {"n_resamples": n_resamples, "seed": ci_seed, "confidence": 0.95},
            "layer_numbering": "0 = embedding output, i = output of transformer block i"}
    for task in tasks:
        loaded = _load_extracted(run, task, finished, notes)
        if loaded is None:
            continue
        manifest, base, arrays = loaded
        meta.setdefault("model_note", manifest.get("model_note"))
        sims = layer_similarities(base, arrays, notes, f"{task}: ")
        layer_rows += _layer_rows(task, manifest, sims, base.shape[1])
        table4.append(_drift_summary(task, manifest, manifest["models"], sims, base.shape[1],
                                     first_layer, n_tests, alpha, n_resamples, ci_seed, notes))
    table3 = accuracy_table(run, tasks, alpha, n_resamples, ci_seed, notes)

    files = _write_outputs(run, meta, notes, layer_rows, table3, table4, first_layer)
    return {"layers": layer_rows, "table3": table3, "table4": table4, "notes": notes,
            "files": files, **meta}


def _load_extracted(run: RunDir, task: str, finished: list,
                    notes: list[str]) -> tuple[dict, np.ndarray, dict] | None:
    """``(manifest, base [n, layers, d], {model key: [n, layers, d]})`` of one task, or
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


def _layer_rows(task: str, manifest: dict, sims: dict[str, dict], n_layers: int) -> list[dict]:
    """layers.csv rows of one task: one per model and layer."""
    n, requested = int(manifest["n_examples"]), int(manifest["requested"])
    rows = []
    for key, per in sims.items():
        e = manifest["models"][key]
        for layer in range(n_layers):
            row = {"task": task, "method": e["method"], "seed": e["seed"], "model": key,
                   "layer": layer, "n_examples": n, "requested": requested}
            row.update({m: _num(per[m][layer]) for m in MEASURES})
            row["drift"] = _num(1.0 - per["cka"][layer])
            row["drift_debiased"] = _num(1.0 - per["cka_debiased"][layer])
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


def _drift_summary(task, manifest, entries, sims, n_layers, first_layer, n_tests, alpha,
                   n_resamples, ci_seed, notes) -> dict:
    if not 0 <= first_layer < n_layers:
        raise ValueError(f"first_layer={first_layer} outside 0..{n_layers - 1}")
    by_method = {m: {entries[k]["seed"]: k for k in sims if entries[k]["method"] == m}
                 for m in PAIR}
    entry = {"task": task, "n_examples": int(manifest["n_examples"]),
             "requested": int(manifest["requested"]), "sample_seed": manifest["seed"],
             "n_layers": n_layers, "layers_averaged": [first_layer, n_layers - 1],
             "seeds": {m: sorted(v) for m, v in by_method.items()},
             "measures": {}, "per_layer": {}}
    for measure, label in DRIFT_MEASURES.items():
        drift = {m: {s: 1.0 - sims[k][measure] for s, k in by_method[m].items()} for m in PAIR}
        mean = {}
        for m in PAIR:
            mean[m] = {}
            for s, d in drift[m].items():
                v = float(np.mean(d[first_layer:]))
                if math.isfinite(v):
                    mean[m][s] = v
                else:
                    notes.append(f"{task}: {m}-seed{s} {measure}: some layer is undefined; "
                                 "left out of the layer average")
        c = compare(mean["lora"], mean["full"], n_tests, alpha, n_resamples, ci_seed)
        entry["measures"][measure] = {"drift": label, **c}
        per_layer = []
        for layer in range(n_layers):
            lo = {s: float(d[layer]) for s, d in drift["lora"].items() if math.isfinite(d[layer])}
            fu = {s: float(d[layer]) for s, d in drift["full"].items() if math.isfinite(d[layer])}
            per_layer.append({"layer": layer, **compare(lo, fu, n_tests, alpha, n_resamples,
                                                         ci_seed)})
        entry["per_layer"][measure] = per_layer
    notes_task = {c["note"] for c in entry["measures"].values() if c.get("note")}
    for note in sorted(notes_task):
        notes.append(f"{task}: {note}")
    return entry


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------- files

LAYER_COLUMNS = ("task", "method", "seed", "model", "layer", "n_examples", "requested",
                 *MEASURES, "drift", "drift_debiased")
TABLE3_COLUMNS = ("task", "metric", "n_validation", "majority_baseline", "lora_mean", "lora_sd",
                  "lora_per_seed", "full_mean", "full_sd", "full_per_seed", "difference",
                  "n_seeds", "t", "p", "p_bonferroni", "alpha_per_test", "significant",
                  "cohens_d", "note")
TABLE4_COLUMNS = ("task", "measure", "drift", "n_examples", "requested", "layers_averaged",
                  "n_seeds", "lora_mean", "lora_sd", "lora_ci_low", "lora_ci_high",
                  "lora_per_seed", "full_mean", "full_sd", "full_ci_low", "full_ci_high",
                  "full_per_seed", "delta_percent", "delta_ci_low", "delta_ci_high", "t", "p",
                  "p_bonferroni", "alpha_per_test", "significant", "cohens_d", "note")


def _method_cells(c: dict, m: str) -> dict:
    s = c.get(m) or {}
    ci = s.get("ci") or [None, None]
    return {f"{m}_mean": s.get("mean"), f"{m}_sd": s.get("sd"), f"{m}_ci_low": ci[0],
            f"{m}_ci_high": ci[1], f"{m}_per_seed": s.get("per_seed")}


def _test_cells(c: dict) -> dict:
    return {k: c.get(k) for k in ("n_seeds", "t", "p", "p_bonferroni", "alpha_per_test",
                                  "significant", "cohens_d", "note")}


def table3_rows(table3: list[dict]) -> list[dict]:
    rows = []
    for e in table3:
        for metric, c in e["metrics"].items():
            base = e.get("majority_baseline") or {}
            rows.append({"task": e["task"], "metric": metric, "n_validation": e["n_validation"],
                         "majority_baseline": base.get(metric), "difference": c["difference"],
                         **_method_cells(c, "lora"), **_method_cells(c, "full"),
                         **_test_cells(c)})
    return rows


def table4_rows(table4: list[dict]) -> list[dict]:
    rows = []
    for e in table4:
        for measure, c in e["measures"].items():
            ci = c.get("delta_percent_ci") or [None, None]
            rows.append({"task": e["task"], "measure": measure, "drift": c["drift"],
                         "n_examples": e["n_examples"], "requested": e["requested"],
                         "layers_averaged": "{}..{}".format(*e["layers_averaged"]),
                         "delta_percent": c["delta_percent"], "delta_ci_low": ci[0],
                         "delta_ci_high": ci[1], **_method_cells(c, "lora"),
                         **_method_cells(c, "full"), **_test_cells(c)})
    return rows


def _write_outputs(run: RunDir, meta, notes, layer_rows, table3, table4,
                   first_layer) -> list[str]:
    write_csv(run.drift_path("layers.csv"), layer_rows, LAYER_COLUMNS)
    write_csv(run.drift_path("table3.csv"), table3_rows(table3), TABLE3_COLUMNS)
    write_csv(run.drift_path("table4.csv"), table4_rows(table4), TABLE4_COLUMNS)
    common = {**meta, "notes": notes}
    atomic_write_json(run.drift_path("layers.json"), {**common, "columns": list(LAYER_COLUMNS),
                                                      "rows": layer_rows})
    atomic_write_json(run.drift_path("table3.json"), {**common, "table": "3: accuracy and F1",
                                                      "tasks": table3})
    atomic_write_json(run.drift_path("table4.json"), {
        **common, "table": "4: representation drift to the base model",
        "first_layer": first_layer,
        "delta_percent": "100 * (drift_full - drift_lora) / drift_full, means over seeds first",
        "tasks": table4})
    return [str(run.drift_path(n)) for n in DRIFT_FILES]


def summary_lines(result: dict) -> list[str]:
    """One line per task for the command line: drift (1 - CKA) per method and Delta%."""
    lines = []
    for e in result["table4"]:
        c = e["measures"]["cka"]

        def fmt(s):
            return "n/a" if not s else f"{s['mean']:.4f}" + (
                f" ± {s['sd']:.4f}" if s.get("sd") is not None else "")

        delta = "n/a" if c["delta_percent"] is None else f"{c['delta_percent']:+.1f}%"
        p = "" if c["p"] is None else f", p = {c['p']:.3g} (Bonferroni {c['p_bonferroni']:.3g})"
        lines.append(f"drift {e['task']} (1 - CKA, {e['n_examples']} examples of "
                     f"{e['requested']} requested): LoRA {fmt(c['lora'])}, full {fmt(c['full'])}, "
                     f"Delta {delta}{p}")
    lines += [f"note: {n}" for n in result["notes"]]
    return lines
