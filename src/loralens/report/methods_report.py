"""The tables of a study with more methods than LoRA and full fine-tuning: every method,
one row each, against the reference method (``reference_method``, default ``full``).

A study whose methods go beyond ``lora`` and ``full`` (:func:`is_multi`, the same test
the drift and weights stages make) gets these in place of the two-method Tables 3, 4,
4b, 7 and 8, with the same ids: Table 3 from the jobs' metrics.json
(:func:`loralens.analysis.drift.stats.method_accuracy`, stored by the drift stage in
``drift/methods.json``), Table 4 from ``drift/methods.json``
(:func:`loralens.analysis.drift.stage.method_drift`), Table 4b from ``drift/layers.json``,
Tables 7 and 8 from ``weightspace/methods.json``
(:func:`loralens.analysis.weights.analyzer.method_summary`).

Sign conventions: scores and weight measures are method − reference; drift's Cohen's d
is reference − method (positive when the reference drifts more, the paper's sign with
full fine-tuning as the reference) and Δ% = 100 (drift_ref − drift_method) / drift_ref.
A ``head`` method's drift, weight change and forgetting are 0 by construction: its tests
there are undefined (not significant, no p-value, in no Bonferroni family).
"""

from __future__ import annotations

import numpy as np

from loralens.models.methods import is_pair_study
from loralens.report.colors import method_label
from loralens.report.formatting import DASH, MEASURES, Table, f, finite, g, per_seed, pm, signed_pct
from loralens.report.run_data import RunData, read_optional
from loralens.report.significance import p_cells
from loralens.report.accuracy_tables import (
    MARK, NOT_LEARNED, learned_cell, learned_note, mark_task, not_learned,
)

UNDEFINED = "undefined (head only: 0 by construction)"
REFERENCE = "reference"
WEIGHT_NAMES = {"intruders": "intruder dimensions (sum over matrices), ε = 0.5",
                "rel_change": "‖W − W0‖F / ‖W0‖F (mean over matrices)",
                "effective_rank": "effective rank of W − W0 (mean)",
                "rank90": "rank holding 90% of W − W0's energy (mean)"}


def is_multi(d: RunData) -> bool:
    """The study compares more than the methods ``lora`` and ``full`` (the method
    registry's two-method design, :func:`loralens.models.methods.is_pair_study`)."""
    return not is_pair_study(d.methods)


def reference(d: RunData) -> str:
    return str(d.cfg("reference_method", default="full"))


def method_results(d: RunData) -> dict:
    """``{"drift": drift/methods.json, "weights": weightspace/methods.json}`` (None when
    missing), read once."""
    if "methods" not in d.cache:
        d.cache["methods"] = {
            "drift": read_optional(d.run.drift_methods_json, d.problems),
            "weights": read_optional(d.run.weightspace_methods_json, d.problems)}
    return d.cache["methods"]


def accuracy_results(d: RunData) -> dict | None:
    """Each method's study metric vs the reference's: as the drift stage stored it, else
    computed from the jobs' metrics.json by the same function."""
    stored = (method_results(d)["drift"] or {}).get("accuracy")
    if isinstance(stored, dict) and stored.get("rows"):
        return stored
    scores = {k: float(v) for k, j in d.jobs.items()
              if finite(v := (j.get("validation") or {}).get(d.metric(k[0])))}
    if not scores:
        return None
    from loralens.analysis.drift.stats import method_accuracy

    return method_accuracy(scores, d.tasks, d.methods, reference(d))


def test_cells(row: dict, undefined: bool = False) -> list[str]:
    """p, p (Bonf.), d and Significant of a method-vs-reference row: "reference" on the
    reference's row, :data:`UNDEFINED` where the head's value is 0 by construction."""
    if row.get("method") == row.get("reference"):
        return [REFERENCE, DASH, DASH, DASH]
    if undefined:
        return [UNDEFINED, DASH, DASH, "no (undefined)"]
    return p_cells(row)


def _family(n: int, what: str, alpha: float = 0.05) -> str:
    return (f"Bonferroni family: the {n} test{'s' if n != 1 else ''} made, {what}; "
            f"p (Bonf.) = min(1, p × {n}), significant when p (Bonf.) < {alpha:g}.")


def _order(d: RunData, rows: list[dict], *keys: str) -> list[dict]:
    def pos(r: dict) -> tuple:
        t, m = r.get("task"), r.get("method")
        return (d.tasks.index(t) if t in d.tasks else 99,
                *(r.get(k) or "" for k in keys),
                d.methods.index(m) if m in d.methods else 99)
    return sorted(rows, key=pos)


# --------------------------------------------------------------------------- accuracy

def table3_methods(d: RunData) -> Table | None:
    res = accuracy_results(d)
    if not res:
        return None
    ref = res.get("reference_method", reference(d))
    rows = []
    for r in _order(d, res["rows"]):
        task = r["task"]
        base = next((j.get("majority_baseline") or {} for k, j in d.jobs.items()
                     if k[0] == task), {})
        metric = d.metric(task)
        # the models this row compares: the method's and the reference's
        rows.append([task, method_label(r["method"]), metric, f(base.get(metric)),
                     learned_cell(d, task, {r["method"], ref}),
                     pm(r.get("mean"), r.get("sd")), per_seed(r.get("per_seed")),
                     f"{r['difference']:+.4f}" if finite(r.get("difference")) else DASH,
                     *test_cells(r)])
    from loralens.report.accuracy_tables import reported_split_notes

    entries = [{"task": t, "n_validation": sorted({int((j.get("validation") or {})["n"])
                                                   for k, j in d.jobs.items() if k[0] == t
                                                   and "n" in (j.get("validation") or {})})}
               for t in d.tasks if any(k[0] == t for k in d.jobs)]
    notes = [f"Each method's study metric (accuracy; F1 for MRPC) on the whole validation "
             f"split, mean ± sd (ddof 1) over seeds, against the reference method "
             f"{method_label(ref)}: p from a two-sided paired t-test by seed.",
             "Difference and Cohen's d = mean(method − reference) / sd(method − reference, "
             "ddof 1) of the per-seed differences: positive when the method scores higher.",
             _family(res.get("n_tests", 0), "every method but the reference × configured "
                     f"tasks ({', '.join(d.tasks)})", res.get("alpha", 0.05))]
    notes += reported_split_notes(d, entries)
    notes += sorted({f"{r['task']} {method_label(r['method'])}: {r['note']}"
                     for r in res["rows"] if r.get("note") and r.get("tested")})
    notes += [n for n in [learned_note(d)] if n]
    return Table("table-3-accuracy", f"Table 3: accuracy per method vs {method_label(ref)}",
                 ["Task", "Method", "Metric", "Majority", "Not above the majority class",
                  "Mean ± sd", "Per seed",
                  f"Method − {method_label(ref)}", "p", "p (Bonf.)", "d", "Significant"],
                 rows, notes=notes)


# --------------------------------------------------------------------------- drift

def table4_methods(d: RunData) -> Table | None:
    res = method_results(d)["drift"] or {}
    if not res.get("rows"):
        return None
    ref = res.get("reference_method", reference(d))
    rows = []
    for r in _order(d, res["rows"], "measure"):
        delta = DASH if r["method"] == ref else signed_pct(r.get("delta_percent"))
        rows.append([mark_task(d, r["task"]), MEASURES.get(r["measure"], r["measure"]),
                     method_label(r["method"]), str(r.get("n_seeds", DASH)),
                     pm(r.get("mean"), r.get("sd"), g), delta,
                     *test_cells(r, r.get("family") == "head" and r["method"] != ref)])
    dl = res.get("drift_layers")
    notes = [f"Drift = 1 − similarity to the base model on the same validation examples, "
             f"averaged over the hidden states of drift.layers ({dl}); mean ± sd over seeds.",
             f"Against the reference method {method_label(ref)}, paired by seed: Δ% = 100 "
             "(drift reference − drift method) / drift reference (positive: the method "
             "drifts less); p: two-sided paired t-test; Cohen's d = mean(reference − "
             "method) / sd(reference − method, ddof 1): positive when the reference drifts "
             "more.",
             _family(res.get("n_tests", 0), "methods other than the reference and the "
                     "head-only ones × configured tasks × the three drift measures",
                     res.get("alpha", 0.05))]
    if any(r.get("family") == "head" for r in res["rows"]):
        notes.append("A head-only method trains the classification head alone: its backbone "
                     "is the base model's and its drift 0 by construction, so its tests are "
                     "undefined — not significant, no p-value, in no family.")
    notes += [n for n in [learned_note(d)] if n]
    notes += list(res.get("notes") or [])
    return Table("table-4-drift", f"Table 4: representation drift per method vs "
                 f"{method_label(ref)}", ["Task", "Drift measure", "Method", "Seeds",
                                          "Mean ± sd", "Δ% vs reference", "p", "p (Bonf.)",
                                          "d", "Significant"], rows, notes=notes)


def table4b_methods(d: RunData) -> Table | None:
    """Table 4b from drift/layers.json: per task, the base model and every method."""
    rows_in = [r for r in d.layers or [] if r.get("in_drift") is not False]
    if not rows_in or not any(finite(r.get("var_top1")) for r in rows_in):
        return None

    def mean_of(rs: list[dict], key: str) -> tuple[float | None, float | None]:
        by: dict[int, list[float]] = {}
        for r in rs:
            if finite(r.get(key)):
                by.setdefault(int(r["layer"]), []).append(float(r[key]))
        if not by:
            return None, None
        per = [float(np.mean(v)) for v in by.values()]
        return float(np.mean(per)), float(np.max(per))

    rows = []
    for task in d.tasks:
        mine = [r for r in rows_in if r["task"] == task]
        if not mine:
            continue
        for who in ["base", *d.methods]:
            rs = mine if who == "base" else [r for r in mine if r.get("method") == who]
            if not rs:
                continue
            sfx = "_base" if who == "base" else ""
            cells = [f(v, 3) for k in ("1", "5") for v in mean_of(rs, f"var_top{k}{sfx}")]
            drift = [DASH, DASH] if who == "base" else [
                g(1.0 - v) if finite(v := mean_of(rs, k)[0]) else DASH
                for k in ("cka_debiased", "cka_std_debiased")]
            rows.append([mark_task(d, task),
                         "base model" if who == "base" else method_label(who), *cells, *drift])
    return Table("table-4b-outliers", "Table 4b: how much a few dimensions decide",
                 ["Task", "Model", "Top-1 share (mean)", "Top-1 share (max)",
                  "Top-5 share (mean)", "Top-5 share (max)", "Drift, debiased CKA",
                  "Drift, debiased CKA, standardised"], rows,
                 notes=["Share of the pooled features' variance held by the 1 and 5 "
                        "dimensions of largest variance, per hidden state of drift.layers "
                        "(mean over seeds): mean and largest over those states. Drift: 1 − "
                        "debiased linear CKA with plain and per-dimension standardised "
                        "features, averaged over the same states, mean over seeds; where they "
                        "part, a few dimensions decide the plain value. Per state: "
                        "`drift/layers.csv` and Figure 7.",
                        *[n for n in [learned_note(d)] if n]])


# --------------------------------------------------------------------------- weights

def _weight_rows(d: RunData, forgetting: bool) -> tuple[dict, list[list[str]]]:
    res = method_results(d)["weights"] or {}
    out = []
    for r in _order(d, res.get("rows") or [], "measure"):
        if (r["measure"] == "forgetting") != forgetting:
            continue
        head = r.get("family") == "head" and r["method"] != r.get("reference")
        test = r.get("test") or {}
        if test:
            cells = test_cells({**test, "method": r["method"], "reference": r["reference"]})
        elif head or r["method"] == r.get("reference"):
            cells = test_cells(r, head)
        else:
            cells = ["not tested", DASH, DASH, DASH]
        fmt = (lambda v: f"{v:+.4f}") if forgetting else g
        lead = [] if forgetting else [WEIGHT_NAMES.get(r["measure"], r["measure"]) + (
            f", on {r['matrix_set']}" if r.get("matrix_set") else "")]  # the compared set
        out.append([mark_task(d, r["task"]), *lead, method_label(r["method"]),
                    str(r.get("n", DASH)),
                    pm(r.get("mean"), r.get("sd"), fmt), *cells])
    return res, out


def _weight_notes(res: dict) -> list[str]:
    ref = method_label(res.get("reference_method", "full"))
    return [f"Mean ± sd over seeds; against the reference method {ref}, paired by seed: p "
            "from a two-sided paired t-test of method − reference, Cohen's d of the same "
            "difference (positive when the method's value is larger).",
            _family(res.get("n_tests", 0), "measures × tasks × methods of the weights stage "
                    "with two paired seeds or more and a nonzero spread (forgetting, Table 8, "
                    "included)") if "correction" not in res else
            (f"Families declared from the config: one per measure, each every method but "
             f"the reference × configured tasks (at most {res.get('n_tests')} tests), "
             f"corrected by {'Holm' if res['correction'] == 'holm' else 'Bonferroni'}; a "
             "zero-spread test stays in its family, shown undefined; a contrast true by "
             "construction (a rank-r update's effective rank and rank at 90%) is stated, "
             "not tested."),
            "A head-only method leaves the backbone as the base model's: no weight change "
            "and no forgetting by construction, its tests undefined."]


def _learned_notes(d: RunData) -> list[str]:
    return [n for n in [learned_note(d)] if n]


def table7_methods(d: RunData) -> Table | None:
    res, rows = _weight_rows(d, forgetting=False)
    if not rows:
        return None
    from loralens.report.weight_tables import matrices_note

    return Table("table-7-weights", "Table 7: intruder dimensions and the weight change's "
                 "spectrum per method", ["Task", "Measure", "Method", "Seeds", "Mean ± sd",
                                         "p", "p (Bonf.)", "d", "Significant"], rows,
                 notes=[matrices_note(d), *_weight_notes(res), *_learned_notes(d)])


def table8_methods(d: RunData) -> Table | None:
    res, rows = _weight_rows(d, forgetting=True)
    if not rows:
        return None
    return Table("table-8-forgetting", "Table 8: forgetting of general text per method",
                 ["Task", "Method", "Seeds", "Forgetting (nats/token)", "p", "p (Bonf.)", "d",
                  "Significant"], rows,
                 notes=["Forgetting = LM cross-entropy of the general-text sample through the "
                        "base model's LM head after fine-tuning − before (positive: the "
                        "backbone predicts general text worse); `weightspace/forgetting.csv`.",
                        *_weight_notes(res), *_learned_notes(d)])


# --------------------------------------------------------------------------- at a glance

def glance_parts(d: RunData, task: str) -> list[str]:
    """The "At a glance" line's accuracy and drift parts for one task, every method."""
    def verdict(r: dict, head: bool = False) -> str:
        if r["method"] == r.get("reference"):
            return " (reference)"
        if head:
            return " (0 by construction)"
        if r.get("zero_spread"):
            return " (p undefined: zero spread)"
        return f" (p Bonf. = {r['p_bonferroni']:.3g})" if finite(r.get("p_bonferroni")) else ""

    parts = []
    acc = [r for r in (accuracy_results(d) or {}).get("rows") or [] if r["task"] == task]
    if acc:
        parts.append(f"{d.metric(task)}: " + ", ".join(
            f"{method_label(r['method'])} {pm(r.get('mean'), r.get('sd'))}{verdict(r)}"
            for r in _order(d, acc)) + (f" {MARK}" if not_learned(d, task) else ""))
    drift = [r for r in (method_results(d)["drift"] or {}).get("rows") or []
             if r["task"] == task and r.get("measure") == "cka_debiased"]
    if drift:
        parts.append("drift (1 − debiased CKA): " + ", ".join(
            f"{method_label(r['method'])} {g(r.get('mean'))}"
            f"{verdict(r, r.get('family') == 'head' and r['method'] != r.get('reference'))}"
            for r in _order(d, drift))
            + (f" {MARK} (compares models {NOT_LEARNED}: not evidence about the methods)"
               if not_learned(d, task) else ""))
    return parts
