"""Benchmark: many LoRA adapters in one server (issue 29.2): throughput, latency and memory
at 1, 10, 100 and 1000 adapters, mixed ranks, and a memory budget.

Adapters are generated, not trained (:mod:`loralens.serving.bench.synthetic`): the study's
``lora`` method (rank 8 on q_proj/v_proj, alpha 16) for SmolLM2-135M-Instruct (the embedded
default: Q4_1 weights dequantized to float32), A as PEFT initialises it, B ~ N(0, 0.015)
(a trained SmolLM2 SST-2 B), each with its own random 2-label head, saved in PEFT's layout
(1.86 MB per rank-8 file). They are written once under ``--adapters-dir`` and reused.

Every point runs in a FRESH ``loralens serve`` process (backend ours, the server's default
batch limit and batching window) on a free loopback port, started by this script with the
point's adapters as ``NAME=DIR`` sources. 16 closed-loop clients send SST-2 validation
sentences (the same 256-sentence sample as ``loralens loadtest``), each request's adapter
drawn independently: uniform or Zipf (s = 1.1; popularity ranks shuffled over the adapters)
over the point's adapters. Per point: warm-up, then ``--repeats`` timed rounds of
``--requests`` requests (throughput = answered requests / wall time of the round; the table
shows the median over rounds; p50/p99 latency over all timed requests, as the client sees
it, HTTP included).

Paired rounds: every point but the 1-adapter ones runs beside its own PAIRED REFERENCE, a
fresh 1-adapter server started with the point's server (the same age: a fresh process and
one that has served for half an hour do not run at the same speed here), warmed the same
way, and idle while the other one is timed. The point's timed rounds alternate with rounds
of the same number of requests on it, in ABBA order (reference first in even rounds,
second in odd ones, so a drift within the pair cancels); a point's ``x ref`` is the median
over its rounds of (the point's req/s / its paired round's req/s). Why: throughput on this
2-core VM drifts within a run (the 1-adapter point measured 12.9 first and 14.4 req/s last,
rounds 12.1-17.8, nothing else running), so points measured minutes apart from one
reference differed by that drift: 1000 uniform read 0.72x against the first/last 1-adapter
point and 0.92x in rounds interleaved with a 1-adapter server; and one long-lived reference
server for the whole run (the first version of the pairing) ran faster than the fresh
point servers (10 uniform 0.87-0.99x against it), a bias of its own (issue 29's notes). The
first/last reference is kept beside it (``x ref (first/last)``).

Points (``--quick``: 96 requests, 1 round, points 1/10/100, a mixed point of 20 adapters
and a budget of 10 over 100):

* ``1``: one adapter, run first and again last; the reference of every ratio (its rounds
  from both runs pooled). After its rounds the adapter is removed (DELETE /v1/adapters) and
  VmRSS read again: that is the BASE, the same server with no adapter loaded;
* ``N uniform`` / ``N zipf`` for N = 10, 100, 1000 (all loaded);
* ``mixed``: 100 adapters of ranks 4, 8, 16, 64 in turn (uniform traffic);
* ``budget``: 1000 adapters known, ``--max-loaded 100``, Zipf traffic (warm-up of 10 x the
  budget requests first, so the timed rounds see a full cache).

Memory = the server's VmRSS (``/proc/PID/status``) after the point's last timed round and
the server's idle release (``Service.idle_trim_s``: after 1 s without a request it runs
Python's garbage collector and hands glibc's free heap pages back, ``malloc_trim``) minus
the base; the RSS right after the last round is kept beside it (``rss_busy``). The base is
read, after the same idle release, once the one adapter is freed, so it can exceed a true never-loaded base by at most
that adapter's bytes if the allocator keeps them (1.85 MB; shown beside it: the 1-adapter
server's own VmRSS). Growth per adapter = (memory(N) - memory(1)) / (N - 1).

Budgeted store: hit rate = hits / (hits + misses) over the timed rounds, from the store's
``/metrics`` counters; beside it the hit rate LRU should reach on this traffic: Che's
approximation for independent requests with popularities p_i (T solves
sum_i (1 - exp(-p_i T)) = C; hit rate = sum_i p_i (1 - exp(-p_i T)); 0.673 for C = 100 of
1000 at s = 1.1) and an exact LRU simulation of the request sequence sent. Cold-load
latency = p50 of the store's ``loralens_adapter_store_load_seconds`` histogram over the
timed rounds (interpolated within Prometheus buckets; the mean = sum / count beside it):
the store's load latency, from the miss (the first request naming an unloaded adapter, on
arrival) to the adapter usable by the next batch the server forms (read, evict, install;
plus the wait for the running batch where the install falls back to between batches),
not the cold request's end-to-end latency (which adds its own batch's wait and forward:
it is among the point's request latencies, p50/p99).

``--profile``: py-spy samples the server process (all threads, Python frames; time in
torch's kernels is charged to the Python line that calls them) during one extra, untimed
round of the largest all-loaded uniform point, and the top entries are printed (raw stacks
saved next to the results).

The ratios of the issue's goals table are printed last, each with its goal and PASS/FAIL.

    flock /tmp/loralens-bench.lock python bench/adapters_at_scale.py --out bench-out    # full
    python bench/adapters_at_scale.py --quick                                          # smoke
    python bench/adapters_at_scale.py --profile --out bench-out      # + where the time goes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loralens.core.config import ModelConfig
from loralens.core.timing import stopwatch
from loralens.serving.bench import synthetic as S
from loralens.serving.cli_args import add_serve_arguments
from loralens.serving.server import IDLE_TRIM_S
from loralens.serving.loadtest import (ServerProcess, closed_loop, histogram_buckets,
                                       histogram_quantile, metric_values, process_memory,
                                       request_bodies)

CLIENTS = 16
ZIPF_S = 1.1
MIXED_RANKS = (4, 8, 16, 64)
MB = 1e6
LOAD_METRIC = "loralens_adapter_store_load_seconds"


@dataclass
class Point:
    label: str
    n: int                      # adapters the traffic goes to (known to the server)
    traffic: str = "uniform"
    mixed: bool = False         # ranks MIXED_RANKS in turn, else rank 8
    max_loaded: int | None = None
    reference: bool = False     # the 1-adapter point (also measures the base)
    profile: bool = False


def plan(quick: bool, profile: bool) -> list[Point]:
    sizes = (10, 100) if quick else (10, 100, 1000)
    top = sizes[-1]
    points = [Point("1", 1, reference=True)]
    for n in sizes:
        points += [Point(f"{n} uniform", n, profile=profile and n == top),
                   Point(f"{n} zipf", n, "zipf")]
    points.append(Point("mixed ranks", 20 if quick else 100, mixed=True))
    points.append(Point(f"budget {top // 10} of {top}", top, "zipf", max_loaded=top // 10))
    points.append(Point("1 (again)", 1, reference=True))
    return points


def has_max_loaded() -> bool:
    """Whether ``loralens serve`` takes ``--max-loaded`` (the adapter store)."""
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    _, unknown = p.parse_known_args(["x", "--max-loaded", "1"])
    return not unknown


# --------------------------------------------------------------------------- adapters

def make_adapters(root: Path, n_r8: int, n_mixed: int):
    """(rank-8 adapters, mixed-rank adapters) as [(name, dir)], generated once."""
    from loralens.models.classifier import load_base

    mc = ModelConfig()
    backbone = load_base(mc).backbone()
    shapes = S.projection_shapes(backbone, S.study_targets())
    hidden = backbone.config.hidden_size
    del backbone
    with stopwatch() as sw:
        r8 = S.generate_adapters(root / "r8", [8] * n_r8, shapes, hidden, base_model=mc.name)
        ranks = [MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(n_mixed)]
        mixed = S.generate_adapters(root / "mixed", ranks, shapes, hidden, base_model=mc.name,
                                    seed=1)
    print(f"adapters in {root} ({sw.seconds:.0f} s to generate or check)", flush=True)
    return r8, mixed


# --------------------------------------------------------------------------- one point

def run_point(pt: Point, adapters, bodies, args, out_dir: Path | None,
              ref_adapter: "tuple[str, Path] | None" = None) -> dict:
    """One point in a fresh server; with ``ref_adapter`` (NAME, DIR) a fresh 1-adapter
    paired reference beside it, started and warmed with it, rounds interleaved ABBA."""
    import httpx

    names = [n for n, _ in adapters]
    sources = [f"{n}={d}" for n, d in adapters]
    extra = ["--model", ModelConfig().name]
    if args.threads:
        extra += ["--threads", str(args.threads)]
    ref = None
    if ref_adapter is not None:  # started first: it waits idle while the point's loads
        ref = ServerProcess([f"{ref_adapter[0]}={ref_adapter[1]}"], "ours", 0, extra,
                            startup_timeout=3600)
    if pt.max_loaded:
        extra = extra + ["--max-loaded", str(pt.max_loaded)]
    srv = None
    rec = {"point": pt.label, "reference": pt.reference, "adapters": pt.n, "traffic": pt.traffic,
           "max_loaded": pt.max_loaded, "file_bytes": S.file_bytes(d for _, d in adapters),
           "ranks": dict(Counter(int(n.rsplit("-r", 1)[1]) for n in names))}
    try:
        with stopwatch() as startup:
            srv = ServerProcess(sources, "ours", 0, extra, startup_timeout=3600)
        rec["startup_s"] = round(startup.seconds, 2)
        rec["rss_started"] = process_memory(srv.pid).get("rss")
        warm = max(args.warmup, 10 * pt.max_loaded) if pt.max_loaded else args.warmup
        if ref is not None:  # warmed as the point's server is (its rounds send CLIENTS more)
            asyncio.run(closed_loop(ref.url, [ref_adapter[0]], bodies, CLIENTS, CLIENTS, None,
                                    args.warmup, "ours"))
        rounds, sent, paired_rps = [], [], []

        def ref_round():
            pc = asyncio.run(closed_loop(ref.url, [ref_adapter[0]], bodies, CLIENTS,
                                         args.requests, None, CLIENTS, "ours"))
            paired_rps.append(pc.requests / pc.wall_s)

        for r in range(args.repeats):
            w = warm if r == 0 else CLIENTS
            order = S.traffic(pt.n, w + args.requests, pt.traffic, ZIPF_S, seed=r)
            if ref is not None and r % 2 == 0:  # ABBA: reference first in even rounds
                ref_round()
            cell = asyncio.run(closed_loop(srv.url, names, bodies, CLIENTS, args.requests, None,
                                           w, "ours", order, pid=srv.pid, scrape=True))
            rounds.append(cell)
            sent.append(order)
            if ref is not None and r % 2 == 1:  # ... and second in odd ones
                ref_round()
            if srv.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(srv.log[-30:]))
        if ref is not None:
            ref.close()
            ref = None
        rec.update(summarize_rounds(rounds, sent, warm, pt))
        if paired_rps:
            rec["paired_ref_rps_rounds"] = [round(x, 3) for x in paired_rps]
            rec["x_paired"] = statistics.median(a / b for a, b in zip(rec["rps_rounds"], paired_rps))
        # memory after garbage collection: the server collects and hands its freed heap
        # back once idle for IDLE_TRIM_S after a batch (Service.idle_trim_s); read then
        time.sleep(IDLE_TRIM_S + 1.5)
        rec["rss_busy"], rec["rss_end"] = rec["rss_end"], process_memory(srv.pid).get("rss")
        if pt.profile:
            rec["profile"] = profile_round(srv, names, bodies, pt, args, out_dir)
        if pt.reference:  # the base: the same server with its adapter removed
            with httpx.Client(base_url=srv.url, timeout=60) as http:
                http.delete(f"/v1/adapters/{names[0]}").raise_for_status()
            time.sleep(IDLE_TRIM_S + 1.5)  # as rss_end: after the idle trim
            rec["rss_base"] = process_memory(srv.pid).get("rss")
    except Exception as e:  # one failed point does not lose the others
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["server_log"] = "".join((srv or ref).log[-40:]) if (srv or ref) else ""
    finally:
        for s_ in (srv, ref):
            if s_ is not None:
                s_.close()
    return rec


def summarize_rounds(rounds, sent, warm: int, pt: Point) -> dict:
    rps = [c.requests / c.wall_s for c in rounds]
    lat = np.concatenate([np.asarray(c.latencies_ms) for c in rounds])
    last = rounds[-1]
    out = {"rps_rounds": [round(x, 3) for x in rps], "rps": statistics.median(rps),
           "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
           "errors": sum(c.errors for c in rounds),
           "rows_per_batch": statistics.median(c.server["rows"] / c.server["batches"]
                                               for c in rounds if c.server["batches"]),
           "rss_end": last.rss["end"].get("rss"), "hwm_end": last.rss["end"].get("hwm"),
           "rss_warm": rounds[0].rss["warm"].get("rss")}
    if pt.max_loaded:
        hits = misses = loads = evictions = 0
        bucket_delta: dict[float, float] = {}
        load_sum = load_count = 0.0
        for c in rounds:
            a, b = (metric_values(t) for t in c.metrics)
            d = {k: b.get(k, 0) - a.get(k, 0) for k in b}
            hits += d.get("loralens_adapter_store_hits_total", 0)
            misses += d.get("loralens_adapter_store_misses_total", 0)
            loads += d.get("loralens_adapter_store_loads_total", 0)
            evictions += d.get("loralens_adapter_store_evictions_total", 0)
            load_sum += d.get(f"{LOAD_METRIC}_sum", 0)
            load_count += d.get(f"{LOAD_METRIC}_count", 0)
            for le, cnt in histogram_buckets(d, LOAD_METRIC):
                bucket_delta[le] = bucket_delta.get(le, 0) + cnt
        p50 = histogram_quantile(0.5, sorted(bucket_delta.items()))
        p = S.zipf_probabilities(pt.n, ZIPF_S) if pt.traffic == "zipf" else np.full(pt.n, 1 / pt.n)
        exact = statistics.mean(S.lru_hit_rate(order, pt.max_loaded, warmup=w)
                                for order, w in zip(sent, [warm] + [CLIENTS] * (len(sent) - 1)))
        out.update({"hits": hits, "misses": misses, "loads": loads, "evictions": evictions,
                    "hit_rate": hits / (hits + misses) if hits + misses else None,
                    "hit_rate_che": S.che_hit_rate(p, pt.max_loaded),
                    "hit_rate_lru_exact": exact,
                    "load_p50_ms": None if p50 is None else p50 * 1e3,
                    "load_mean_ms": load_sum / load_count * 1e3 if load_count else None})
    return out


# --------------------------------------------------------------------------- profile

def profile_round(srv, names, bodies, pt: Point, args, out_dir: Path | None) -> dict:
    """py-spy on the server during one extra round; the top entries."""
    raw = (out_dir or Path(args.adapters_dir)) / f"profile-{pt.n}.txt"
    raw.parent.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    spy = subprocess.Popen([exe, "record", "--pid", str(srv.pid), "--rate", "200",
                            "--format", "raw", "--threads", "-o", str(raw)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    order = S.traffic(pt.n, CLIENTS + args.requests, pt.traffic, ZIPF_S, seed=99)
    asyncio.run(closed_loop(srv.url, names, bodies, CLIENTS, args.requests, None, CLIENTS,
                            "ours", order))
    spy.send_signal(signal.SIGINT)
    try:
        log = spy.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        spy.kill()
        log = spy.communicate()[0]
    if not raw.is_file():
        return {"error": log[-2000:]}
    return summarize_profile(raw.read_text(), top=args.profile_top) | {"raw": str(raw)}


def summarize_profile(text: str, top: int = 15) -> dict:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) stacks
    (``thread (tid): name;frame;...;frame count``)."""
    threads, own, incl = Counter(), Counter(), Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        frames = frames[1:]
        total += n
        threads[thread.split("_")[0] if thread.startswith("loralens") else thread] += n
        if frames:
            own[frames[-1]] += n
        for f in {f.rsplit(":", 1)[0] for f in frames}:  # function (file), once per stack
            incl[f] += n
    share = (lambda c: [[k, round(v / total, 4)] for k, v in c.most_common(top)]) if total \
        else (lambda c: [])
    return {"samples": total, "threads": share(threads), "self": share(own),
            "inclusive": share(incl)}


# --------------------------------------------------------------------------- results

def mb(x) -> str:
    return "-" if x is None else f"{x / MB:.1f}"


def f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(recs: list[dict], ref_rps: float, base: float | None, mem1: float | None) -> list[str]:
    head = ("point", "adapters", "loaded", "req/s", "x ref", "x ref (first/last)", "p50 ms", "p99 ms", "rows/batch",
            "mem MB", "MB/adapter", "files MB", "mem/files", "hit", "LRU (Che)", "LRU exact",
            "load p50 ms", "startup s")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in recs:
        mem = None if base is None or r.get("rss_end") is None else r["rss_end"] - base
        r["memory"] = mem
        grow = (mem - mem1) / (r["adapters"] - 1) if mem is not None and mem1 is not None \
            and r["adapters"] > 1 else None
        r["growth_per_adapter"] = grow
        loaded = r["max_loaded"] or r["adapters"]
        files = r["file_bytes"] * min(1, loaded / r["adapters"])
        lines.append(" | ".join([
            r["point"], str(r["adapters"]), str(loaded), f(r["rps"]), f(x_ref(r, ref_rps), "{:.3f}"),
            f(r["rps"] / ref_rps, "{:.3f}"),
            f(r["p50_ms"]), f(r["p99_ms"]), f(r["rows_per_batch"]), mb(mem), mb(grow),
            mb(files), f(mem / files if mem is not None else None, "{:.2f}"),
            f(r.get("hit_rate"), "{:.3f}"), f(r.get("hit_rate_che"), "{:.3f}"),
            f(r.get("hit_rate_lru_exact"), "{:.3f}"), f(r.get("load_p50_ms")),
            f(r["startup_s"])]))
    return lines


def x_ref(r: dict, ref_rps: float) -> float:
    """A point's throughput against 1 adapter: paired rounds where it has them (the
    reference points are 1 by definition), else against the first/last reference."""
    if r.get("x_paired") is not None:
        return r["x_paired"]
    return 1.0 if r["reference"] else r["rps"] / ref_rps


def goals(recs: list[dict], ref_rps: float, top: int) -> list[tuple[str, float | None, str, bool]]:
    by = {r["point"]: r for r in recs}
    z, u = by.get(f"{top} zipf"), by.get(f"{top} uniform")
    mixed = by.get("mixed ranks")
    budget = next((r for r in recs if r["max_loaded"]), None)
    out = []

    def add(name, value, goal, ok):
        out.append((name, value, goal, ok))

    if z:
        v = x_ref(z, ref_rps)
        add(f"{top} adapters zipf, all loaded: req/s vs 1", v, ">= 0.90", v >= 0.90)
    if u:
        v = x_ref(u, ref_rps)
        add(f"{top} adapters uniform, all loaded: req/s vs 1", v, ">= 0.85", v >= 0.85)
        if u.get("memory") is not None:
            v = u["memory"] / u["file_bytes"]
            add(f"memory with {top} loaded / ({top} x file size)", v, "<= 1.10", v <= 1.10)
    if mixed and mixed.get("memory") is not None:
        v = mixed["memory"] / mixed["file_bytes"]
        add("mixed ranks {4,8,16,64}: memory / sum of file sizes", v, "<= 1.10", v <= 1.10)
    if budget and "hit_rate" in budget and z:
        v = x_ref(budget, ref_rps) / x_ref(z, ref_rps)  # each against its paired rounds
        add(f"budget {budget['max_loaded']} of {budget['adapters']}, zipf: req/s vs all loaded",
            v, ">= 0.80", v >= 0.80)
        if budget["hit_rate"] is not None:
            v = budget["hit_rate"] - budget["hit_rate_che"]
            add("hit rate - LRU expected (Che)", v, "within +-0.05", abs(v) <= 0.05)
        if budget.get("load_p50_ms") is not None:
            v = budget["load_p50_ms"]
            add("cold load while serving, p50 ms", v, "<= 50", v <= 50)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--summarize-profile":  # re-read a raw profile
        print(json.dumps(summarize_profile(Path(sys.argv[2]).read_text()), indent=1))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke check: 96 requests, 1 round, points 1/10/100")
    ap.add_argument("--requests", type=int, help="timed requests per round (default 480)")
    ap.add_argument("--repeats", type=int, help="timed rounds per point (default 3)")
    ap.add_argument("--warmup", type=int, default=CLIENTS * 2,
                    help="untimed requests before a point's first round (budget: 10 x budget)")
    ap.add_argument("--threads", type=int, help="server torch threads (default: torch's)")
    ap.add_argument("--adapters-dir", default="/tmp/loralens-adapters-at-scale",
                    help="where the generated adapters are kept (reused across runs)")
    ap.add_argument("--glue-dir", help="GLUE root (default $LORALENS_GLUE_DIR)")
    ap.add_argument("--out", help="directory for adapters_at_scale.json (and the profile)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the largest all-loaded uniform point; print the top entries")
    ap.add_argument("--profile-top", type=int, default=15, help="entries printed per list")
    ap.add_argument("--only", help="comma-separated point labels to run (with the reference)")
    args = ap.parse_args()
    args.requests = args.requests or (96 if args.quick else 480)
    args.repeats = args.repeats or (1 if args.quick else 3)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out_dir = Path(args.out) if args.out else None
    points = plan(args.quick, args.profile)
    if args.only:
        keep = {s.strip() for s in args.only.split(",")}
        points = [p for p in points if p.reference or p.label in keep]
    budget_ok = has_max_loaded()
    if not budget_ok:
        print("note: this loralens serve has no --max-loaded: the budget point is skipped")
        points = [p for p in points if not p.max_loaded]
    top = max(p.n for p in points if not p.mixed)
    n_mixed = max([p.n for p in points if p.mixed], default=0)
    r8, mixed = make_adapters(Path(args.adapters_dir), top, n_mixed)
    bodies = request_bodies("sst2", args.glue_dir, n=256)
    print(f"SmolLM2-135M-Instruct (Q4_1 dequantized to float32), backend ours, {CLIENTS} "
          f"closed-loop clients, SST-2 validation sentences; {args.requests} requests x "
          f"{args.repeats} rounds per point; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.time()
    recs, failed = [], []
    # an untimed server first: in smoke runs here the first server process was several
    # times slower than every later one (the same 1-adapter point last was not)
    run_point(Point("warm-up", 1), r8[:1], bodies, args, None)
    for pt in points:
        ads = (mixed if pt.mixed else r8)[:pt.n]
        rec = run_point(pt, ads, bodies, args, out_dir, None if pt.reference else r8[0])
        if "error" in rec:
            failed.append(rec)
            print(f"  {pt.label:>18s}: FAILED {rec['error']}\n    server log:\n"
                  + rec["server_log"], flush=True)
            continue
        recs.append(rec)
        print(f"  {pt.label:>18s}: {rec['rps']:.1f} req/s, p50 {rec['p50_ms']:.0f} ms, "
              f"p99 {rec['p99_ms']:.0f} ms, VmRSS {mb(rec['rss_end'])} MB, startup "
              f"{rec['startup_s']:.0f} s" + (f", hit rate {f(rec.get('hit_rate'), '{:.3f}')}"
                                             if pt.max_loaded else "")
              + (f"; x paired ref {rec['x_paired']:.3f} (paired rounds "
                 f"{', '.join(f'{x:.1f}' for x in rec['paired_ref_rps_rounds'])} req/s)"
                 if rec.get("x_paired") is not None else ""), flush=True)
    refs = [r for r in recs if r["reference"]]
    if not refs:
        sys.exit("the 1-adapter reference failed: no ratios")
    ref_rps = statistics.median(x for r in refs for x in r["rps_rounds"])
    bases = [r["rss_base"] for r in refs if r.get("rss_base")]
    base = statistics.median(bases) if bases else None
    mem1 = statistics.median(r["rss_end"] - base for r in refs) if base else None
    lines = table(recs, ref_rps, base, mem1)
    print(f"\nall points in one run ({(time.time() - t0) / 60:.1f} min); reference: 1 adapter, "
          f"{ref_rps:.1f} req/s (median of {sum(len(r['rps_rounds']) for r in refs)} rounds, "
          f"first and last point); base VmRSS {mb(base)} MB (1-adapter server after removing "
          f"its adapter; with it: {mb(statistics.median(r['rss_end'] for r in refs))} MB); "
          "x ref: each point's rounds against paired rounds on a fresh 1-adapter server "
          "started beside it (ABBA order; median of the per-round ratios)")
    print("\n".join(lines))
    for r in failed:
        print(f"FAILED: {r['point']}: {r['error']}")
    for r in recs:
        if r.get("profile") and "self" in r["profile"]:
            pr = r["profile"]
            print(f"\nprofile of '{r['point']}' ({pr['samples']} samples, py-spy; raw: {pr['raw']})")
            print("  threads: " + ", ".join(f"{k} {v:.0%}" for k, v in pr["threads"]))
            print("  self (innermost Python frame; torch kernels count on their caller):")
            for k, v in pr["self"]:
                print(f"    {v:6.1%}  {k}")
            print("  inclusive:")
            for k, v in pr["inclusive"]:
                print(f"    {v:6.1%}  {k}")
        elif r.get("profile"):
            print(f"\nprofile failed: {r['profile'].get('error')}")
    results = goals(recs, ref_rps, top)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "adapters_at_scale.json").write_text(json.dumps(
            {"points": recs, "failed": failed, "reference_rps": ref_rps, "base_rss": base, "clients": CLIENTS,
             "requests": args.requests, "repeats": args.repeats, "quick": args.quick,
             "goals": [dict(zip(("measure", "value", "goal", "pass"), g)) for g in results]},
            indent=1, default=str))
    print("\nratios (issue 29 goals" + (", quick: largest point 100" if args.quick else "")
          + "; answers' identity is tested, not benchmarked, here):")
    for name, v, goal, ok in results:
        print(f"  {name}: {v:.3f} (goal {goal}) {'PASS' if ok else 'FAIL'}")
    print("summary: " + " | ".join(f"{name}: {v:.3f} {'PASS' if ok else 'FAIL'}"
                                   for name, v, _, ok in results))


if __name__ == "__main__":
    main()
