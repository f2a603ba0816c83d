"""A run directory with metrics.json per job and extracted hidden-state arrays, no model
involved: for the drift stage's tests."""

from __future__ import annotations

import numpy as np

from loralens.analysis.extract import (
    BASE_KEY,
    job_fingerprint,
    model_key,
    save_pooled,
)
from loralens.core.files import atomic_write_json
from loralens.core.run_dir import RunDir
from loralens.study.config import load_config


def write_metrics(run, task, method, seed, accuracy=0.5, f1=0.5, n=10):
    atomic_write_json(run.job_dir(task, method, seed) / "metrics.json", {
        "task": task, "method": method, "seed": seed, "model": "tiny",
        "validation": {"accuracy": accuracy, "f1": f1, "n": n, "loss": 0.7},
        "majority_baseline": {"label": 1, "accuracy": 0.51, "f1": 0.67}})


SEEDS = (42, 1337, 2024)


def synthetic_run(tmp_path, tasks=("sst2", "rte"), seeds=SEEDS, n=20, layers=4, d=30,
                  requested=25, ids_override=None):
    """A run directory with metrics.json per job and extracted arrays, no model involved."""
    cfg = load_config(overrides={"tasks": list(tasks), "seeds": list(seeds)})
    run = RunDir(tmp_path / "run")
    run.bind_config(cfg)
    rng = np.random.default_rng(0)
    truth = {}
    for ti, task in enumerate(tasks):
        ids = np.sort(rng.choice(100, size=n, replace=False))
        base = rng.standard_normal((n, layers, d)).astype(np.float32)
        arrays = {BASE_KEY: base}
        for si, seed in enumerate(seeds):
            for method, size in (("lora", 0.3), ("full", 1.0)):
                depth = np.linspace(0.2, 1.0, layers)[None, :, None]
                noise = rng.standard_normal((n, layers, d))
                arrays[model_key(method, seed)] = (base + size * (1 + 0.1 * si) * depth * noise
                                                   ).astype(np.float32)
                write_metrics(run, task, method, seed,
                              accuracy=float(rng.uniform(0.6, 0.9)),
                              f1=float(rng.uniform(0.6, 0.9)), n=n)
        folder = run.root / "extract" / task
        models = {}
        for key, hidden in arrays.items():
            method, seed = (None, None) if key == BASE_KEY else (key.split("-")[0],
                                                                 int(key.split("seed")[1]))
            file_ids = ids_override if (ids_override is not None and key == "full-seed42") \
                else ids
            entry = {"key": key, "kind": "base" if method is None else "trained",
                     "method": method, "seed": seed, "file": f"{key}.npz",
                     "metrics_sha256": None if method is None else
                     job_fingerprint(run.job_dir(task, method, seed))}
            save_pooled(folder / f"{key}.npz", hidden, file_ids, entry)
            models[key] = entry
        atomic_write_json(folder / "manifest.json", {
            "task": task, "split": "validation", "requested": requested, "n_examples": n,
            "seed": 0, "max_length": 384, "model": "synthetic", "model_note": "synthetic",
            "example_ids": ids.tolist(), "models": models})
        truth[task] = arrays
    return cfg, run, truth
