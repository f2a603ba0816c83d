"""The serving tables: latency per strategy (Table 5), several adapters on one base
(Table 5b), the identity checks (Table 5c) and concurrent load (Table 6), from
``bench/serving.json`` and ``loadtest/loadtest.json``. Files written by older versions
still read: what they did not record is said so.
"""

from __future__ import annotations

from loralens.models.serving_paths import split_kind
from loralens.report.colors import method_label
from loralens.report.formatting import (
    DASH, KINDS, Table, ci, f, finite, g, pm, pval, seconds, signed_pct, yesno,
)
from loralens.report.run_data import RunData


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


def _overhead(r: dict, base: str) -> str:
    """"+16.6% [+12.0, +21.3]": the overhead and its interval, where recorded."""
    text = signed_pct(r.get(f"overhead_vs_{base}_pct"))
    interval = ci(r.get(f"overhead_vs_{base}_ci"), lambda v: f"{v:+.1f}")
    return f"{text} {interval}" if interval and text != DASH else text


def _signed_ms(x) -> str:
    """A median paired latency difference in ms, signed ("+4.50"); – where not recorded."""
    return f"{x:+.2f}" if finite(x) else DASH


def served_by(r: dict) -> str:
    """The path that served a Table 5 row: recorded (``served_by``), or, in a serving.json
    written before it was, read from the kind's name (``lora_runtime``: lean runtime)."""
    return str(r.get("served_by") or split_kind(str(r.get("kind")))[1])


def _strategy(r: dict) -> str:
    kind = r.get("kind")
    if kind in KINDS:
        return KINDS[kind]
    return method_label(str(r.get("method") or kind))  # the method's name in every table


def _served_by_note(s: dict) -> str:
    """Which path serves which method, and why our runtime skips some."""
    text = ("Served by: whole model (full fine-tuning, head-only: the model as it is), PEFT "
            "(the separate adapter on a fresh base), merged (the adapter merged into the base "
            "weights), lean runtime (our multi-adapter runtime, which serves only the methods "
            "it computes exactly: LoRA of any rank and target modules, rsLoRA, LoRA+)")
    skipped = [f"{m} ({v['lean_runtime_not_exact']})" for m, v in (s.get("served_by") or {}).items()
               if isinstance(v, dict) and v.get("family") == "peft"
               and v.get("lean_runtime_not_exact")]
    return text + (f". Not in the lean runtime: {'; '.join(skipped)}." if skipped else ".")


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
        rows.append([str(task), str(b), _strategy(r), served_by(r),
                     f"{r.get('seeds', DASH)} / {r.get('n', DASH)}",
                     pm(r.get("mean_ms"), r.get("seed_means_sd_ms"), lambda v: f"{v:.1f}"),
                     f(r.get("p95_ms"), 1), _overhead(r, "full"), pval(r.get("p_vs_full")),
                     _signed_ms(r.get("median_diff_ms_vs_full")),
                     _overhead(r, r.get("merged_kind") or "lora_merged"), f(_mean(tp), 1),
                     f(_mean(mem), 0)])
    paired = any(r.get("test_vs_full") or r.get(f"test_vs_{r.get('merged_kind') or 'lora_merged'}")
                 for r in comp)
    notes = [f"Each request: 'Batch' validation examples; {s.get('warmup', '?')} warm-up "
             f"requests per model; models served interleaved on {s.get('device', '?')} with "
             f"{s.get('threads', '?')} threads; latency is one forward pass (tokenization "
             "excluded). Mean ± sd: mean latency per request ± the sd across seeds of the "
             "seeds' mean latencies (as in the paper; one seed: no sd). Requests: every "
             "seed's, together.", _served_by_note(s)]
    if paired:
        notes.append("Overhead: summed latency over the summed latency of the baseline on the "
                     "same requests (each request served by both strategies in one interleaved "
                     "run; seeds where both were trained; 'merged': the same method's merged "
                     "model), with a 95% bootstrap interval over "
                     "requests. p: two-sided Wilcoxon signed-rank test of the per-request "
                     "latency differences vs full fine-tuning (paired by request, differences "
                     "averaged over seeds; – where every difference is 0: undefined). The test "
                     "is about the location of those paired differences (their median, shown "
                     "as 'Median Δ vs full FT'), not about the overhead, a ratio of summed "
                     "latencies: a few slow requests move the sum, not the median, so the two "
                     "can disagree.")
    else:
        notes.append("Overhead: ratio of mean latencies, seeds pooled; p: two-sided "
                     "Mann-Whitney U over pooled requests vs full fine-tuning (recorded by an "
                     "older loralens: not paired by request, no interval; rerun the bench "
                     "stage for the paired test). The test is about the location of the "
                     "latency distributions, not about the ratio of means shown.")
    n_p = sum(1 for r in comp if finite(r.get("p_vs_full")))
    if n_p:
        notes.append(f"p is uncorrected: {n_p} p-value{'s' if n_p != 1 else ''} in this table "
                     "(one per strategy, task and batch size), in no declared family and not "
                     "corrected for each other; read one p below 0.05 among many "
                     "accordingly.")
    notes.append("Memory: peak increase while the model loads and serves its warm-up "
                 "requests (mean over seeds).")
    if busy:
        notes.append(f"Other processes used up to {100 * max(busy):.0f}% of the machine's CPU "
                     "time while requests were timed (shared machine: absolute latencies are "
                     "noisy; the interleaving keeps the comparison fair).")
    return Table("table-5-serving", "Table 5: serving latency per strategy",
                 ["Task", "Batch", "Strategy", "Served by", "Seeds / requests",
                  "Mean ms ± sd (seeds)",
                  "p95 ms", "Overhead vs full FT [95% CI]", "p vs full FT (uncorrected)",
                  "Median Δ vs full FT (ms)", "Overhead vs merged [95% CI]",
                  "Throughput (rows/s)", "Peak memory +MB"],
                 rows, notes=notes)


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
                     f(v.get("switch_median_ms"), 3)])
    mixed = m.get("mixed") or {}
    for p, v in mixed.items():
        if not isinstance(v, dict):
            continue
        rows.append([f"mixed batches of {mixed.get('batch_size', '?')}", MULTI_PATHS.get(p, p),
                     pm(v.get("mean_ms"), v.get("sd_ms"), lambda x: f"{x:.1f}"),
                     f(v.get("p95_ms"), 1), f(v.get("throughput_rps"), 1),
                     f(v.get("throughput_vs_merged"), 2) + "×", DASH])
    notes = [f"Adapters on one base: {', '.join(m.get('adapters') or [])}"
             + (" (different tasks)" if m.get("different_tasks") else
                f" (methods {', '.join(m['methods'])} of one task)"
                if len(m.get("methods") or []) > 1 else " (seeds of one task)")
             + f". Loading one adapter: our runtime {seconds(m.get('runtime_load_adapter_s'))}"
             + (f", PEFT {seconds(m.get('peft_load_adapter_s'))}"
                if m.get("peft_load_adapter_s") is not None else "") + "."]
    if m.get("peft_skipped"):
        notes.append(f"PEFT paths skipped: {m['peft_skipped']}.")
    notes.append("Mean ± sd over the requests of one run."
                 + (" Agreement with single-adapter inference: Table 5c."
                    if ((d.serving or {}).get("identity") or {}).get("checks") else ""))
    return Table("table-5-multi", "Table 5b: several adapters on one base model",
                 ["Workload", "Path", "Mean ms ± sd", "p95 ms", "Throughput (rows/s)",
                  "Throughput vs merged", "Switch ms (median)"], rows, notes=notes)


def table5_identity(d: RunData) -> Table | None:
    """Table 5c: the identity checks, float64 verdict and serving-dtype differences (None for
    a serving.json written before they existed: :func:`identity_not_recorded` says so)."""
    ident = (d.serving or {}).get("identity")
    if not isinstance(ident, dict) or not ident.get("checks"):
        return None
    dtype = ident.get("serving_dtype", "serving dtype")
    rule = ident.get("tolerance_rule") or f"max |Δ logit| ≤ {g(ident.get('tolerance'), 2)}"
    rows = []
    for c in ident["checks"]:
        exact, served = c.get("float64") or {}, c.get("serving_dtype") or {}
        rows.append([str(c.get("name")), str(c.get("rows", DASH)),
                     g(exact.get("max_abs_logit"), 3), g(exact.get("max_abs_diff"), 2),
                     yesno(c.get("passed")), g(served.get("max_abs_diff"), 2),
                     g(served.get("relative_diff"), 2), yesno(served.get("same_predictions"))])
    notes = [f"Each adapter serving path against each adapter's separate PeftModel (batch 1, "
             f"no padding) on the first {ident.get('examples_per_adapter', '?')} benchmarked "
             "examples per adapter: our runtime (for the methods it serves) and the merged "
             "model at each batch size "
             "(padded batches); several adapters on one base in a round-robin stream and in "
             "mixed batches (Table 5b's workloads).",
             "Verdict in float64 (float64 copies of the base and adapters, for the check "
             f"only): passed when {rule.replace('<=', '≤')}. Equivalent paths agree there to "
             "~1e-15, or up to ~1e-7 where a different summation order meets the cancellation "
             "in SmolLM2's massive-activation MLPs; a fault (a row served with another "
             "adapter, α/r dropped, another adapter's head) moves logits by about their own "
             "size.",
             f"The same checks in the serving dtype ({dtype}), as information: rounding, "
             "shown relative to the logits' scale (max |Δ| / max |logit|)"
             + (f"; in {dtype}, absolute differences up to about "
                f"{g(ident['serving_dtype_rounding'], 2)} are rounding (measured on SmolLM2's "
                "30 layers)" if finite(ident.get("serving_dtype_rounding")) else "") + "."]
    return Table("table-5-identity", "Table 5c: identity checks of the adapter serving paths",
                 ["Check", "Rows", "max |logit|", "float64 max |Δ logit|", "Passed (float64)",
                  f"{dtype} max |Δ logit|", f"{dtype} max |Δ| / max |logit|",
                  f"{dtype} same predictions"], rows, notes=notes)


def identity_not_recorded(d: RunData) -> str | None:
    """For a serving.json without float64 identity checks: what it has instead."""
    s = d.serving or {}
    if not s or (isinstance(s.get("identity"), dict) and s["identity"].get("checks")):
        return None
    if isinstance(s.get("identity"), dict) and s["identity"].get("skipped"):
        return f"skipped ({s['identity']['skipped']})"
    checks = s.get("checks") or {}
    text = "not recorded (bench/serving.json was written by an older loralens)"
    if checks:
        ok = sum(bool(v) for v in checks.values())
        text += (f"; its {len(checks)} checks ran in {s.get('dtype', 'float32')} against an "
                 f"absolute tolerance of {g(s.get('tolerance', 1e-5), 2)}, which float32 "
                 f"rounding alone can exceed: {ok} of {len(checks)} passed")
    return text


LOADTEST_BACKENDS = {"merged": "merged (one model per adapter)",
                     "peft": "PEFT (separate adapters)", "ours": "our multi-adapter path"}


def _best(cells: list[dict], repeated: bool) -> set[int]:
    """ids of the cells whose server is the best of its (adapters, clients): the one whose
    throughput interval lies above every other server's (none without intervals)."""
    from loralens.analysis.latency import compare_cells

    if not repeated:
        return set()
    by: dict[tuple, list[dict]] = {}
    for c in cells:
        by.setdefault((c.get("adapters"), c.get("clients")), []).append(c)
    out = set()
    for group in by.values():
        for c in group:
            others = [o for o in group if o is not c]
            if others and all(compare_cells(c, o) == "faster" for o in others):
                out.add(id(c))
    return out


def table6_loadtest(d: RunData) -> Table | None:
    lt = d.loadtest or {}
    cells = lt.get("cells") or []
    if not cells:
        return None
    from loralens.analysis.latency import (
        UNCORRECTED, comparisons_made, crossover_text, crossovers,
    )

    repeated = any(c.get("throughput_ci") for c in cells)
    best = _best(cells, repeated)
    rows = []
    order = {b: i for i, b in enumerate(lt.get("backends") or LOADTEST_BACKENDS)}
    for c in sorted(cells, key=lambda c: (c.get("adapters", 0), c.get("clients", 0),
                                          order.get(c.get("backend"), 99))):
        interval = ci(c.get("throughput_ci"), lambda v: f"{v:.2f}")
        rows.append([str(c.get("adapters")), str(c.get("clients")),
                     LOADTEST_BACKENDS.get(c.get("backend"), str(c.get("backend")))
                     + (" (best)" if id(c) in best else ""),
                     f(c.get("throughput_rps"), 2) + (f" {interval}" if interval else ""),
                     f(c.get("p50_ms"), 1), f(c.get("p95_ms"), 1),
                     f(c.get("p99_ms"), 1), f(c.get("rows_per_batch"), 1),
                     f"{c.get('repeats', 1)} × {c.get('requests', DASH)} / "
                     f"{c.get('errors', DASH)}"])
    m = lt.get("machine") or {}
    notes = [f"Closed loop on loopback: each client sends one {lt.get('task', '?')} validation "
             f"example per request and waits for the answer; request i carries example i (the "
             f"same texts in every cell) to adapter i mod adapters. "
             f"{lt.get('requests_per_cell', '?')} answered requests per run after "
             f"{lt.get('warmup', '?')} untimed ones; latency as the client sees it (HTTP, "
             f"tokenization, queueing and batching included). Server options: "
             f"{' '.join(lt.get('server_args') or []) or 'defaults'}; {m.get('cpus', '?')} CPUs, "
             "client and server on the same machine."]
    if repeated:
        notes.append(f"Every cell ran {lt.get('repeats', '?')} times, the servers interleaved "
                     "(all servers up at once; in each repeat every server runs the cell once, "
                     "in an order rotated per repeat). Throughput: mean over the runs [95% "
                     "t-interval of the mean]; latency percentiles: median over the runs. "
                     "Best: the server whose interval lies above every other server's in the "
                     "cell.")
        cross = [crossover_text(c) for c in crossovers(cells)]
        notes.append("Crossovers (throughput vs merged models; called only where the intervals "
                     "separate, \"no difference detected\" where they overlap): "
                     + ". ".join(cross) + ".")
        notes.append(f"Best and the crossovers are {UNCORRECTED}: "
                     f"{comparisons_made(cells)} cells compared with merged models, so some "
                     "separations can arise by chance; they are descriptive, not a test.")
    else:
        notes.append("One run per cell (loadtest.json from an older loralens): no intervals, "
                     "so no server is called best and no crossover is called; rerun "
                     f"`loralens loadtest {d.root}` (it repeats every cell, servers "
                     "interleaved).")
    return Table("table-6-loadtest", "Table 6: concurrent load, by adapters and clients",
                 ["Adapters", "Clients", "Server", "Throughput (req/s) [95% CI]", "p50 ms",
                  "p95 ms", "p99 ms", "Rows per batch", "Runs × requests / errors"], rows,
                 notes=notes)
