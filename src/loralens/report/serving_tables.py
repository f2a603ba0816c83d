"""The serving tables: latency per strategy (Table 5), several adapters on one base
(Table 5b) and concurrent load (Table 6), from ``bench/serving.json`` and
``loadtest/loadtest.json``.
"""

from __future__ import annotations

from .formatting import DASH, KINDS, Table, f, finite, g, pm, pval, seconds, signed_pct, yesno
from .run_data import RunData


def serving_extras(s: dict, task: str, batch: int, kind: str) -> tuple[list, list, list]:
    """(throughputs, peak memory increases in MB, other-process CPU shares) over seeds."""
    tp, mem, share = [], [], []
    for seed in ((s.get("tasks") or {}).get(task) or {}).get("seeds", {}).values():
        b = (seed.get("batch") or {}).get(str(batch)) or {}
        k = (b.get("kinds") or {}).get(kind) or {}
        if finite(k.get("throughput_rps")):
            tp.append(k["throughput_rps"])
        m = (seed.get("memory") or {}).get(kind) or {}
        if finite(m.get("peak_increase_mb")):
            mem.append(m["peak_increase_mb"])
        if finite(b.get("other_processes_cpu_share")):
            share.append(b["other_processes_cpu_share"])
    return tp, mem, share


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


def table5(d: RunData) -> Table | None:
    s = d.serving or {}
    comp = s.get("comparison") or []
    if not comp:
        return None
    rows, busy = [], []
    for r in comp:
        task, b, kind = r.get("task"), r.get("batch_size"), r.get("kind")
        tp, mem, share = serving_extras(s, task, b, kind)
        busy += share
        rows.append([str(task), str(b), KINDS.get(kind, str(kind)),
                     f"{r.get('seeds', DASH)} / {r.get('n', DASH)}",
                     pm(r.get("mean_ms"), r.get("sd_ms"), lambda v: f"{v:.1f}"),
                     f(r.get("p95_ms"), 1), signed_pct(r.get("overhead_vs_full_pct")),
                     pval(r.get("p_vs_full")), signed_pct(r.get("overhead_vs_lora_merged_pct")),
                     f(_mean(tp), 1), f(_mean(mem), 0)])
    notes = [f"Each request: 'Batch' validation examples; {s.get('warmup', '?')} warm-up "
             f"requests per model; models served interleaved on {s.get('device', '?')} with "
             f"{s.get('threads', '?')} threads; latency is one forward pass (tokenization "
             "excluded), pooled over seeds. p: two-sided Mann-Whitney U on per-request "
             "latencies vs full fine-tuning. Memory: peak increase while the model loads and "
             "serves its warm-up requests (mean over seeds)."]
    if busy:
        notes.append(f"Other processes used up to {100 * max(busy):.0f}% of the machine's CPU "
                     "time while requests were timed (shared machine: absolute latencies are "
                     "noisy; the interleaving keeps the comparison fair).")
    return Table("table-5-serving", "Table 5: serving latency per strategy",
                 ["Task", "Batch", "Strategy", "Seeds / requests", "Mean ms ± sd", "p95 ms",
                  "Overhead vs full FT", "p vs full FT", "Overhead vs merged",
                  "Throughput (rows/s)", "Peak memory +MB"], rows, notes=notes)


MULTI_PATHS = {"runtime": "our runtime", "peft": "PEFT (set_adapter)",
               "peft_adapter_names": "PEFT (adapter_names)",
               "merged_single_model": "one merged model (reference)"}


def table5_multi(d: RunData) -> Table | None:
    m = (d.serving or {}).get("multi")
    if not isinstance(m, dict) or not (m.get("stream") or m.get("mixed")):
        return None
    rows = []
    for p, v in (m.get("stream") or {}).items():
        rows.append(["round-robin stream (batch 1)", MULTI_PATHS.get(p, p),
                     pm(v.get("mean_ms"), v.get("sd_ms"), lambda x: f"{x:.1f}"),
                     f(v.get("p95_ms"), 1), f(v.get("throughput_rps"), 1), DASH,
                     f(v.get("switch_median_ms"), 3), g(v.get("max_abs_logit_diff_vs_single"), 2),
                     yesno(v.get("same_predictions"))])
    mixed = m.get("mixed") or {}
    for p, v in mixed.items():
        if not isinstance(v, dict):
            continue
        rows.append([f"mixed batches of {mixed.get('batch_size', '?')}", MULTI_PATHS.get(p, p),
                     pm(v.get("mean_ms"), v.get("sd_ms"), lambda x: f"{x:.1f}"),
                     f(v.get("p95_ms"), 1), f(v.get("throughput_rps"), 1),
                     f(v.get("throughput_vs_merged"), 2) + "×", DASH,
                     g(v.get("max_abs_logit_diff_vs_single"), 2),
                     yesno(v.get("same_predictions"))])
    notes = [f"Adapters on one base: {', '.join(m.get('adapters') or [])}"
             + (" (different tasks)" if m.get("different_tasks") else " (seeds of one task)")
             + f". Loading one adapter: our runtime {seconds(m.get('runtime_load_adapter_s'))}"
             + (f", PEFT {seconds(m.get('peft_load_adapter_s'))}"
                if m.get("peft_load_adapter_s") is not None else "") + "."]
    if m.get("peft_skipped"):
        notes.append(f"PEFT paths skipped: {m['peft_skipped']}.")
    notes.append("Max |Δ logit| against single-adapter inference of the same example; "
                 f"tolerance {(d.serving or {}).get('tolerance', 1e-5)}.")
    return Table("table-5-multi", "Table 5b: several adapters on one base model",
                 ["Workload", "Path", "Mean ms ± sd", "p95 ms", "Throughput (rows/s)",
                  "Throughput vs merged", "Switch ms (median)", "Max |Δ logit|",
                  "Same predictions"], rows, notes=notes)


LOADTEST_BACKENDS = {"merged": "merged (one model per adapter)",
                     "peft": "PEFT (separate adapters)", "ours": "our multi-adapter path"}


def table6_loadtest(d: RunData) -> Table | None:
    lt = d.loadtest or {}
    cells = lt.get("cells") or []
    if not cells:
        return None
    from ..serving.loadtest import crossover_text

    best = {}
    for c in cells:
        key = (c.get("adapters"), c.get("clients"))
        if finite(c.get("throughput_rps")) and (
                key not in best or c["throughput_rps"] > best[key]["throughput_rps"]):
            best[key] = c
    rows = []
    order = {b: i for i, b in enumerate(lt.get("backends") or LOADTEST_BACKENDS)}
    for c in sorted(cells, key=lambda c: (c.get("adapters", 0), c.get("clients", 0),
                                          order.get(c.get("backend"), 99))):
        win = best.get((c.get("adapters"), c.get("clients"))) is c
        rows.append([str(c.get("adapters")), str(c.get("clients")),
                     LOADTEST_BACKENDS.get(c.get("backend"), str(c.get("backend")))
                     + (" (best)" if win else ""),
                     f(c.get("throughput_rps"), 2), f(c.get("p50_ms"), 1), f(c.get("p95_ms"), 1),
                     f(c.get("p99_ms"), 1), f(c.get("rows_per_batch"), 1),
                     f"{c.get('requests', DASH)} / {c.get('errors', DASH)}"])
    m = lt.get("machine") or {}
    notes = [f"Closed loop on loopback: each client sends one {lt.get('task', '?')} validation "
             f"example per request and waits for the answer; request i carries example i (the "
             f"same texts in every cell) to adapter i mod adapters. "
             f"{lt.get('requests_per_cell', '?')} answered requests per cell after "
             f"{lt.get('warmup', '?')} untimed ones; latency as the client sees it (HTTP, "
             f"tokenization, queueing and batching included). Server options: "
             f"{' '.join(lt.get('server_args') or []) or 'defaults'}; {m.get('cpus', '?')} CPUs, "
             "client and server on the same machine."]
    cross = [crossover_text(c) for c in lt.get("crossovers") or [] if c.get("versus")]
    if cross:
        notes.append("Crossovers (throughput): " + "; ".join(cross) + ".")
    return Table("table-6-loadtest", "Table 6: concurrent load, by adapters and clients",
                 ["Adapters", "Clients", "Server", "Throughput (req/s)", "p50 ms", "p95 ms",
                  "p99 ms", "Rows per batch", "Requests / errors"], rows, notes=notes)
