"""The report's serving tables (Table 5, 5c, 6) from new and old result files: new fields
shown, and what an older bench/serving.json or loadtest.json did not record said so."""

from __future__ import annotations

import numpy as np

from loralens.report import serving_tables as ST
from loralens.report.run_data import RunData
from loralens.core.run_dir import RunDir


def _data(tmp_path, serving=None, loadtest=None) -> RunData:
    return RunData(RunDir(tmp_path / "run"), serving=serving, loadtest=loadtest)


def _old_serving() -> dict:
    """The shape an older loralens wrote: pooled Mann-Whitney, float32 checks at 1e-5."""
    return {"device": "cpu", "threads": 2, "warmup": 3, "dtype": "float32", "tolerance": 1e-5,
            "tasks": {}, "comparison": [
                {"task": "rte", "batch_size": 1, "kind": "full", "seeds": 3, "n": 60,
                 "mean_ms": 80.0, "sd_ms": 9.0, "p95_ms": 95.0, "seed_means_sd_ms": 1.5},
                {"task": "rte", "batch_size": 1, "kind": "lora_separate", "seeds": 3, "n": 60,
                 "mean_ms": 93.0, "sd_ms": 11.0, "p95_ms": 110.0, "seed_means_sd_ms": 2.5,
                 "overhead_vs_full_pct": 16.25, "p_vs_full": 0.004, "p_welch_vs_full": 0.01}],
            "checks": {"rte/seed42/batch1: runtime == separate": True,
                       "multi stream: runtime == single adapter": False,
                       "multi mixed batch: runtime == single adapter": False}}


def _cells(table) -> list[list[str]]:
    return [list(r) for r in table.rows]


def test_table5_shows_sd_across_seeds_and_the_paired_test(tmp_path):
    from loralens.serving.bench.results import comparison

    base = np.array([0.02, 0.4, 0.05, 0.3, 0.1, 0.25, 0.03, 0.35])

    def seed(shift):
        return {"methods": ["full", "lora"], "memory": {}, "batch": {"1": {"kinds": {
            "full": {"latency_s": list(base + shift)},
            "lora_separate": {"latency_s": list(base + shift + np.arange(1, 9) * 1e-3)}}}}}

    res = {"seeds": {"1": seed(0.0), "2": seed(0.01)}}
    comp = comparison("sst2", res, [1])
    t = ST.table5(_data(tmp_path, {"device": "cpu", "threads": 2, "warmup": 3,
                                   "comparison": comp}))
    sep = next(r for r in _cells(t) if r[2] == "LoRA separate (PEFT)")
    row = next(r for r in comp if r["kind"] == "lora_separate")
    # mean ± sd across the two seeds' means (192.0 and 202.0 ms: sd 7.07)
    assert sep[3] == "PEFT"  # served by (a kind recorded before served_by: from its name)
    assert sep[5] == "197.0 ± 7.1"
    lo, hi = row["overhead_vs_full_ci"]
    assert sep[7] == f"{row['overhead_vs_full_pct']:+.1f}% [{lo:+.1f}, {hi:+.1f}]"
    assert sep[8] == "0.008"  # 2 / 2**8, exact Wilcoxon
    # the statistic the Wilcoxon test is about: the paired differences are 1..8 ms at every
    # seed, median 4.5 ms (the overhead beside it is a ratio of sums)
    assert sep[9] == "+4.50"
    assert t.columns[8] == "p vs full FT (uncorrected)"
    notes = " ".join(t.notes)
    assert "sd across seeds" in notes and "Wilcoxon signed-rank" in notes
    assert "paired by request" in notes and "Mann-Whitney" not in notes
    assert "not about the overhead, a ratio of summed latencies" in notes
    assert "p is uncorrected: 1 p-value in this table" in notes


def test_table5_of_an_old_file_says_what_its_p_was(tmp_path):
    t = ST.table5(_data(tmp_path, _old_serving()))
    sep = _cells(t)[1]
    assert sep[5] == "93.0 ± 2.5" and sep[7] == "+16.2%" and sep[8] == "0.004"
    assert sep[9] == "–"  # an older file recorded no median difference
    notes = " ".join(t.notes)
    assert "Mann-Whitney U over pooled requests" in notes and "older loralens" in notes


def test_identity_table_and_old_files(tmp_path):
    ident = {"dtype": "float64", "tolerance": 1e-6, "serving_dtype": "float32",
             "tolerance_rule": "max |Δ logit| <= 1e-06 × max(1, max |logit|)",
             "serving_dtype_rounding": 1e-5, "examples_per_adapter": 16, "checks": [
                 {"name": "rte/seed42/batch1: runtime == separate", "workload": "single",
                  "path": "runtime", "adapters": ["rte_seed42"], "batch_size": 1, "rows": 16,
                  "float64": {"max_abs_diff": 3.1e-14, "max_abs_logit": 4.2,
                              "relative_diff": 7.4e-15, "same_predictions": True},
                  "serving_dtype": {"max_abs_diff": 1.5e-5, "max_abs_logit": 4.2,
                                    "relative_diff": 3.6e-6, "same_predictions": True},
                  "passed": True}]}
    t = ST.table5_identity(_data(tmp_path, {"identity": ident}))
    assert _cells(t) == [["rte/seed42/batch1: runtime == separate", "16", "4.2", "3.1e-14",
                          "yes", "1.5e-05", "3.6e-06", "yes"]]
    assert t.columns[4] == "Passed (float64)" and t.columns[6] == "float32 max |Δ| / max |logit|"
    assert "Verdict in float64 (float64 copies of the base and adapters, for the check only): " \
           "passed when max |Δ logit| ≤ 1e-06 × max(1, max |logit|)." in " ".join(t.notes)
    # an older serving.json: no Table 5c; the report says what it has instead
    old = _data(tmp_path, _old_serving())
    assert ST.table5_identity(old) is None
    assert ST.identity_not_recorded(old) == (
        "not recorded (bench/serving.json was written by an older loralens); its 3 checks ran "
        "in float32 against an absolute tolerance of 1e-05, which float32 rounding alone can "
        "exceed: 1 of 3 passed")
    assert ST.identity_not_recorded(_data(tmp_path, {"identity": ident})) is None


def test_composed_report_says_identity_not_recorded(tmp_path):
    from loralens.report.compose import _Document, _serving
    from loralens.report.render import to_markdown

    doc = _Document(_data(tmp_path, _old_serving()), [], {})
    _serving(doc)
    md = to_markdown(doc.blocks)
    assert "**Identity checks in float64: not recorded (bench/serving.json was written by an " \
           "older loralens)" in md


def test_table6_of_an_old_loadtest_calls_no_crossover(tmp_path):
    cells = [{"backend": b, "adapters": 1, "clients": 1, "requests": 96, "errors": 0,
              "throughput_rps": tp, "p50_ms": 50.0, "p95_ms": 60.0, "p99_ms": 70.0,
              "rows_per_batch": 1.0} for b, tp in (("merged", 4.61), ("peft", 5.26))]
    old = {"schema": 1, "backends": ["merged", "peft"], "cells": cells, "warmup": 4,
           "requests_per_cell": 96, "crossovers": [
               {"backend": "peft", "versus": "merged", "clients": 1, "along": "adapters",
                "from": 1, "faster_at": [1]}]}
    t = ST.table6_loadtest(_data(tmp_path, loadtest=old))
    assert [r[2] for r in _cells(t)] == ["merged (one model per adapter)",
                                         "PEFT (separate adapters)"]  # no "(best)"
    assert _cells(t)[1][3] == "5.26" and _cells(t)[1][8] == "1 × 96 / 0"
    notes = " ".join(t.notes)
    assert "One run per cell" in notes and "no crossover is called" in notes
    assert "faster" not in notes


def test_table6_labels_best_and_crossovers_uncorrected(tmp_path):
    """Non-overlap of unpaired intervals over many cells is no test: the note says so and
    counts the cells compared (2 here: peft vs merged at 1 and 4 adapters)."""
    from loralens.analysis.latency import crossovers

    def cell(b, a, tp):
        return {"backend": b, "adapters": a, "clients": 1, "requests": 96, "errors": 0,
                "repeats": 3, "throughput_rps": tp, "throughput_ci": [tp - 0.1, tp + 0.1],
                "p50_ms": 50.0, "p95_ms": 60.0, "p99_ms": 70.0, "rows_per_batch": 1.0}

    cells = [cell("merged", 1, 5.0), cell("peft", 1, 6.0), cell("merged", 4, 5.0),
             cell("peft", 4, 5.05)]
    lt = {"schema": 2, "backends": ["merged", "peft"], "cells": cells, "warmup": 4,
          "repeats": 3, "requests_per_cell": 96, "crossovers": crossovers(cells)}
    notes = " ".join(ST.table6_loadtest(_data(tmp_path, loadtest=lt)).notes)
    assert "Best and the crossovers are uncorrected: non-overlap of unpaired 95% " \
           "throughput intervals" in notes
    assert "2 cells compared with merged models" in notes and "not a test" in notes
