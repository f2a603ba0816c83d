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
significant (:mod:`loralens.stats`). Where a statistic is undefined (one seed, one method,
a degenerate layer) the value is null and a note says why; nothing is left out silently.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from . import data as D
from . import similarity, stats
from .config import ConfigError, StudyConfig, parse_layers
from .extract import BASE_KEY, job_fingerprint, load_task
from .store import DRIFT_FILES, RunDir, RunDirError, atomic_write_json, read_json, write_csv
from .tasks import get_task

# Per-layer measures (similarity to the base model).
MEASURES = ("cka", "cka_debiased", "cka_std", "cka_std_debiased", "cosine", "procrustes",
            "cka_rbf")
# Drift measures of Table 4 that are tested (the family: these x tasks).
DRIFT_MEASURES = {"cka": "1 - linear CKA (biased)", "cka_debiased": "1 - linear CKA (debiased)",
                  "cosine": "1 - mean cosine of paired examples"}
# Shown beside them, descriptive (not tested, in no family).
STD_MEASURES = {"cka_std": "1 - linear CKA of features standardised per dimension (biased)",
                "cka_std_debiased": "1 - linear CKA of features standardised per dimension "
                                    "(debiased)"}
PAIR = ("lora", "full")
TOP_KS = (1, 5)
DRIFT_SIGN = "full - lora"   # Cohen's d and t of drift: positive when full FT drifts more
SCORE_SIGN = "lora - full"   # of scores: positive when LoRA scores higher


# --------------------------------------------------------------------------- states

def drift_states(spec: str, n_states: int) -> list[int]:
    """Hidden-state indices that ``drift.layers`` selects for a model with ``n_states``
    states (the embedding output and one per block): blocks = 1..n_states-1."""
    parsed = parse_layers(spec)
    if parsed == "blocks":
        if n_states < 2:
            raise ValueError(f"drift.layers blocks: the arrays hold {n_states} state(s), "
                             "no block output")
        return list(range(1, n_states))
    if parsed == "all":
        return list(range(n_states))
    bad = [i for i in parsed if i >= n_states]
    if bad:
        raise ConfigError(f"drift.layers {spec!r}: state(s) {bad} do not exist; the model has "
                          f"states 0..{n_states - 1} (0 = embedding output, {n_states - 1} = "
                          "the last block after the final norm)", "drift.layers")
    return list(parsed)


def state_label(i: int, n_states: int) -> str:
    """What hidden state ``i`` is: transformers' ``hidden_states`` are the embedding
    output, the outputs of blocks 1..L-1, and block L's output after the final norm."""
    last = n_states - 1
    if i == 0:
        return "embeddings"
    return f"block {i}, after the final norm" if i == last else f"block {i}"


def states_text(states: Sequence[int], n_states: int | None = None) -> str:
    """``[1, 2, 3, 7]`` -> "1–3, 7"; with ``n_states`` the meaning of the ends in words."""
    runs, start = [], None
    for i, s in enumerate(states):
        if start is None:
            start = s
        if i + 1 == len(states) or states[i + 1] != s + 1:
            runs.append(f"{start}" if s == start else f"{start}–{s}")
            start = None
    text = ", ".join(runs)
    if n_states is None:
        return text
    last = n_states - 1
    parts = []
    if 0 in states:
        parts.append("0 = embedding output")
    if last in states:
        parts.append(f"{last} = block {last} after the final norm")
    return f"{text} ({'; '.join(parts)})" if parts else text


# --------------------------------------------------------------------------- per layer

def layer_similarities(base: np.ndarray, models: dict[str, np.ndarray],
                       notes: list[str] | None = None, label: str = "") -> dict[str, dict]:
    """Every measure, every state, every model against the base: ``{key: {measure: [S]}}``.

    Args:
        base: ``[n, states, d]`` pooled states of the base model.
        models: ``{key: [n, states, d]}`` of the compared models (same examples, order).
        notes: list that receives one line per value that could not be computed (the
            value is then NaN).

    Returns:
        For each key a dict of float64 arrays ``[states]``: ``cka`` and
        ``cka_debiased`` (linear CKA, via :func:`similarity.cka_against_base`),
        ``cka_std`` and ``cka_std_debiased`` (the same on features z-scored per
        dimension), ``cosine``, ``procrustes`` (a distance: 0 = same up to rotation and
        scale) and ``cka_rbf`` (Gaussian kernel, biased).
    """
    notes = notes if notes is not None else []
    keys = list(models)
    n_states = base.shape[1]
    out = {k: {} for k in keys}
    for name, debiased, std in (("cka", False, False), ("cka_debiased", True, False),
                                ("cka_std", False, True), ("cka_std_debiased", True, True)):
        try:
            table = similarity.cka_against_base(base, models, debiased=debiased,
                                                standardize=std)
        except ValueError as e:
            notes.append(f"{label}{name}: {e}; computed pair by pair instead")
            table = _cka_pair_by_pair(base, models, debiased, std, notes, label, name)
        for j, k in enumerate(keys):
            out[k][name] = np.asarray(table[j], dtype=np.float64)
    pairwise = {"cosine": similarity.cosine_similarity,
                "procrustes": similarity.procrustes_distance, "cka_rbf": similarity.rbf_cka}
    for k in keys:
        for name, fn in pairwise.items():
            out[k][name] = np.array([
                _safe(lambda: fn(base[:, i], models[k][:, i]), notes,
                      f"{label}{k} layer {i} {name}") for i in range(n_states)])
    return out


def _cka_pair_by_pair(base: np.ndarray, models: dict[str, np.ndarray], debiased: bool,
                      standardize: bool, notes: list[str], label: str,
                      name: str) -> np.ndarray:
    """``[models, states]`` linear CKA one pair at a time (NaN, with a note, where undefined)."""
    n_states = base.shape[1]
    return np.array([[_safe(lambda: similarity.linear_cka(base[:, i], models[k][:, i],
                                                          debiased=debiased,
                                                          standardize=standardize),
                            notes, f"{label}{k} layer {i} {name}")
                      for i in range(n_states)] for k in models]).reshape(len(models), n_states)


def variance_profile(hidden: np.ndarray, notes: list[str], what: str) -> list[dict | None]:
    """Per state, :func:`similarity.variance_shares` of ``hidden [n, states, d]`` (None,
    with a note, where a state does not vary)."""
    out = []
    for i in range(hidden.shape[1]):
        try:
            out.append(similarity.variance_shares(hidden[:, i], TOP_KS))
        except ValueError as e:
            notes.append(f"{what} layer {i}: variance shares undefined ({e})")
            out.append(None)
    return out


def _safe(fn, notes: list[str], what: str) -> float:
    try:
        return float(fn())
    except ValueError as e:
        notes.append(f"{what}: undefined ({e})")
        return math.nan


def seed_floor(arrays: dict[str, np.ndarray], entries: dict, states: list[int],
               notes: list[str], label: str = "") -> dict:
    """Drift between two models of one method that differ only in seed: the noise floor.

    For each drift measure and method, every pair of its seeds ``(s, s')`` gives
    ``1 - similarity(model s, model s')`` per selected state and its mean over them.

    Returns:
        ``{measure: {method: {"pairs": [{"seeds": [s, s'], "mean": v, "per_layer":
        [...]}], "mean", "min", "max" (over pairs of the layer means, None without
        a pair), "per_layer_mean": [...]}}}``.
    """
    out: dict = {m: {} for m in DRIFT_MEASURES}
    for method in PAIR:
        keys = sorted((k for k in arrays if entries[k]["method"] == method),
                      key=lambda k: entries[k]["seed"])
        sub = {k: arrays[k][:, states] for k in keys}
        pair_values: dict[str, list] = {m: [] for m in DRIFT_MEASURES}
        for i, k1 in enumerate(keys[:-1]):
            others = {k2: sub[k2] for k2 in keys[i + 1:]}
            sims = _drift_measures_only(sub[k1], others, notes, f"{label}{k1} vs ")
            for k2 in others:
                for m in DRIFT_MEASURES:
                    per = 1.0 - sims[k2][m]
                    pair_values[m].append({"seeds": [entries[k1]["seed"], entries[k2]["seed"]],
                                           "mean": _num(np.mean(per)),
                                           "per_layer": [_num(v) for v in per]})
        for m in DRIFT_MEASURES:
            pairs = pair_values[m]
            means = [p["mean"] for p in pairs if p["mean"] is not None]
            per_layer = np.array([[np.nan if v is None else v for v in p["per_layer"]]
                                  for p in pairs]) if pairs else np.empty((0, len(states)))
            out[m][method] = {
                "pairs": pairs, "n_pairs": len(pairs),
                "mean": float(np.mean(means)) if means else None,
                "min": float(np.min(means)) if means else None,
                "max": float(np.max(means)) if means else None,
                "per_layer_mean": [_num(v) for v in np.nanmean(per_layer, axis=0)]
                if len(pairs) else None}
    return out


def _drift_measures_only(base: np.ndarray, models: dict[str, np.ndarray],
                              notes: list[str], label: str) -> dict[str, dict]:
    """The drift measures only (CKA biased and debiased, cosine) of ``models`` against
    ``base``, per state: ``{key: {measure: [S]}}``."""
    out = {k: {} for k in models}
    for name, debiased in (("cka", False), ("cka_debiased", True)):
        try:
            table = similarity.cka_against_base(base, models, debiased=debiased)
        except ValueError as e:
            notes.append(f"{label}{name}: {e}; computed pair by pair instead")
            table = _cka_pair_by_pair(base, models, debiased, False, notes, label, name)
        for j, k in enumerate(models):
            out[k][name] = np.asarray(table[j], dtype=np.float64)
    for k, arr in models.items():
        out[k]["cosine"] = np.array([
            _safe(lambda: similarity.cosine_similarity(base[:, i], arr[:, i]), notes,
                  f"{label}{k} layer {i} cosine") for i in range(base.shape[1])])
    return out


# --------------------------------------------------------------------------- families

def families(tasks: Sequence[str], seeds: Sequence[int], n_drift_states: int | None,
             alpha: float) -> dict:
    """The Bonferroni families: the tests the study makes, from the config's tasks and
    seeds (whether or not each is computed yet, so a correction never changes with the
    tasks a command selected or the order they finish in).

    - ``table3``: the study metric of each task (accuracy; F1 for MRPC), paired t-test by
      seed: one test per task.
    - ``table4``: each drift measure (biased CKA, debiased CKA, cosine) of each task.
    - ``per_layer``: each selected state of each task, one family per measure.
    - ``examples``: one exact McNemar test per task and seed.
    """
    tasks = list(tasks)

    def fam(members: list[str], what: str) -> dict:
        n = max(len(members), 1)
        return {"size": len(members), "members": members, "description": what,
                "alpha": alpha, "alpha_per_test": alpha / n}

    t3 = [f"{t} {get_task(t).metric}" for t in tasks]
    t4 = [f"{t} {m}" for t in tasks for m in DRIFT_MEASURES]
    ex = [f"{t} seed {s}" for t in tasks for s in seeds]
    out = {"table3": fam(t3, "the study metric of each configured task (accuracy; F1 for "
                             "MRPC), paired t-test by seed"),
           "table4": fam(t4, "drift measures (1 - biased CKA, 1 - debiased CKA, 1 - cosine) "
                             "x configured tasks, paired t-test by seed"),
           "examples": fam(ex, "configured tasks x seeds, exact McNemar test over "
                               "validation examples")}
    if n_drift_states:
        size = n_drift_states * len(tasks)
        out["per_layer"] = {"size": size, "members": [f"{n_drift_states} states of "
                                                      f"drift.layers × {', '.join(tasks)}"],
                            "description": "states of drift.layers x configured tasks, one "
                                           "family per measure, paired t-test by seed",
                            "alpha": alpha, "alpha_per_test": alpha / size}
    return out


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
        if root is None:
            return None, "no GLUE directory (data.glue_dir or $LORALENS_GLUE_DIR)"
        split = D.load_split(spec, "validation", root)
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
    seeds = sorted({s for (m, s) in metrics if m == "lora"} & {s for (m, s) in metrics
                                                               if m == "full"})
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
                     f"families count every configured task ({', '.join(family_tasks)}), so "
                     "p-values and significance do not depend on the selection; rerun "
                     "`loralens drift` without --task for every task's rows")
    finished = run.finished_jobs()
    loaded = {t: x for t in tasks if (x := _load_extracted(run, t, finished, notes))}
    n_states = next((x[1].shape[1] for x in loaded.values()), None)
    states = drift_states(cfg.drift.layers, n_states) if n_states else []
    fam = families(family_tasks, cfg.seeds, len(states) or None, alpha)
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
            row.update({m: _num(per[m][layer]) for m in MEASURES})
            for out, m in (("drift", "cka"), ("drift_debiased", "cka_debiased"),
                           ("drift_std", "cka_std"), ("drift_std_debiased", "cka_std_debiased")):
                row[out] = _num(1.0 - per[m][layer])
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


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


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


def summary_lines(result: dict) -> list[str]:
    """One line per task for the command line: drift (1 - CKA) per method and Delta%."""
    lines = []
    for e in result["table4"]:
        c = e["measures"]["cka"]

        def fmt(s):
            return "n/a" if not s else f"{s['mean']:.4f}" + (
                f" ± {s['sd']:.4f}" if s.get("sd") is not None else "")

        delta = "n/a" if c["delta_percent"] is None else f"{c['delta_percent']:+.1f}%"
        if c.get("zero_spread"):
            p = ", p undefined (zero spread)"
        elif c["p"] is None:
            p = ""
        else:
            p = f", p = {c['p']:.3g} (Bonferroni over {c['n_tests']}: {c['p_bonferroni']:.3g})"
        lines.append(f"drift {e['task']} (1 - CKA over states {states_text(e['layers'])}, "
                     f"{e['n_examples']} examples of {e['requested']} requested): LoRA "
                     f"{fmt(c['lora'])}, full {fmt(c['full'])}, Delta {delta}{p}")
    lines += [f"note: {n}" for n in result["notes"]]
    return lines
