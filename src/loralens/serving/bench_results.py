"""Results of the serving benchmark: Table 5 (each kind against full fine-tuning, seeds
pooled), the flattened equality checks, the files in RUN_DIR/bench/ and the summary."""

from __future__ import annotations

import statistics
from typing import Sequence

import numpy as np

from ..store import RunDir, atomic_write_json, write_csv
from ..timing import summarize
from .bench_task import KINDS


def compare(latencies_s: Sequence[float], baseline_s: Sequence[float]) -> dict:
    """Overhead of ``latencies_s`` over ``baseline_s`` (in % of the mean and the median)
    with the two-sided Mann-Whitney U p-value (and Welch's t p-value for reference)."""
    from scipy import stats

    a, b = np.asarray(latencies_s, float), np.asarray(baseline_s, float)
    out = {"overhead_mean_pct": float((a.mean() / b.mean() - 1) * 100),
           "overhead_median_pct": float((np.median(a) / np.median(b) - 1) * 100),
           "n": int(len(a)), "n_baseline": int(len(b)),
           "p_mannwhitney": None, "p_welch": None}
    if len(a) > 1 and len(b) > 1:
        out["p_mannwhitney"] = float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
        out["p_welch"] = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return out


def comparison(task: str, res: dict, batch_sizes: list[int]) -> list[dict]:
    """Table 5: each kind against full fine-tuning (and against merged LoRA), seeds pooled."""
    rows = []
    for b in batch_sizes:
        pooled: dict[str, list[float]] = {}
        per_seed: dict[str, list[float]] = {}
        for s in res["seeds"].values():
            for kind, k in s["batch"][str(b)]["kinds"].items():
                pooled.setdefault(kind, []).extend(k["latency_s"])
                per_seed.setdefault(kind, []).append(k["mean_ms"])
        for kind in (k for k in KINDS if k in pooled):
            lat = pooled[kind]
            row = {"task": task, "batch_size": b, "kind": kind, "seeds": len(per_seed[kind]),
                   **{k: v for k, v in summarize(lat, len(lat) * b).items()
                      if k in ("n", "mean_ms", "sd_ms", "p50_ms", "p95_ms")},
                   "seed_means_sd_ms": (statistics.stdev(per_seed[kind])
                                        if len(per_seed[kind]) > 1 else None)}
            for key in ("weights_mb", "peak_increase_mb", "resident_increase_mb"):
                vals = [s["memory"][kind][key] for s in res["seeds"].values()
                        if s["memory"].get(kind, {}).get(key) is not None]
                row[key] = statistics.mean(vals) if vals else None
            for base in ("full", "lora_merged"):
                if base in pooled and base != kind:
                    c = compare(lat, pooled[base])
                    row[f"overhead_vs_{base}_pct"] = c["overhead_mean_pct"]
                    row[f"p_vs_{base}"] = c["p_mannwhitney"]
                    row[f"p_welch_vs_{base}"] = c["p_welch"]
            rows.append(row)
    return rows


def checks(result: dict) -> dict:
    """Every equality the benchmark asserts, flattened: name -> passed."""
    out = {}
    for task, t in result["tasks"].items():
        for seed, s in t["seeds"].items():
            for b, r in s["batch"].items():
                c = r.get("checks", {}).get("lora_runtime")
                if c:
                    out[f"{task}/seed{seed}/batch{b}: runtime == separate"] = c["within_tol"]
    m = result.get("multi", {})
    for p, v in m.get("stream", {}).items():
        out[f"multi stream: {p} == single adapter"] = v["within_tol"]
    for p, v in m.get("mixed", {}).items():
        if isinstance(v, dict) and "within_tol" in v:
            out[f"multi mixed batch: {p} == single adapter"] = v["within_tol"]
    return out


def _latency_rows(result: dict) -> list[dict]:
    """latency.csv: one row per task, seed, batch size and kind (memory included)."""
    rows = []
    for task, t in result["tasks"].items():
        for seed, s in t["seeds"].items():
            for b, r in s["batch"].items():
                for kind, k in r["kinds"].items():
                    rows.append({"task": task, "seed": int(seed), "batch_size": int(b),
                                 "kind": kind, **{x: y for x, y in k.items() if x != "latency_s"},
                                 **s["memory"].get(kind, {})})
    return rows


def _multi_rows(result: dict) -> list[dict]:
    """multi.csv: one row per path of the stream and the mixed batches."""
    m = result.get("multi", {})
    return [{"section": section, "path": p, **v}
            for section in ("stream", "mixed") for p, v in m.get(section, {}).items()
            if isinstance(v, dict)]


def write_results(run: RunDir, result: dict, requests: list[dict]) -> None:
    """RUN_DIR/bench/: latency.csv, comparison.csv, requests.csv, multi.csv, then
    serving.json (written last: its presence marks the stage finished)."""
    write_csv(run.bench_dir / "latency.csv", _latency_rows(result))
    write_csv(run.bench_dir / "comparison.csv", result["comparison"])
    write_csv(run.bench_dir / "requests.csv", requests)
    write_csv(run.bench_dir / "multi.csv", _multi_rows(result))
    atomic_write_json(run.serving_path, result)


def summary_lines(result: dict) -> list[str]:
    """Human-readable lines: Table 5 per task and batch size, multi-adapter results, checks."""
    lines = [f"serving benchmark: {result['model']} ({result['model_note']}), {result['device']}, "
             f"{result['threads']} threads, {result.get('dtype', 'float32')}"]
    for r in result["comparison"]:
        vs = r.get("overhead_vs_full_pct")
        lines.append(
            f"{r['task']:5s} batch {r['batch_size']} {r['kind']:13s} mean {r['mean_ms']:7.1f} ms "
            f"sd {r['sd_ms']:6.1f} p50 {r['p50_ms']:7.1f} p95 {r['p95_ms']:7.1f} "
            f"(n={r['n']}, {r['seeds']} seed(s))"
            + (f" weights {r['weights_mb']:.0f} MB" if r.get("weights_mb") is not None else "")
            + (f"  vs full {vs:+.1f}% p={r['p_vs_full']:.2g}" if vs is not None else ""))
    m = result.get("multi", {})
    if "mixed" in m:
        mx = m["mixed"]
        parts = [f"{p} {v['throughput_vs_merged']:.2f}x" for p, v in mx.items()
                 if isinstance(v, dict) and p != "merged_single_model"]
        lines.append(f"multi ({', '.join(m['adapters'])}): mixed batches of {mx['batch_size']}: "
                     f"throughput vs one merged model: {', '.join(parts)}")
        for p, v in m["stream"].items():
            lines.append(f"multi stream {p}: switch {v['switch_median_ms']:.3f} ms, "
                         f"max |logit diff| vs single adapter {v['max_abs_logit_diff_vs_single']:.2e}")
    elif "skipped" in m:
        lines.append(f"multi: skipped ({m['skipped']})")
    failed = [k for k, ok in result["checks"].items() if not ok]
    lines.append(f"checks: {len(result['checks']) - len(failed)}/{len(result['checks'])} passed"
                 + (f"; failed: {'; '.join(failed)}" if failed else ""))
    return lines
