"""The weights stage's summary for studies with more than the two study methods: every
method against the reference method (``reference_method``, default ``full``).

Writes ``RUN_DIR/weightspace/methods.json``: per task, measure
(:data:`loralens.analysis.weights.analyzer.MEASURES`, over the common matrices) and method, the mean and
sd over seeds and each seed's value, and the method vs the reference over paired seeds
(:func:`loralens.analysis.stats.compare_methods` with sign ``method - reference``; Bonferroni over
the tests actually made: two paired seeds at least, not zero spread). A ``head``-family
method leaves the backbone as the base model's: its weight change and forgetting are 0
by construction and its tests undefined (never significant).
"""

from __future__ import annotations

from typing import Sequence

from loralens.analysis import stats
from loralens.models.methods import get_method
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json
from loralens.analysis.weights.analyzer import MEASURES, _describe, model_summary

HEAD_NOTE = ("undefined: a head-only method's backbone is the base model's (no weight "
             "change, no forgetting by construction); not tested")


def method_summary(cfg, run: RunDir, results: Sequence[dict]) -> dict:
    """Compute and write ``weightspace/methods.json`` from the models' results."""
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
    atomic_write_json(run.weightspace_path("methods.json"), out)
    return out
