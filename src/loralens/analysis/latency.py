"""The load test's schedule and statistics, without servers (:mod:`loralens.serving.loadtest`
runs the servers and the clients).

Every cell runs ``repeats`` times, the servers interleaved (:func:`schedule`). Per cell
(:func:`cell_summary`): throughput as the mean over repeats with its 95% t-interval,
latency percentiles as medians over repeats. "Crossover" points compare each
separate-adapter backend with merged models (:func:`crossovers`): a backend is called
faster (slower) in a cell only where its throughput interval lies entirely above (below)
merged models', else "no difference detected"; along adapter counts (for each client
count) the crossover is the smallest count from which it is faster at every larger one
(and the same along client counts). One run per cell gives no interval, hence no call.

A crossover is not a test with a family-wise error rate: it is the non-overlap of two
unpaired 95% intervals, checked in every cell with no correction over the cells (the same
cell is read along adapters and along clients). Over many cells some separations arise by
chance, and non-overlap is a different criterion from a 5% test of the difference in one
cell (stricter there). Every call is labelled uncorrected (:data:`UNCORRECTED`,
:func:`comparisons_made` counts the cells compared).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np


def schedule(backends: Sequence[str], adapters: Sequence[int], clients: Sequence[int],
             repeats: int, measure: Callable[[str, int, int], dict],
             done: Callable[[dict], None] | None = None) -> list[dict]:
    """Run every cell ``repeats`` times, the servers interleaved: for each (adapters,
    clients) cell and repeat r, every backend once, in the order rotated by r.
    ``measure(backend, adapters, clients)`` returns one run's summary; ``done`` sees each
    run. Returns the runs (with ``repeat`` and ``position`` in the rotation) in order."""
    runs = []
    k = len(backends)
    for a in adapters:
        for c in clients:
            for r in range(repeats):
                order = list(backends[r % k:]) + list(backends[:r % k])
                for position, b in enumerate(order):
                    run = {**measure(b, a, c), "repeat": r, "position": position}
                    runs.append(run)
                    if done is not None:
                        done(run)
    return runs


def mean_interval(values: Sequence[float], level: float = 0.95) -> list[float] | None:
    """The ``level`` t-interval of the mean of ``values`` (None with fewer than 2)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    half = stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return [float(x.mean() - half), float(x.mean() + half)]


def cell_summary(runs: list[dict]) -> dict:
    """One cell's runs (one backend, adapters, clients) -> its row: throughput mean over
    runs with its 95% t-interval and every run's value; latency percentiles: medians over
    runs; requests: answered per run (the fewest); errors, batches, rows: summed."""
    first = runs[0]
    tp = [r["throughput_rps"] for r in runs]
    have = [t for t in tp if t is not None]

    def med(key):
        vals = [r[key] for r in runs if r.get(key) is not None]
        return float(np.median(vals)) if vals else None

    batches = sum(r.get("batches") or 0 for r in runs)
    rows = sum(r.get("rows") or 0 for r in runs)
    return {
        "backend": first["backend"], "adapters": first["adapters"], "clients": first["clients"],
        "repeats": len(runs), "requests": min(r["requests"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "wall_s": round(sum(r["wall_s"] for r in runs), 4),
        "throughput_rps": float(np.mean(have)) if have else None,
        "throughput_ci": mean_interval(have) if len(have) == len(tp) else None,
        "throughput_sd": float(np.std(have, ddof=1)) if len(have) > 1 else None,
        "throughput_runs": tp,
        "p50_ms": med("p50_ms"), "p95_ms": med("p95_ms"), "p99_ms": med("p99_ms"),
        "mean_ms": med("mean_ms"), "batches": batches,
        "mixed_batches": sum(r.get("mixed_batches") or 0 for r in runs),
        "rows_per_batch": rows / batches if batches else None,
    }


def summarize_cells(runs: list[dict]) -> list[dict]:
    """Runs -> one :func:`cell_summary` per (backend, adapters, clients), first-run order."""
    by: dict[tuple, list[dict]] = {}
    for r in runs:
        by.setdefault((r["backend"], r["adapters"], r["clients"]), []).append(r)
    return [cell_summary(v) for v in by.values()]


def compare_cells(x: dict | None, y: dict | None) -> str | None:
    """``x`` against ``y`` by throughput: "faster" / "slower" where the intervals
    separate, "no difference" where they overlap, None without intervals."""
    cx, cy = (x or {}).get("throughput_ci"), (y or {}).get("throughput_ci")
    if not cx or not cy:
        return None
    if cx[0] > cy[1]:
        return "faster"
    if cx[1] < cy[0]:
        return "slower"
    return "no difference"


UNCORRECTED = ("uncorrected: non-overlap of unpaired 95% throughput intervals, checked "
               "cell by cell with no family-wise correction over the cells (not a test of "
               "a family)")


def comparisons_made(rows: list[dict], reference: str = "merged") -> int:
    """How many (backend, adapters, clients) cells were compared with ``reference`` (both
    with an interval): the number of uncorrected calls a crossover rests on."""
    by = {(r["backend"], r["adapters"], r["clients"]): r for r in rows}
    return sum(1 for (b, a, c), r in by.items() if b != reference
               and compare_cells(r, by.get((reference, a, c))) is not None)


def crossovers(rows: list[dict], reference: str = "merged") -> list[dict]:
    """Where each separate-adapter backend starts to out-serve ``reference`` (throughput
    intervals, :func:`compare_cells`), along adapter counts and along client counts. Each
    entry carries ``correction``: :data:`UNCORRECTED` and ``cells_compared``
    (:func:`comparisons_made`): the calls are not corrected over the cells."""
    by = {(r["backend"], r["adapters"], r["clients"]): r for r in rows}
    adapters = sorted({r["adapters"] for r in rows})
    clients = sorted({r["clients"] for r in rows})
    out = []
    label = {"correction": UNCORRECTED, "cells_compared": comparisons_made(rows, reference)}
    for b in sorted({r["backend"] for r in rows} - {reference}):
        def calls(cells: list[tuple[int, int]], levels: list[int]) -> dict:
            v = {lv: compare_cells(by.get((b, a, c)), by.get((reference, a, c)))
                 for lv, (a, c) in zip(levels, cells)}
            wins = [lv for lv in levels if v[lv] == "faster"]
            return {**label, "from": _first_run(levels, wins), "faster_at": wins,
                    "slower_at": [lv for lv in levels if v[lv] == "slower"],
                    "no_difference_at": [lv for lv in levels if v[lv] == "no difference"],
                    "not_called_at": [lv for lv in levels if v[lv] is None]}

        for c in clients:
            out.append({"backend": b, "versus": reference, "clients": c, "along": "adapters",
                        **calls([(a, c) for a in adapters], adapters)})
        for a in adapters:
            out.append({"backend": b, "versus": reference, "adapters": a, "along": "clients",
                        **calls([(a, c) for c in clients], clients)})
    return out


def _first_run(levels: list[int], wins: list[int]) -> int | None:
    """Smallest level from which the backend wins at every larger level, else None."""
    for i, level in enumerate(levels):
        if all(x in wins for x in levels[i:]):
            return level
    return None


def _levels(levels: list[int], unit: str) -> str:
    """[1] -> "1 adapter"; [1, 4] -> "1, 4 adapters"."""
    return f"{', '.join(map(str, levels))} {unit[:-1] if levels == [1] else unit}"


def crossover_text(c: dict) -> str:
    """One crossover entry in words: "ours vs merged at 32 clients: faster from 16 adapters
    on; no difference detected at 1, 4 adapters", or "...: no difference detected"."""
    if c["along"] == "adapters":
        where = f"at {c['clients']} client{'s' if c['clients'] != 1 else ''}"
        unit = "adapters"
    else:
        where = f"over {c['adapters']} adapter{'s' if c['adapters'] != 1 else ''}"
        unit = "clients"
    head = f"{c['backend']} vs {c['versus']} {where}: "
    if "slower_at" not in c:  # an older loadtest.json: one run per cell, no intervals
        return head + "not called (one run per cell: no intervals)"
    faster, slower = c["faster_at"], c["slower_at"]
    same, untested = c["no_difference_at"], c["not_called_at"]
    if not (faster or slower or untested):
        return head + "no difference detected"
    if not (faster or slower or same):
        return head + "not called (no intervals)"
    parts = []
    if c["from"] is not None:
        parts.append(f"faster from {_levels([c['from']], unit)} on")
    elif faster:
        parts.append(f"faster only at {_levels(faster, unit)}")
    if slower:
        parts.append(f"slower at {_levels(slower, unit)}")
    if same:
        parts.append(f"no difference detected at {_levels(same, unit)}")
    if untested:
        parts.append(f"not called at {_levels(untested, unit)} (no interval)")
    return head + "; ".join(parts)


def table_lines(result: dict) -> list[str]:
    """A plain-text table of every cell, then the crossovers."""
    head = (f"{'backend':8s} {'adapters':>8s} {'clients':>7s} {'req/s':>8s} "
            f"{'95% interval':>17s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} "
            f"{'rows/batch':>10s} {'errors':>6s}")
    lines = [head]
    for c in result["cells"]:
        def ms(x):
            return f"{x:8.1f}" if x is not None else f"{'-':>8s}"
        rpb = f"{c['rows_per_batch']:10.1f}" if c["rows_per_batch"] else f"{'-':>10s}"
        tp = f"{c['throughput_rps']:8.2f}" if c["throughput_rps"] else f"{'-':>8s}"
        lo_hi = c.get("throughput_ci")
        iv = f"[{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi else "-"
        lines.append(f"{c['backend']:8s} {c['adapters']:8d} {c['clients']:7d} {tp} {iv:>17s} "
                     f"{ms(c['p50_ms'])} {ms(c['p95_ms'])} {ms(c['p99_ms'])} {rpb} "
                     f"{c['errors']:6d}")
    lines += [crossover_text(c) for c in result["crossovers"]]
    if result["crossovers"] and result["crossovers"][0].get("correction"):
        c = result["crossovers"][0]
        lines.append(f"crossovers: {c['correction']}; {c['cells_compared']} cells compared")
    return lines
