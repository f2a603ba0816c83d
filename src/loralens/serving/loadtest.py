"""``loralens loadtest``: concurrent clients against the three serving backends.

The load test starts ``loralens serve`` for every backend (per-adapter merged models,
separate adapters through PEFT, our multi-adapter path) as a child process on a free
loopback port, all at once (idle servers use memory, not CPU: merged models hold one
model per adapter), each with enough adapter copies for the largest adapter count.
A run of one (adapters, clients) cell on one server is a closed loop: ``clients``
concurrent HTTP clients each send one request at a time, request ``i`` carrying
validation example ``i`` of ONE task (the same texts in every cell, so cells differ
only in clients and adapters) to adapter ``i mod adapters``, until ``requests``
requests have been answered (or ``seconds`` have passed), after untimed warm-up
requests. The adapters are that task's (copies of them when a run trained fewer).

Every cell runs ``repeats`` times, the servers interleaved: in each repeat every server
runs the cell once, in an order rotated per repeat, so a change of background load (a
shared machine: the client shares the cores with the servers, and other jobs run beside)
hits every server alike instead of whichever ran during it.

Per run: p50/p95/p99/mean latency as the client sees it (HTTP included), throughput
(answered requests per second of wall time), errors, and the server's own counters
(batches, mixed batches, rows per batch) from ``/health``. The schedule, the per-cell
statistics over repeats and the crossover calls are in
:mod:`loralens.analysis.latency`.

The client runs in this process (asyncio + httpx). Results: RUN_DIR/loadtest/
(``RunDir.loadtest_dir``) or ``--out``: loadtest.json, loadtest.csv (one row per cell),
loadtest_runs.csv (one row per run).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json, write_csv
from loralens.core.timing import stopwatch
from loralens.serving.cli_args import BACKENDS, DEFAULT_ADAPTERS, DEFAULT_CLIENTS, DEFAULT_REPEATS
from loralens.analysis.latency import crossovers, schedule, summarize_cells, table_lines
from loralens.tasks.registry import resolve_config_tasks


log = logging.getLogger(__name__)

# RunDir names the results (RUN_DIR/loadtest/loadtest.json, ...); --out keeps the names
LOADTEST_JSON = RunDir("").loadtest_path.name
LOADTEST_CSV = RunDir("").loadtest_csv.name
LOADTEST_RUNS_CSV = RunDir("").loadtest_runs_csv.name


class LoadTestError(RuntimeError):
    pass


@dataclass
class Cell:
    backend: str
    adapters: int
    clients: int
    requests: int
    errors: int
    wall_s: float
    latencies_ms: list[float]
    server: dict
    rss: dict | None = None        # VmRSS/VmHWM bytes after warm-up and at the end (pid given)
    metrics: tuple[str, str] | None = None  # /metrics text after warm-up and at the end

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_ms)
        pct = (lambda q: float(np.percentile(lat, q))) if lat.size else (lambda q: None)
        batches = self.server.get("batches") or 0
        return {
            "backend": self.backend, "adapters": self.adapters, "clients": self.clients,
            "requests": self.requests, "errors": self.errors, "wall_s": round(self.wall_s, 4),
            "throughput_rps": self.requests / self.wall_s if self.wall_s > 0 else None,
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "mean_ms": float(lat.mean()) if lat.size else None,
            "batches": batches, "mixed_batches": self.server.get("mixed_batches"),
            "rows": self.server.get("rows") or 0,
            "rows_per_batch": (self.server.get("rows") or 0) / batches if batches else None,
        }


# --------------------------------------------------------------------------- the server process

class ServerProcess:
    """``loralens serve`` in a child process on a free loopback port."""

    def __init__(self, sources: Sequence[str], backend: str, replicate: int, extra: Sequence[str],
                 startup_timeout: float = 600.0):
        cmd = [sys.executable, "-m", "loralens.cli", "serve", *sources, "--backend", backend,
               "--port", "0", "--host", "127.0.0.1", "--replicate", str(replicate), *extra]
        if sum(len(c) + 1 for c in cmd) > 1_000_000:  # ARG_MAX is 2 MiB on Linux
            raise LoadTestError(f"{len(sources)} adapter sources do not fit on a command line")
        self.backend = backend
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self.url = None
        log = []
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            log.append(line)
            if line.startswith("listening on "):
                self.url = line.split()[2]
                break
        if self.url is None:
            self.close()
            raise LoadTestError(f"server ({backend}) did not start:\n" + "".join(log[-30:]))
        self.log = log  # keep draining its output so the pipe never fills up
        threading.Thread(target=self._pump, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self):
        for line in self.proc.stdout:
            self.log.append(line)
            del self.log[:-200]

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- the client

def metric_values(text: str) -> dict[str, float]:
    """Prometheus text exposition as ``{'name{labels}': value}`` (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a Prometheus histogram from its cumulative ``(le, count)``
    buckets, interpolated linearly inside the bucket it falls in (as Prometheus's
    ``histogram_quantile`` does; the first bucket starts at 0, a quantile in the +Inf
    bucket is the largest finite bound). None without observations."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def histogram_buckets(values: dict[str, float], name: str) -> list[tuple[float, float]]:
    """The cumulative ``(le, count)`` buckets of histogram ``name`` (no other labels) in
    :func:`metric_values`' output."""
    out = []
    prefix = f'{name}_bucket{{le="'
    for key, v in values.items():
        if key.startswith(prefix):
            out.append((float(key[len(prefix):].split('"')[0]), v))
    return sorted(out)



def process_memory(pid: int) -> dict:
    """``{"rss": VmRSS, "hwm": VmHWM}`` of process ``pid`` in bytes (Linux /proc), ``{}``
    where /proc has no such file."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss" if key == "VmRSS" else "hwm"] = int(value.split()[0]) * 1024  # kB
    return out


async def closed_loop(url: str, names: list[str], bodies: list[dict], clients: int,
                requests: int, seconds: float | None, warmup: int, backend: str,
                order: Sequence[int] | None = None, pid: int | None = None,
                scrape: bool = False) -> Cell:
    """One closed-loop run. Request ``i`` carries ``bodies[i]``; its adapter is
    ``names[i mod len(names)]``, or with ``order`` ``names[order[i]]`` for warm-up request
    ``i`` and ``names[order[w + i]]`` for timed request ``i`` (``w`` warm-up requests: the
    timed requests continue the sequence). ``pid``: the server's process, whose memory is
    read after warm-up and at the end; ``scrape``: /metrics too."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    n_warm = max(warmup, clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120.0) as http:
        counter = itertools.count()

        def body(i: int, shift: int = 0) -> dict:  # request i: the same text whatever the adapters
            k = i % len(names) if order is None else order[(shift + i) % len(order)]
            return {"adapter": names[k], **bodies[i % len(bodies)]}

        async def warm(i):
            r = await http.post("/v1/classify", json=body(i))
            r.raise_for_status()

        await asyncio.gather(*(warm(i) for i in range(n_warm)))
        shift = n_warm if order is not None else 0
        before = (await http.get("/health")).json()
        rss_warm = process_memory(pid) if pid is not None else None
        m_before = (await http.get("/metrics")).text if scrape else None
        lat: list[float] = []
        errors = 0
        deadline = None if seconds is None else time.perf_counter() + seconds

        # Closed-loop clients, not timing.time_interleaved: what is measured is a server
        # under concurrent load, so each client keeps its own stopwatch per request.
        async def client():
            nonlocal errors
            while True:
                i = next(counter)
                if i >= requests or (deadline is not None and time.perf_counter() > deadline):
                    return
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/classify", json=body(i, shift))
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    lat.append((time.perf_counter() - t0) * 1000)
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
        after = (await http.get("/health")).json()
        m_after = (await http.get("/metrics")).text if scrape else None
    server = {k: after[k] - before[k] for k in ("batches", "mixed_batches", "rows", "requests")}
    rss = None if pid is None else {"warm": rss_warm, "end": process_memory(pid)}
    return Cell(backend, len(names), clients, len(lat), errors, wall, lat, server, rss,
                (m_before, m_after) if scrape else None)


# --------------------------------------------------------------------------- the command

def request_bodies(task: str, glue_dir, n: int, seed: int = 0) -> list[dict]:
    """``n`` validation rows of ``task`` (a fixed random sample) as request bodies."""
    from loralens.tasks.sources import load_split
    from loralens.tasks.registry import get_task

    spec = get_task(task)
    split = load_split(spec, "validation", glue_dir)
    pick = np.random.default_rng(seed).choice(len(split.examples),
                                              min(n, len(split.examples)), replace=False)
    key = "pairs" if spec.is_pair else "texts"
    return [{key: [list(split.examples[i].texts) if spec.is_pair else split.examples[i].texts[0]]}
            for i in pick]


def choose_task(specs, task: str | None = None) -> tuple[str, list]:
    """The task of the load test and its adapters (in the order given).

    Every cell sends the same requests (request i carries text i of one task's
    validation sample), so that cells differ only in clients and adapter spread:
    mixing tasks would change the text lengths, hence the cost, with the number
    of adapters. Default: the task with the most adapters (first given on a tie).
    """
    known = [s for s in specs if s.task]
    if not known:
        raise LoadTestError("no adapter with a known task: give adapters from a run directory "
                            "(models/<task>/lora/seed<seed>/adapter); the load test sends real "
                            "validation rows of the adapters' task")
    counts: dict[str, int] = {}
    for s in known:
        counts[s.task] = counts.get(s.task, 0) + 1
    if task is None:
        task = max(counts, key=lambda t: counts[t])  # dicts keep order: first on a tie
    if task not in counts:
        raise LoadTestError(f"no adapter of task {task!r}; have {', '.join(counts)}")
    return task, [s for s in known if s.task == task]


def run_loadtest(sources: Sequence[str], task: str, out_dir: Path,
                 backends: Sequence[str] = BACKENDS,
                 clients: Sequence[int] = DEFAULT_CLIENTS,
                 adapters: Sequence[int] = DEFAULT_ADAPTERS, requests: int = 96,
                 seconds: float | None = None, warmup: int = 4, glue_dir=None,
                 server_args: Sequence[str] = (), progress: bool = True,
                 repeats: int = DEFAULT_REPEATS, traffic: str | None = None,
                 zipf_s: float = 1.1) -> dict:
    """Every (adapters, clients) cell ``repeats`` times on every backend, the servers
    interleaved (:func:`~loralens.analysis.latency.schedule`); writes
    loadtest.json, loadtest.csv, loadtest_runs.csv. ``traffic``: None sends request i to
    adapter i mod adapters; ``uniform`` or ``zipf`` (exponent ``zipf_s``) draws each
    request's adapter independently (:func:`~loralens.serving.bench.synthetic.traffic`,
    the same sequence in every run of a cell)."""
    _check_settings(backends, clients, adapters, requests, repeats)
    t_start = time.time()
    bodies = request_bodies(task, glue_dir, n=256)
    servers: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        procs: dict[str, ServerProcess] = {}
        adapter_names: dict[str, list[str]] = {}
        for backend in backends:  # all up at once: the cells interleave them
            procs[backend], adapter_names[backend], servers[backend] = _start_server(
                stack, sources, backend, task, max(adapters), server_args)

        def measure(backend: str, a: int, c: int) -> dict:
            order = None
            if traffic is not None:
                from loralens.serving.bench.synthetic import traffic as draw

                order = draw(a, max(warmup, c) + requests, traffic, zipf_s, seed=0)
            return _measure_run(procs[backend], adapter_names[backend][:a], bodies, c, requests,
                                seconds, warmup, order)

        runs = _scheduled_runs(backends, adapters, clients, repeats, measure, progress)
    cells = summarize_cells(runs)
    result = {
        "schema": 2,
        "sources": [str(s) for s in sources], "task": task,
        "backends": list(backends), "clients": list(clients), "adapters": list(adapters),
        "requests_per_cell": requests, "seconds_per_cell": seconds, "warmup": warmup,
        "repeats": repeats, "interleaved": True,
        "traffic": traffic or "round-robin", "zipf_s": zipf_s if traffic == "zipf" else None,
        "interval": "95% t-interval of the mean throughput over repeats",
        "server_args": list(server_args),
        **_outcome(t_start, servers, cells, runs),
    }
    write_csv(out_dir / LOADTEST_CSV, cells)
    write_csv(out_dir / LOADTEST_RUNS_CSV, runs)
    atomic_write_json(out_dir / LOADTEST_JSON, result)
    return result


def _check_settings(backends: Sequence[str], clients: Sequence[int], adapters: Sequence[int],
                    requests: int, repeats: int) -> None:
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise LoadTestError(f"unknown backend(s) {bad}; choose from {', '.join(BACKENDS)}")
    if min(clients) < 1 or min(adapters) < 1 or requests < 1 or repeats < 1:
        raise LoadTestError("clients, adapters, requests and repeats must be >= 1")


def _start_server(stack: contextlib.ExitStack, sources: Sequence[str], backend: str, task: str,
                  adapters: int, server_args: Sequence[str]
                  ) -> tuple[ServerProcess, list[str], dict]:
    """Start ``backend``'s server (``stack`` closes it) with ``adapters`` adapters of
    ``task``: the server, its adapter names, and its entry of the result's ``servers``
    (startup seconds, adapters, ``/health``)."""
    import httpx

    with stopwatch() as startup:
        srv = stack.enter_context(ServerProcess(sources, backend, adapters, server_args))
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        infos = {a["name"]: a for a in http.get("/v1/adapters").json()["adapters"]}
        health = http.get("/health").json()
    if len(infos) < adapters:
        raise LoadTestError(f"server has {len(infos)} adapters, need {adapters}")
    other = [n for n in infos if infos[n].get("task") != task]
    if other:
        raise LoadTestError(f"server loaded adapters of other tasks than {task}: {other}")
    entry = {"startup_s": round(startup.seconds, 3), "adapters": len(infos), "health": health}
    return srv, list(infos), entry


def _measure_run(srv: ServerProcess, names: list[str], bodies: list[dict], clients: int,
                 requests: int, seconds: float | None, warmup: int,
                 order: Sequence[int] | None = None) -> dict:
    """One run of a cell on ``srv``: its :meth:`Cell.summary`."""
    cell = asyncio.run(closed_loop(srv.url, names, bodies, clients, requests, seconds, warmup,
                             srv.backend, order))
    if srv.proc.poll() is not None:
        raise LoadTestError(f"server ({srv.backend}) exited:\n" + "".join(srv.log[-30:]))
    return cell.summary()


def _scheduled_runs(backends: Sequence[str], adapters: Sequence[int], clients: Sequence[int],
                    repeats: int, measure: Callable[[str, int, int], dict],
                    progress: bool) -> list[dict]:
    """:func:`~loralens.analysis.latency.schedule`, with a progress bar when
    ``progress``."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(backends) * len(clients) * len(adapters) * repeats,
                   desc="loadtest", unit="run")

    def done(run: dict) -> None:
        if bar is not None:
            tp = run["throughput_rps"]
            bar.set_postfix_str(f"{run['backend']} a={run['adapters']} c={run['clients']} "
                                f"r={run['repeat']} " + (f"{tp:.1f} req/s" if tp else ""))
            bar.update()

    try:
        return schedule(list(backends), list(adapters), list(clients), repeats, measure, done)
    finally:
        if bar is not None:
            bar.close()


def _outcome(t_start: float, servers: dict[str, dict], cells: list[dict],
             runs: list[dict]) -> dict:
    """The result's entries after the settings: the machine, when and how long, the
    servers, cells, runs and crossovers."""
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_start)),
        "wall_s": round(time.time() - t_start, 2),
        "servers": servers,
        "cells": cells,
        "runs": runs,
        "crossovers": crossovers(cells),
    }


def cli_command(args) -> str:
    """``loralens loadtest``: runs it; returns the summary table and where the results
    are, for the command line to print."""
    if bool(args.sources) == (args.synthetic is not None):
        raise LoadTestError("give adapter sources or --synthetic N (not both)")
    if args.synthetic is not None and args.synthetic < 1:
        raise LoadTestError(f"--synthetic {args.synthetic}: give at least 1 adapter")
    with contextlib.ExitStack() as stack:
        if args.synthetic:
            import tempfile

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loralens-syn-")))
            args.sources = synthetic_sources(tmp, args.synthetic, args.task or "sst2")
            args.adapters = args.adapters or sorted({1, args.synthetic})
            args.backends = args.backends or "ours"  # merged: one model per adapter
        return _cli_run(args)


def synthetic_sources(root: Path, n: int, task: str = "sst2") -> list[str]:
    """``n`` generated rank-8 adapters of the study's LoRA method for the default model
    (:mod:`loralens.serving.bench.synthetic`) under ``root``, as ``NAME=DIR`` sources."""
    from loralens.core.config import ModelConfig
    from loralens.models.classifier import load_base
    from loralens.serving.bench import synthetic as S

    mc = ModelConfig()
    backbone = load_base(mc).backbone()
    shapes = S.projection_shapes(backbone, S.study_targets())
    hidden = backbone.config.hidden_size
    del backbone
    made = S.generate_adapters(root, [8] * n, shapes, hidden, task, base_model=mc.name)
    return [f"{name}={d}" for name, d in made]


def _cli_run(args) -> str:
    from loralens.serving.sources import collect_adapters

    specs, run_dir = collect_adapters(args.sources)  # fail early, before starting servers
    task, chosen = choose_task(specs, args.task)
    run = RunDir(run_dir) if run_dir is not None else None
    out = Path(args.out) if args.out else (run.loadtest_dir if run else Path("loadtest"))
    if (out / LOADTEST_JSON).exists() and not args.overwrite:
        raise LoadTestError(f"{out / LOADTEST_JSON} exists; pass --overwrite to replace it "
                            "or --out for another directory")
    glue_dir, server_args = args.glue_dir, []
    if run is not None:
        cfg = run.load_config()
        resolve_config_tasks(cfg)
        glue_dir = glue_dir or cfg.data.glue_dir
        # the servers get the adapters as NAME=DIR: pass the run's base model along
        server_args += ["--model", cfg.model.name, "--max-length", str(cfg.data.max_length)]
        if cfg.model.revision:
            server_args += ["--revision", cfg.model.revision]
        if cfg.model.trust_remote_code:
            server_args += ["--trust-remote-code"]
    server_args += ["--max-wait-ms", str(args.max_wait_ms), "--max-batch", str(args.max_batch)]
    if args.threads:
        server_args += ["--threads", str(args.threads)]
    if args.synthetic:  # generated for the default model
        from loralens.core.config import ModelConfig

        server_args += ["--model", ModelConfig().name]
    backends = [b.strip() for b in (args.backends or ",".join(BACKENDS)).split(",") if b.strip()]
    sources = [f"{s.name}={s.path}" for s in chosen]  # only the chosen task's adapters
    result = run_loadtest(sources, task, out, backends, args.clients,
                          args.adapters or list(DEFAULT_ADAPTERS), args.requests, args.seconds,
                          args.warmup, glue_dir, server_args, progress=not args.no_progress,
                          repeats=args.repeats, traffic=args.traffic, zipf_s=args.zipf_s)
    return "\n".join([*table_lines(result), f"results in {out}"])
