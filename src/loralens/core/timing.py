"""The one timing harness of every benchmark: interleaved sides, synchronised clocks.

Every speed comparison in loralens (the ``bench`` stage and ``bench/*.py``) runs its
sides through :func:`time_interleaved`:

* the sides are called round-robin, one call of each per round, in an order rotated
  every round, so a change of the machine's speed (another job on the cores, a
  clock change, thermal throttling) hits every side alike instead of whichever
  happened to run during it;
* ``warmup`` untimed calls per side come first (allocator, kernels, caches);
* with a CUDA device the GPU is synchronised right before and right after each
  timed call, so a call's time is its kernels' time and not the launch queue's
  (the study's published code timed asynchronous launches with ``time.time()``);
* the clock is ``time.perf_counter`` (monotonic, the finest available); CPU time of
  the process (``time.process_time``) is recorded alongside, outside the wall
  window;
* the garbage collector is paused while timing (as ``timeit`` does), so its pauses
  land in no call.

:func:`stopwatch` times one span with the same clock and synchronisation (load
times, a part of a timed call); :func:`summarize` and :func:`median` reduce the
seconds; :class:`CpuContention` measures how much of the machine other processes
took meanwhile.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

Sync = Callable[[], None]


def cuda_sync(device: Any = None) -> Sync | None:
    """The synchronisation hook for ``device`` (a ``torch.device`` or its name): waits
    for the GPU's queue on a CUDA device, ``None`` elsewhere (nothing to wait for)."""
    if device is None:
        return None
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(device)


@dataclass
class Timings:
    """What :func:`time_interleaved` measured, per side (in the order the sides were given).

    ``seconds``: wall seconds of every timed call, in call order (repeat-major: the
    calls of repeat 0 over every input, then repeat 1, ...); ``cpu_seconds``: the
    process's CPU seconds over the same calls; ``results``: what the timed calls
    returned (all of them, the last one, or none, as asked).
    """

    seconds: dict[str, list[float]]
    cpu_seconds: dict[str, list[float]]
    results: dict[str, list[Any]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return median(self.seconds[name])

    def median_cpu(self, name: str) -> float:
        return median(self.cpu_seconds[name])


def _rounds(fns: Mapping[str, Callable], inputs, repeats: int) -> list[list[tuple[str, tuple]]]:
    """Per round: (side, call arguments) in the round's rotated order."""
    names = list(fns)
    if inputs is None:
        per_side = {k: [()] * repeats for k in names}
    elif isinstance(inputs, Mapping):
        per_side = {k: [(x,) for x in inputs[k]] * repeats for k in names}
    else:
        per_side = {k: [(x,) for x in inputs] * repeats for k in names}
    n = max((len(v) for v in per_side.values()), default=0)
    out = []
    for r in range(n):
        order = names[r % len(names):] + names[:r % len(names)]
        out.append([(k, per_side[k][r]) for k in order if r < len(per_side[k])])
    return out


def _warmup_args(inputs, name: str, i: int) -> tuple:
    if inputs is None:
        return ()
    seq = inputs[name] if isinstance(inputs, Mapping) else inputs
    return (seq[i % len(seq)],)


def time_interleaved(fns: Mapping[str, Callable[..., Any]],
                     inputs: Sequence | Mapping[str, Sequence] | None = None, *,
                     repeats: int = 1, warmup: int = 0, device: Any = None,
                     sync: Sync | None = None, keep: str = "none", pause_gc: bool = True,
                     progress: bool = False, desc: str = "timing",
                     budget_s: float | None = None) -> Timings:
    """Time every side of ``fns`` round-robin; returns :class:`Timings`.

    ``inputs``: ``None`` (each side is called without arguments, ``repeats`` times), a
    sequence (each round passes the next item to every side; ``repeats`` passes over
    it), or a mapping side -> its own sequence (a side whose sequence is used up sits
    out the later rounds). The order of the sides rotates every round.
    ``warmup``: untimed calls per side first (cycling through its inputs).
    ``device``: synchronise CUDA around each timed call when it is a CUDA device;
    ``sync`` replaces that hook (tests inject one). ``keep``: ``"all"`` results,
    ``"last"`` result per side, or ``"none"``. ``budget_s``: no further round once the
    timed calls took that many seconds in all (at least one round runs; ``None``: every
    round).
    """
    if keep not in ("none", "last", "all"):
        raise ValueError(f"keep must be 'none', 'last' or 'all', not {keep!r}")
    if repeats < 0 or warmup < 0:
        raise ValueError("repeats and warmup must be >= 0")
    sync = sync if sync is not None else cuda_sync(device)
    for name, fn in fns.items():
        for i in range(warmup):
            fn(*_warmup_args(inputs, name, i))
    if sync is not None:
        sync()
    out = Timings({k: [] for k in fns}, {k: [] for k in fns},
                  {k: [] for k in fns} if keep != "none" else {})
    rounds = _rounds(fns, inputs, repeats)
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc=desc, leave=False)
    if pause_gc:
        gc.collect()
        gc.disable()
    spent = 0.0
    try:
        for r, calls in enumerate(rounds):
            if r and budget_s is not None and spent >= budget_s:
                break
            for name, args in calls:
                c0 = time.process_time()
                if sync is not None:
                    sync()
                t0 = time.perf_counter()
                result = fns[name](*args)
                if sync is not None:
                    sync()
                t1 = time.perf_counter()
                out.cpu_seconds[name].append(time.process_time() - c0)
                out.seconds[name].append(t1 - t0)
                spent += t1 - t0
                if keep == "all":
                    out.results[name].append(result)
                elif keep == "last":
                    out.results[name][:] = [result]
    finally:
        if pause_gc:
            gc.enable()
    return out


@dataclass
class Stopwatch:
    seconds: float | None = None


@contextlib.contextmanager
def stopwatch(device: Any = None, sync: Sync | None = None) -> Iterator[Stopwatch]:
    """Wall seconds of one span (``with stopwatch(dev) as sw: ...; sw.seconds``), with
    the harness's clock and CUDA synchronisation: for what happens once (loading a
    model, an adapter) or a part of a timed call, not for comparisons."""
    sync = sync if sync is not None else cuda_sync(device)
    sw = Stopwatch()
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    yield sw
    if sync is not None:
        sync()
    sw.seconds = time.perf_counter() - t0


def median(seconds: Sequence[float]) -> float:
    return float(statistics.median(seconds))


def summarize(seconds: Sequence[float], rows: int | None = None) -> dict:
    """Latency statistics in milliseconds; throughput in rows per second of the summed
    time (``rows`` defaults to one per call)."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    rows = len(ms) if rows is None else rows
    total = ms.sum() / 1e3
    return {"n": int(len(ms)), "rows": int(rows), "mean_ms": float(ms.mean()),
            "sd_ms": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "min_ms": float(ms.min()), "throughput_rps": float(rows / total) if total > 0 else None}


class CpuContention:
    """Share of the machine's CPU time used by *other* processes over a span (Linux):
    ``with CpuContention() as c: ...; c.share`` (``None`` where /proc is missing)."""

    def __init__(self):
        self.share: float | None = None

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                cpu = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                own = f.read().rsplit(")", 1)[1].split()
            busy = sum(cpu) - cpu[3] - (cpu[4] if len(cpu) > 4 else 0)  # minus idle, iowait
            return busy, int(own[11]) + int(own[12])                    # utime + stime
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> "CpuContention":
        self._t0, self._s0 = time.perf_counter(), self._read()
        return self

    def __exit__(self, *exc) -> None:
        s1 = self._read()
        if self._s0 is None or s1 is None:
            return
        ticks = os.sysconf("SC_CLK_TCK")
        wall = (time.perf_counter() - self._t0) * ticks * (os.cpu_count() or 1)
        other = (s1[0] - self._s0[0]) - (s1[1] - self._s0[1])
        self.share = max(0.0, other / wall) if wall > 0 else None
