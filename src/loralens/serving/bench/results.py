"""Results of the serving benchmark: Table 5 (each kind against full fine-tuning and
its method's merged model, paired by request), the identity checks flattened, the files in
RUN_DIR/bench/ and the summary.

Table 5, per task, batch size and kind. Mean: the mean latency per request (over the
seeds' means: every seed serves the same requests); ± sd: across seeds (the sd of the
seeds' mean latencies, as in the paper; none with one seed). Against a baseline kind
(full fine-tuning; the same method merged, e.g. ``lora_merged`` for ``lora_separate`` and
``lora_runtime``), the comparison is paired by request: every kind of one
(task, seed) serves the same requests interleaved, so request j's latency under kind X
and under the baseline are a pair (over the seeds where both were trained, the pair's
difference averaged over those seeds). Overhead: summed latency of X over summed latency
of the baseline on those pairs, minus 1, with a 95% percentile-bootstrap interval over
requests; p: two-sided Wilcoxon signed-rank test of the per-request differences (exact
for small samples without ties). Pairing removes what requests do not share (their
lengths: an RTE pair costs several times an SST-2 sentence), which a test over pooled
requests (the earlier Mann-Whitney U) counts as noise.
"""

from __future__ import annotations

import statistics
from typing import Sequence

import numpy as np

from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json, write_csv
from loralens.core.timing import summarize
from loralens.serving.bench.task import KINDS
from loralens.models.serving_paths import merged_kind, split_kind

PAIRED_TEST = "wilcoxon signed-rank, paired by request"
N_RESAMPLES = 2000  # bootstrap resamples of the overhead interval


def paired_compare(latencies_s: Sequence[Sequence[float]], baseline_s: Sequence[Sequence[float]],
                   n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """Latencies [seeds][requests] of a kind and of the baseline on the same requests.

    ``overhead_pct``: (sum(x) / sum(baseline) - 1) * 100 over every pair;
    ``overhead_ci_pct``: its 95% percentile-bootstrap interval, resampling requests (a
    request keeps all its seeds); ``median_diff_ms``: median over requests of the
    difference (averaged over seeds); ``p_wilcoxon``: two-sided Wilcoxon signed-rank
    p-value of those differences (zero differences dropped; None when all are zero:
    undefined, not significant); ``pairs``: requests; ``seeds``: seeds paired.
    """
    from scipy import stats

    x, y = np.asarray(latencies_s, float), np.asarray(baseline_s, float)
    if x.ndim != 2 or x.shape != y.shape or x.size == 0:
        raise ValueError(f"need latencies [seeds, requests] of one shape, got {x.shape} and "
                         f"{y.shape}")
    d = (x - y).mean(axis=0)                      # [requests], seconds
    xs, ys = x.sum(axis=0), y.sum(axis=0)         # per request, summed over seeds
    out = {"overhead_pct": float((xs.sum() / ys.sum() - 1) * 100), "overhead_ci_pct": None,
           "median_diff_ms": float(np.median(d) * 1e3), "p_wilcoxon": None,
           "pairs": int(d.size), "seeds": int(x.shape[0])}
    if d.size > 1:
        idx = np.random.default_rng(seed).integers(0, d.size, size=(n_resamples, d.size))
        ratios = (xs[idx].sum(axis=1) / ys[idx].sum(axis=1) - 1) * 100
        out["overhead_ci_pct"] = [float(np.percentile(ratios, 2.5)),
                                  float(np.percentile(ratios, 97.5))]
    if np.count_nonzero(d):
        out["p_wilcoxon"] = float(stats.wilcoxon(d, zero_method="wilcox",
                                                 alternative="two-sided").pvalue)
    return out


def comparison(task: str, res: dict, batch_sizes: list[int]) -> list[dict]:
    """Table 5: each kind against full fine-tuning and its method's merged model (module
    docstring); each row says which method and path (``served_by``) it is."""
    rows = []
    for b in batch_sizes:
        by_seed: dict[str, dict[str, list[float]]] = {}   # kind -> seed -> latencies
        info: dict[str, dict] = {}                         # kind -> method, served_by
        for seed, s in res["seeds"].items():
            for kind, k in s["batch"][str(b)]["kinds"].items():
                by_seed.setdefault(kind, {})[seed] = k["latency_s"]
                info.setdefault(kind, {x: k[x] for x in ("method", "served_by") if x in k})
        for kind in [k for k in KINDS if k in by_seed] + [k for k in by_seed if k not in KINDS]:
            seeds = by_seed[kind]
            lat = [v for x in seeds.values() for v in x]
            means = [1e3 * statistics.mean(x) for x in seeds.values()]
            method, _ = split_kind(kind, info[kind].get("method"))
            row = {"task": task, "batch_size": b, "kind": kind, **info[kind], "seeds": len(seeds),
                   **{k: v for k, v in summarize(lat, len(lat) * b).items()
                      if k in ("n", "sd_ms", "p50_ms", "p95_ms")},
                   "mean_ms": statistics.mean(means),
                   "seed_means_sd_ms": statistics.stdev(means) if len(means) > 1 else None}
            for key in ("weights_mb", "peak_increase_mb", "resident_increase_mb"):
                vals = [s["memory"][kind][key] for s in res["seeds"].values()
                        if s["memory"].get(kind, {}).get(key) is not None]
                row[key] = statistics.mean(vals) if vals else None
            mk = merged_kind(method)
            row["merged_kind"] = mk if mk in by_seed else None
            for base in ("full", row["merged_kind"]):
                if base == kind or base not in by_seed:
                    continue
                both = [sd for sd in seeds if sd in by_seed[base]
                        and len(by_seed[base][sd]) == len(seeds[sd])]
                if not both:
                    continue
                c = paired_compare([seeds[sd] for sd in both],
                                   [by_seed[base][sd] for sd in both])
                row.update({f"overhead_vs_{base}_pct": c["overhead_pct"],
                            f"overhead_vs_{base}_ci": c["overhead_ci_pct"],
                            f"median_diff_ms_vs_{base}": c["median_diff_ms"],
                            f"p_vs_{base}": c["p_wilcoxon"], f"pairs_vs_{base}": c["pairs"],
                            f"paired_seeds_vs_{base}": [int(sd) for sd in both],
                            f"test_vs_{base}": PAIRED_TEST})
            rows.append(row)
    return rows


def checks(result: dict) -> dict:
    """Every identity check, flattened: name -> passed. A result written before the float64
    checks existed (no ``identity``) gives its float32 checks (``within_tol``)."""
    if "identity" in result:
        return {c["name"]: bool(c["passed"]) for c in result["identity"]["checks"]}
    out = {}
    for task, t in result["tasks"].items():
        for seed, s in t["seeds"].items():
            for b, r in s["batch"].items():
                c = r.get("checks", {}).get("lora_runtime")
                if c:
                    out[f"{task}/seed{seed}/batch{b}: runtime == separate"] = c["within_tol"]
    m = result.get("multi", {})
    for p, v in m.get("stream", {}).items():
        if "within_tol" in v:
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


def _identity_rows(result: dict) -> list[dict]:
    """identity.csv: one row per identity check, float64 and serving-dtype columns."""
    rows = []
    for c in (result.get("identity") or {}).get("checks") or []:
        row = {k: v for k, v in c.items() if k not in ("float64", "serving_dtype")}
        for part in ("float64", "serving_dtype"):
            row.update({f"{part}_{k}": v for k, v in (c.get(part) or {}).items()})
        rows.append(row)
    return rows


def write_results(run: RunDir, result: dict, requests: list[dict]) -> None:
    """RUN_DIR/bench/: latency.csv, comparison.csv, requests.csv, multi.csv, identity.csv,
    then serving.json (written last: its presence marks the stage finished)."""
    write_csv(run.bench_latency_csv, _latency_rows(result))
    write_csv(run.bench_comparison_csv, result["comparison"])
    write_csv(run.bench_requests_csv, requests)
    write_csv(run.bench_multi_csv, _multi_rows(result))
    if result.get("identity"):
        write_csv(run.bench_identity_csv, _identity_rows(result))
    atomic_write_json(run.serving_path, result)


def summary_lines(result: dict) -> list[str]:
    """Human-readable lines: Table 5 per task and batch size, multi-adapter results, checks."""
    lines = [f"serving benchmark: {result['model']} ({result['model_note']}), {result['device']}, "
             f"{result['threads']} threads, {result.get('dtype', 'float32')}"]
    for r in result["comparison"]:
        sd = r.get("seed_means_sd_ms")
        vs, lo_hi = r.get("overhead_vs_full_pct"), r.get("overhead_vs_full_ci")
        p = r.get("p_vs_full")
        lines.append(
            f"{r['task']:5s} batch {r['batch_size']} {r['kind']:13s} "
            + (f"[{r['served_by']}] " if r.get("served_by") else "")
            + f"mean {r['mean_ms']:7.1f} ms "
            + (f"sd over seeds {sd:6.1f} " if sd is not None else "(1 seed, no sd) ")
            + f"p50 {r['p50_ms']:7.1f} p95 {r['p95_ms']:7.1f} "
            f"(n={r['n']}, {r['seeds']} seed(s))"
            + (f" weights {r['weights_mb']:.0f} MB" if r.get("weights_mb") is not None else "")
            + (f"  vs full {vs:+.1f}%" if vs is not None else "")
            + (f" [{lo_hi[0]:+.1f}, {lo_hi[1]:+.1f}]" if vs is not None and lo_hi else "")
            + (f" p={p:.2g} ({r.get('test_vs_full', 'Mann-Whitney U, pooled')})"
               if vs is not None and p is not None else
               " p undefined (no differences)" if vs is not None else ""))
    m = result.get("multi", {})
    if "mixed" in m:
        mx = m["mixed"]
        parts = [f"{p} {v['throughput_vs_merged']:.2f}x" for p, v in mx.items()
                 if isinstance(v, dict) and p != "merged_single_model"]
        lines.append(f"multi ({', '.join(m['adapters'])}): mixed batches of {mx['batch_size']}: "
                     f"throughput vs one merged model: {', '.join(parts)}")
        for p, v in m["stream"].items():
            lines.append(f"multi stream {p}: switch {v['switch_median_ms']:.3f} ms")
    elif "skipped" in m:
        lines.append(f"multi: skipped ({m['skipped']})")
    ident = result.get("identity")
    failed = [k for k, ok in result["checks"].items() if not ok]
    if ident:
        served = [c["serving_dtype"]["relative_diff"] for c in ident["checks"]
                  if (c.get("serving_dtype") or {}).get("relative_diff") is not None]
        lines.append(f"identity checks in {ident['dtype']} ({ident['tolerance_rule']}): "
                     f"{len(result['checks']) - len(failed)}/"
                     f"{len(result['checks'])} passed"
                     + (f"; failed: {'; '.join(failed)}" if failed else "")
                     + (f"; in {ident['serving_dtype']} max |diff| / max |logit| up to "
                        f"{max(served):.1e} (information)" if served else ""))
    else:
        lines.append(f"checks: {len(result['checks']) - len(failed)}/{len(result['checks'])} "
                     "passed" + (f"; failed: {'; '.join(failed)}" if failed else ""))
    return lines
