"""Drift statistics: the test families (declared in :mod:`loralens.analysis.families`,
corrected by :func:`correct_drift`), LoRA vs full fine-tuning comparisons
(:func:`compare`, :func:`describe`), and Table 3 (scores per task, with example-level
McNemar tests over the validation logits); for a study of more methods, each method's
score against the reference method's (:func:`method_accuracy`).

Zero spread of the paired differences is undefined, never significant
(:mod:`loralens.analysis.stats`); where a statistic is undefined the value is null and a note says why.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from loralens.tasks import rows as D
from loralens.tasks import sources as TS
from loralens.analysis import families as F
from loralens.analysis import stats
from loralens.analysis.drift.measures import DRIFT_MEASURES, PAIR, SCORE_SIGN
from loralens.core.run_dir import RunDir
from loralens.core.files import read_json
from loralens.tasks.registry import get_task


# --------------------------------------------------------------------------- families

def families(tasks: Sequence[str], seeds: Sequence[int],
             n_drift_states: int | Sequence[int] | None, alpha: float,
             correction: str = "bonferroni") -> dict:
    """The drift stage's test families (declared in :mod:`loralens.analysis.families`), as
    stored in table4.json: the tests the study makes, from the config's tasks and seeds
    (whether or not each is computed yet, so a correction never changes with the tasks a
    command selected or the order they finish in).

    - ``table3``: the study metric of each task (accuracy; F1 for MRPC), paired t-test by
      seed: one test per task.
    - ``table4 <measure>``: one family per drift measure (biased CKA, debiased CKA,
      cosine), members the tasks; ``table4`` (the first measure's) gives their common size.
    - ``per_layer <measure>``: each selected state of each task, one family per measure;
      ``per_layer`` gives their common size.
    - ``examples``: one exact McNemar test per task and seed.

    ``n_drift_states``: the selected states (indices), or their number.
    ``correction``: ``holm`` or ``bonferroni`` (``stats.correction``), applied by
    :func:`correct_drift` once every test of the stage is computed.
    """
    fams = {k: f.to_dict() for k, f in F.drift_families(tasks, seeds, n_drift_states, alpha,
                                                        correction).items()}
    first = next(iter(DRIFT_MEASURES))

    def per_measure(name: str, what: str) -> dict:
        one = fams[f"{name} {first}"]
        return {**one, "name": name, "members": [m.replace(f" {first}", "", 1)
                                                 for m in one["members"]],
                "description": f"{what}, per drift measure ({', '.join(DRIFT_MEASURES)}), "
                               "paired t-test by seed",
                "one_per_measure": True}

    out = {"table3": fams["table3"], "table4": per_measure("table4", "the configured tasks"),
           "examples": fams["examples"]}
    if f"per_layer {first}" in fams:
        out["per_layer"] = per_measure("per_layer", "states of drift.layers x configured "
                                                    "tasks")
    out.update({k: v for k, v in fams.items() if k not in out})
    return out


def correct_drift(fam: dict, table3: list[dict], table4: list[dict]) -> None:
    """Correct every test of Tables 3 and 4 (per layer included) within its declared family
    (``fam``: :func:`families`), in place, once all are computed: Holm needs the family's
    p-values together. Adds ``p_adjusted``, ``correction``, ``test_family``; ``significant``
    follows ``p_adjusted``. A zero-spread test stays in its family as undefined."""
    def family(name: str) -> F.Family | None:
        return F.Family.from_dict(fam[name]) if name in fam else None

    groups: dict[str, dict[str, dict]] = {}
    for e in table4:
        for measure, c in (e.get("measures") or {}).items():
            if measure in DRIFT_MEASURES:
                groups.setdefault(f"table4 {measure}", {})[f"{e['task']} {measure}"] = c
        for measure, rows in (e.get("per_layer") or {}).items():
            for c in rows:
                if c.get("in_drift"):
                    groups.setdefault(f"per_layer {measure}", {})[
                        f"{e['task']} {measure} state {c['layer']}"] = c
    for e in table3:
        metric = e.get("selection_metric")
        if metric in (e.get("metrics") or {}):
            groups.setdefault("table3", {})[f"{e['task']} {metric}"] = e["metrics"][metric]
        for c in e.get("example_level") or []:
            groups.setdefault("examples", {})[f"{e['task']} seed {c['seed']}"] = c
    for name, tests in groups.items():
        f = family(name)
        if f is None:
            continue
        # a test the config did not declare (a seed outside cfg.seeds): shown, not corrected
        for k in [k for k in tests if k not in f.members]:
            c = tests.pop(k)
            c.update({"p_adjusted": None, "significant": None, "correction": None,
                      "note": f"{k} is not in the declared family {name} (from the config): "
                              "p shown uncorrected, no significance call"})
        F.apply(f, tests)


# --------------------------------------------------------------------------- statistics

def compare(lora: dict[int, float], full: dict[int, float], n_tests: int, alpha: float = 0.05,
            n_resamples: int = 10_000, ci_seed: int = 0, sign: str = SCORE_SIGN) -> dict:
    """LoRA vs full fine-tuning for one quantity, given ``{seed: value}`` per method.

    Seeds present for both methods are paired; with at least two pairs the result is
    :func:`stats.compare_methods` (``sign``: the difference t and Cohen's d are of).
    Otherwise the same keys are returned with the paired statistics (t, p, CIs, d, sd)
    set to None and a ``note`` saying why, so one seed (the smoke preset) gives means and
    Delta% but no test.

    Adds ``alpha_per_test`` (alpha / n_tests, Bonferroni), ``unpaired_seeds`` and
    ``bootstrap`` (settings, and how many distinct resamples the seeds allow).
    """
    paired = sorted(set(lora) & set(full))
    unpaired = {m: sorted(set(v) - set(paired)) for m, v in (("lora", lora), ("full", full))}
    if len(paired) >= 2:
        out = stats.compare_methods([lora[s] for s in paired], [full[s] for s in paired],
                                    paired, n_tests=n_tests, alpha=alpha,
                                    n_resamples=n_resamples, seed=ci_seed, sign=sign)
    else:
        out = _untested(lora, full, paired, n_tests, alpha, sign)
    out["tested"] = True
    out["alpha_per_test"] = stats.bonferroni_alpha(n_tests, alpha)
    out["unpaired_seeds"] = unpaired
    out["bootstrap"] = {"n_resamples": n_resamples, "seed": ci_seed, "confidence": 0.95,
                        "distinct_resamples": stats.distinct_resamples(len(paired))
                        if paired else None}
    return out


def describe(c: dict, why: str) -> dict:
    """``c`` as a descriptive comparison: means and Delta% kept, no test (not in a family)."""
    for k in ("t", "p", "p_bonferroni", "significant", "cohens_d", "n_tests",
              "alpha_per_test"):
        c[k] = None
    c["tested"] = False
    c["zero_spread"] = None
    c["note"] = why
    return c


def _untested(lora: dict[int, float], full: dict[int, float], paired: list[int], n_tests: int,
              alpha: float, sign: str) -> dict:
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
            "delta_percent": delta, "delta_percent_ci": None,
            "bootstrap_distinct_resamples": None, "sign": sign, "t": None, "p": None,
            "n_tests": int(n_tests), "alpha": float(alpha), "p_bonferroni": None,
            "significant": None, "cohens_d": None, "zero_spread": None,
            "test": f"two-sided paired t-test (scipy.stats.ttest_rel) of {sign}, "
                    "paired by seed", "note": why}


# --------------------------------------------------------------------------- Table 3

def accuracy_table(run: RunDir, tasks: Sequence[str], alpha: float = 0.05,
                   n_resamples: int = 10_000, ci_seed: int = 0,
                   notes: list[str] | None = None, *, family_tasks: Sequence[str] | None = None,
                   family_seeds: Sequence[int] | None = None,
                   glue_dir: str | None = None) -> list[dict]:
    """Table 3 per task, from the jobs' metrics.json and val_logits.npy.

    Per task the study metric (``TaskSpec.metric``: accuracy; F1 for MRPC) is compared
    with a paired t-test by seed, Bonferroni over ``family_tasks`` (default ``tasks``);
    accuracy is shown beside F1 for MRPC, descriptive. ``example_level`` holds, per seed
    with both methods' logits, the exact McNemar test over validation examples
    (Bonferroni over ``family_tasks`` x ``family_seeds``) and Wilson intervals.
    """
    notes = notes if notes is not None else []
    family_tasks = list(family_tasks or tasks)
    jobs = run.finished_jobs()
    rows = []
    for task in tasks:
        spec = get_task(task)
        metrics = {(m, s): read_json(run.metrics_path(task, m, s))
                   for t, m, s in jobs if t == task}
        if not metrics:
            notes.append(f"{task}: no finished training job; no accuracy row")
            continue
        first = next(iter(metrics.values()))
        entry = {"task": task, "selection_metric": spec.metric,
                 "n_validation": sorted({int(m["validation"]["n"]) for m in metrics.values()}),
                 "majority_baseline": first.get("majority_baseline"),
                 "model": first.get("model"), "model_note": first.get("model_note"),
                 "metrics": {}}
        if len(entry["n_validation"]) > 1:
            notes.append(f"{task}: jobs were evaluated on different numbers of validation rows "
                         f"{entry['n_validation']}")
        for metric in spec.metrics:
            by = {meth: {s: float(m["validation"][metric]) for (mm, s), m in metrics.items()
                         if mm == meth} for meth in PAIR}
            c = compare(by["lora"], by["full"], len(family_tasks), alpha, n_resamples, ci_seed,
                        SCORE_SIGN)
            if metric != spec.metric:
                describe(c, f"descriptive: {metric} is not {task}'s study metric "
                            f"({spec.metric}), so it is not tested")
            # Delta% is a drift-reduction quantity; for scores the signed difference reads better.
            c.pop("delta_percent"), c.pop("delta_percent_ci")
            c["difference"] = (c["lora"]["mean"] - c["full"]["mean"]
                               if c["lora"] and c["full"] else None)
            c["all_seeds"] = {meth: by[meth] for meth in PAIR}
            entry["metrics"][metric] = c
        seeds = family_seeds or sorted({s for (_, s) in metrics})
        entry["example_level"] = example_tests(
            run, task, metrics, len(family_tasks) * len(seeds), alpha, glue_dir, notes)
        rows.append(entry)
    return rows


def validation_labels(task: str, glue_dir: str | None, n: int) -> tuple[np.ndarray | None, str]:
    """Labels of the validation split in split order (the order of val_logits.npy), read
    from the GLUE files (``glue_dir``, else $LORALENS_GLUE_DIR); ``(None, why)`` when there
    are none (never the hub: the drift stage must not wait on a network)."""
    spec = get_task(task)
    try:
        root = D.resolve_glue_dir(glue_dir)
        if root is None and spec.source("files") is None:  # local task files: no network
            return None, "no GLUE directory (data.glue_dir or $LORALENS_GLUE_DIR)"
        split = TS.load_split(spec, "validation", root)
    except D.DataError as e:
        return None, str(e)
    if len(split) != n:
        return None, f"{split.source} has {len(split)} rows, the logits {n}"
    return split.labels, split.source


def example_tests(run: RunDir, task: str, metrics: dict, n_tests: int, alpha: float,
                  glue_dir: str | None, notes: list[str]) -> list[dict]:
    """LoRA vs full fine-tuning of one seed over the validation examples, per seed.

    From each job's ``val_logits.npy`` (whole validation split, split order): the
    discordant examples ``b`` (LoRA right, full wrong) and ``c`` (the reverse), the exact
    McNemar test (:func:`stats.exact_mcnemar`, Bonferroni over ``n_tests``) and a 95%
    Wilson interval on each accuracy. Labels come from the GLUE files; without them, for a
    binary task, ``b`` and ``c`` follow from the predictions and the two accuracies in
    metrics.json (two different predictions of a binary label: exactly one is right, so
    ``b + c`` = disagreements and ``b - c = n (accuracy_lora - accuracy_full)``).
    """
    spec = get_task(task)
    seeds = sorted(set.intersection(*({s for (m, s) in metrics if m == meth} for meth in PAIR)))
    have = [s for s in seeds if all(run.val_logits_path(task, m, s).is_file() for m in PAIR)]
    if set(seeds) - set(have):
        notes.append(f"{task}: no val_logits.npy for seed(s) {sorted(set(seeds) - set(have))}; "
                     "no example-level test there")
    out, labels, source = [], None, None
    for s in have:
        logits = {m: np.load(run.val_logits_path(task, m, s)) for m in PAIR}
        pred = {m: np.asarray(v).argmax(axis=1) for m, v in logits.items()}
        n = len(pred["lora"])
        acc = {m: float(metrics[(m, s)]["validation"]["accuracy"]) for m in PAIR}
        if len(pred["full"]) != n:
            notes.append(f"{task} seed {s}: val_logits.npy of LoRA and full fine-tuning have "
                         f"{n} and {len(pred['full'])} rows; no example-level test")
            continue
        if labels is None and source is None:
            labels, source = validation_labels(task, glue_dir, n)
        if labels is not None:
            right = {m: pred[m] == labels for m in PAIR}
            b = int(np.sum(right["lora"] & ~right["full"]))
            c = int(np.sum(~right["lora"] & right["full"]))
            k = {m: int(right[m].sum()) for m in PAIR}
            how = f"labels from {source}"
            for m in PAIR:
                if abs(k[m] / n - acc[m]) > 1e-9:
                    notes.append(f"{task} seed {s}: {m}'s val_logits.npy give accuracy "
                                 f"{k[m] / n:.4f}, its metrics.json {acc[m]:.4f}")
        elif spec.num_labels == 2:
            kf = {m: n * acc[m] for m in PAIR}
            dis = int(np.sum(pred["lora"] != pred["full"]))
            diff = round(kf["lora"] - kf["full"])
            if any(abs(v - round(v)) > 1e-6 for v in kf.values()) or abs(diff) > dis \
                    or (dis + diff) % 2:
                notes.append(f"{task} seed {s}: the accuracies in metrics.json do not fit "
                             f"val_logits.npy ({n} rows) and there are no labels ({source}); "
                             "no example-level test")
                continue
            b, c = (dis + diff) // 2, (dis - diff) // 2
            k = {m: round(kf[m]) for m in PAIR}
            how = ("derived from the predictions and the accuracies in metrics.json (binary "
                   f"labels; {source})")
        else:
            notes.append(f"{task} seed {s}: no labels ({source}); no example-level test")
            continue
        p = stats.exact_mcnemar(b, c)
        p_adj = stats.bonferroni(p, n_tests)
        out.append({
            "seed": s, "n": n,
            **{m: {"correct": k[m], "accuracy": k[m] / n,
                   "ci": list(stats.wilson_interval(k[m], n))} for m in PAIR},
            "lora_right_full_wrong": b, "lora_wrong_full_right": c,
            "p": p, "n_tests": n_tests, "alpha": alpha,
            "alpha_per_test": stats.bonferroni_alpha(n_tests, alpha), "p_bonferroni": p_adj,
            "significant": bool(p_adj < alpha), "labels": how,
            "test": "exact McNemar (two-sided binomial test of b against b + c, p = 1/2)",
            "interval": "95% Wilson score interval"})
    return out


# --------------------------------------------------------------------------- more methods

def job_scores(run: RunDir, tasks: Sequence[str]) -> dict:
    """``{(task, method, seed): study metric on the validation split}`` of finished jobs."""
    out = {}
    for t, m, s in run.finished_jobs():
        if t in tasks:
            v = (read_json(run.metrics_path(t, m, s)).get("validation") or {}).get(
                get_task(t).metric)
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[(t, m, s)] = float(v)
    return out


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
