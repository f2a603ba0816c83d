"""The load test's schedule and statistics (serving/loadtest_analysis.py), without
servers: every cell repeated with the servers interleaved, intervals over repeats,
crossovers called only where the intervals separate."""

from __future__ import annotations

import pytest

from loralens.analysis.latency import (
    cell_summary, compare_cells, crossover_text, crossovers, mean_interval, schedule,
    summarize_cells,
)

T_975_2 = 4.302652729749464  # Student's t, 97.5% quantile, 2 degrees of freedom (tables)


def test_mean_interval_against_the_t_table():
    lo, hi = mean_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, n 3
    half = T_975_2 / 3 ** 0.5
    assert (lo, hi) == pytest.approx((2 - half, 2 + half))
    assert mean_interval([5.0]) is None


def test_schedule_interleaves_the_servers_and_repeats_every_cell():
    calls = []

    def measure(b, a, c):
        calls.append((b, a, c))
        return {"backend": b, "adapters": a, "clients": c}

    runs = schedule(["merged", "peft", "ours"], [1, 4], [8], 3, measure)
    assert calls[:9] == [("merged", 1, 8), ("peft", 1, 8), ("ours", 1, 8),
                         ("peft", 1, 8), ("ours", 1, 8), ("merged", 1, 8),
                         ("ours", 1, 8), ("merged", 1, 8), ("peft", 1, 8)]
    assert len(calls) == 18 and calls[9:] == [(b, 4, 8) for b, _, _ in calls[:9]]
    assert [r["repeat"] for r in runs[:9]] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [r["position"] for r in runs[:4]] == [0, 1, 2, 0]  # each server leads once


def _run(b, a, c, tp, p50=10.0, requests=96, errors=0):
    return {"backend": b, "adapters": a, "clients": c, "requests": requests, "errors": errors,
            "wall_s": requests / tp, "throughput_rps": tp, "p50_ms": p50, "p95_ms": 2 * p50,
            "p99_ms": 3 * p50, "mean_ms": p50, "batches": 40, "mixed_batches": 4, "rows": 96}


def test_cell_summary_mean_interval_and_medians():
    c = cell_summary([_run("ours", 4, 8, 1.0, 30.0), _run("ours", 4, 8, 2.0, 10.0),
                      _run("ours", 4, 8, 3.0, 20.0, requests=90, errors=2)])
    assert c["repeats"] == 3 and c["throughput_rps"] == pytest.approx(2.0)
    assert c["throughput_ci"] == pytest.approx([2 - T_975_2 / 3 ** 0.5, 2 + T_975_2 / 3 ** 0.5])
    assert c["throughput_runs"] == [1.0, 2.0, 3.0] and c["throughput_sd"] == pytest.approx(1.0)
    assert c["p50_ms"] == 20.0 and c["p95_ms"] == 40.0  # medians over the runs
    assert c["requests"] == 90 and c["errors"] == 2
    assert c["rows_per_batch"] == pytest.approx(288 / 120)
    one = cell_summary([_run("ours", 4, 8, 5.0)])
    assert one["throughput_ci"] is None and one["throughput_sd"] is None


def _cells(values: dict) -> list[dict]:
    """{(backend, adapters, clients): [throughput per repeat]} -> cell rows."""
    return summarize_cells([_run(b, a, c, tp) for (b, a, c), tps in values.items()
                            for tp in tps])


def test_one_run_each_with_peft_ahead_is_no_difference():
    """The quick run's puzzle (5.26 vs 4.61 req/s, PEFT ahead of a merged model with one
    adapter and one client) from one run per cell: with repeats the intervals overlap."""
    cells = _cells({("merged", 1, 1): [4.61, 5.30, 5.05], ("peft", 1, 1): [5.26, 4.52, 4.80]})
    assert compare_cells(cells[1], cells[0]) == "no difference"
    got = crossovers(cells)
    assert [crossover_text(c) for c in got] == [
        "peft vs merged at 1 client: no difference detected",
        "peft vs merged over 1 adapter: no difference detected"]


def test_crossovers_only_where_intervals_separate():
    tight = lambda x: [x - 0.1, x, x + 0.1]  # noqa: E731
    cells = _cells({
        ("merged", 1, 8): tight(10), ("ours", 1, 8): tight(9),          # slower
        ("merged", 4, 8): tight(10), ("ours", 4, 8): [8, 10, 12.5],     # overlap
        ("merged", 16, 8): tight(5), ("ours", 16, 8): tight(9),         # faster
        ("merged", 1, 32): tight(10), ("ours", 1, 32): tight(12),       # faster
        ("merged", 4, 32): tight(8), ("ours", 4, 32): tight(12),        # faster
        ("merged", 16, 32): tight(4), ("ours", 16, 32): tight(12)})     # faster
    got = {(c["along"], c.get("clients"), c.get("adapters")): c for c in crossovers(cells)}
    at8 = got[("adapters", 8, None)]
    assert (at8["from"], at8["faster_at"], at8["slower_at"], at8["no_difference_at"]) == \
        (16, [16], [1], [4])
    assert crossover_text(at8) == ("ours vs merged at 8 clients: faster from 16 adapters on; "
                                   "slower at 1 adapter; no difference detected at 4 adapters")
    assert crossover_text(got[("adapters", 32, None)]) == \
        "ours vs merged at 32 clients: faster from 1 adapter on"
    assert crossover_text(got[("clients", None, 4)]) == \
        "ours vs merged over 4 adapters: faster from 32 clients on; no difference detected at " \
        "8 clients"
    assert crossover_text(got[("clients", None, 1)]) == \
        "ours vs merged over 1 adapter: faster from 32 clients on; slower at 8 clients"
    assert crossover_text(got[("clients", None, 16)]) == \
        "ours vs merged over 16 adapters: faster from 8 clients on"


def test_single_runs_call_nothing():
    cells = _cells({("merged", 1, 1): [4.61], ("peft", 1, 1): [5.26]})
    (c, _) = crossovers(cells)
    assert c["not_called_at"] == [1] and c["faster_at"] == [] and c["from"] is None
    assert crossover_text(c) == "peft vs merged at 1 client: not called (no intervals)"
    # an entry of an older loadtest.json (one run per cell, no verdicts)
    old = {"backend": "ours", "versus": "merged", "clients": 1, "along": "adapters",
           "from": 4, "faster_at": [4, 16]}
    assert crossover_text(old) == \
        "ours vs merged at 1 client: not called (one run per cell: no intervals)"


def test_crossover_text_faster_only_at_some_levels():
    c = {"backend": "ours", "versus": "merged", "clients": 8, "along": "adapters", "from": None,
         "faster_at": [4], "slower_at": [16], "no_difference_at": [1], "not_called_at": []}
    assert crossover_text(c) == ("ours vs merged at 8 clients: faster only at 4 adapters; "
                                 "slower at 16 adapters; no difference detected at 1 adapter")


def test_crossovers_are_labelled_uncorrected_with_the_cells_compared():
    """Non-overlap of unpaired intervals over many cells is no family-wise test: every
    crossover says so and counts the cells it rests on (here 3 of ours' 4 cells have both
    intervals; the 1-run cell is not compared)."""
    from loralens.analysis.latency import UNCORRECTED, comparisons_made, table_lines

    tight = lambda x: [x - 0.1, x, x + 0.1]  # noqa: E731
    cells = _cells({("merged", 1, 1): tight(10), ("ours", 1, 1): tight(12),
                    ("merged", 4, 1): tight(10), ("ours", 4, 1): tight(9),
                    ("merged", 1, 8): tight(10), ("ours", 1, 8): tight(10),
                    ("merged", 4, 8): [10.0], ("ours", 4, 8): [12.0]})
    assert comparisons_made(cells) == 3
    got = crossovers(cells)
    assert all(c["correction"] == UNCORRECTED and c["cells_compared"] == 3 for c in got)
    assert "uncorrected" in UNCORRECTED
    lines = table_lines({"cells": cells, "crossovers": got})
    assert lines[-1].startswith("crossovers: uncorrected: non-overlap of unpaired 95%")
    assert lines[-1].endswith("; 3 cells compared")
