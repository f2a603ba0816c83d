"""The one timing harness: interleaving, warm-up, counts, synchronisation, summaries."""

from __future__ import annotations

import time

import numpy as np
import pytest

from loralens.core import timing
from loralens.core.timing import CpuContention, stopwatch, summarize, time_interleaved


def recorder(log, name):
    def fn(*args):
        log.append((name, *args))
        return (name, *args)
    return fn


def test_sides_are_interleaved_and_rotated_each_round():
    log = []
    t = time_interleaved({k: recorder(log, k) for k in "abc"}, repeats=3)
    assert log == [("a",), ("b",), ("c",), ("b",), ("c",), ("a",), ("c",), ("a",), ("b",)]
    assert {k: len(v) for k, v in t.seconds.items()} == {"a": 3, "b": 3, "c": 3}
    assert list(t.seconds) == ["a", "b", "c"] and t.results == {}


def test_warmup_calls_are_not_recorded_and_inputs_are_passed():
    log = []
    t = time_interleaved({"a": recorder(log, "a"), "b": recorder(log, "b")}, [10, 11, 12],
                         repeats=2, warmup=4, keep="all")
    # warm-up first, side by side, cycling through the inputs; never timed
    assert log[:8] == [("a", 10), ("a", 11), ("a", 12), ("a", 10),
                       ("b", 10), ("b", 11), ("b", 12), ("b", 10)]
    timed = log[8:]
    assert timed == [("a", 10), ("b", 10), ("b", 11), ("a", 11), ("a", 12), ("b", 12),
                     ("b", 10), ("a", 10), ("a", 11), ("b", 11), ("b", 12), ("a", 12)]
    assert len(t.seconds["a"]) == len(t.cpu_seconds["a"]) == 6
    # results in input order, repeat-major, whatever the rotation
    assert [r[1] for r in t.results["b"]] == [10, 11, 12, 10, 11, 12]
    assert all(s >= 0 for v in t.seconds.values() for s in v)


def test_per_side_inputs_of_different_lengths_and_keep_last():
    log = []
    t = time_interleaved({"long": recorder(log, "long"), "short": recorder(log, "short")},
                         {"long": [1, 2, 3], "short": [7]}, keep="last")
    assert log == [("long", 1), ("short", 7), ("long", 2), ("long", 3)]
    assert (len(t.seconds["long"]), len(t.seconds["short"])) == (3, 1)
    assert t.results == {"long": [("long", 3)], "short": [("short", 7)]}


def test_sync_hook_brackets_every_timed_call_only():
    log = []

    def sync():
        log.append("sync")

    time_interleaved({"a": recorder(log, "a"), "b": recorder(log, "b")}, repeats=2, warmup=1,
                     sync=sync)
    # warm-up calls unsynchronised, one sync after them, then sync / call / sync each
    assert log[:3] == [("a",), ("b",), "sync"]
    calls = log[3:]
    assert calls == ["sync", ("a",), "sync", "sync", ("b",), "sync",
                     "sync", ("b",), "sync", "sync", ("a",), "sync"]


def test_the_time_of_a_call_is_measured_and_gc_is_restored():
    import gc

    t = time_interleaved({"slow": lambda: time.sleep(0.02), "fast": lambda: None}, repeats=3)
    assert min(t.seconds["slow"]) >= 0.018 and t.median("fast") < 0.01
    assert t.median_cpu("slow") < 0.015  # sleeping takes no CPU time
    assert gc.isenabled()
    with pytest.raises(ZeroDivisionError):
        time_interleaved({"boom": lambda: 1 / 0})
    assert gc.isenabled()


def test_budget_stops_after_the_round_that_spends_it(monkeypatch):
    # a fake clock that only "a" advances, by 0.02 s a call: no sleeping, so a loaded machine
    # (or a second pytest worker) cannot stretch round 1 past the budget
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])

    def a():
        log.append("a")
        now[0] += 0.02

    log = []
    t = time_interleaved({"a": a, "b": lambda: log.append("b")}, repeats=5, budget_s=0.03)
    # rounds 1 and 2 run whole (0.02 s, then 0.04 s spent); no third round
    assert log == ["a", "b", "b", "a"] and t.seconds["a"] == [0.02, 0.02]
    t = time_interleaved({"a": a}, repeats=3, budget_s=0.0)
    assert len(t.seconds["a"]) == 1  # at least one round


def test_no_cuda_sync_off_cuda():
    assert timing.cuda_sync(None) is None and timing.cuda_sync("cpu") is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="keep"):
        time_interleaved({"a": lambda: None}, keep="some")
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved({"a": lambda: None}, repeats=-1)


def test_stopwatch_and_summaries():
    calls = []
    with stopwatch(sync=lambda: calls.append(1)) as sw:
        time.sleep(0.01)
    assert sw.seconds >= 0.009 and calls == [1, 1]
    s = summarize([0.010, 0.020, 0.030, 0.040], rows=8)
    assert s["n"] == 4 and s["mean_ms"] == pytest.approx(25.0) and s["p50_ms"] == pytest.approx(25.0)
    assert s["throughput_rps"] == pytest.approx(8 / 0.1)
    assert s["sd_ms"] == pytest.approx(np.std([10, 20, 30, 40], ddof=1))
    assert summarize([0.5])["rows"] == 1 and summarize([0.5])["sd_ms"] == 0.0
    assert timing.median([3.0, 1.0, 2.0]) == 2.0


def test_cpu_contention_is_a_share():
    with CpuContention() as c:
        sum(range(200_000))
    assert c.share is None or 0.0 <= c.share
