"""``loralens.results(RUN_DIR)``: a run's tidy DataFrames for notebooks (issue 28.6), on a
tiny run directory written by hand and by the stages' writers (no model)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

import loralens
from loralens.core.files import atomic_write_json, write_csv
from loralens.core.run_dir import RunDir
from loralens.report.results import results
from tests.helpers.report_run import write_metrics


@pytest.fixture
def run(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "run")
    # written out of order: the frame sorts by task, method, seed
    write_metrics(run, "sst2", "lora", 42, 0.81)
    write_metrics(run, "rte", "lora", 42, 0.60)
    write_metrics(run, "rte", "full", 1337, 0.61)
    return run


def test_models_one_row_per_trained_model(run):
    m = results(run.root).models
    assert list(m.columns) == [
        "task", "method", "seed", "model", "split", "metric", "score", "n_examples",
        "majority_accuracy", "steps", "best_step", "stopped_early", "train_seconds",
        "real_tokens", "trainable_parameters", "lr", "loss", "accuracy", "f1"]
    # write_metrics: validation n 24 (rte) / 40 (sst2), loss 0.6, f1 = accuracy - 0.05,
    # 4 steps in 30 s over 900 real tokens, lr 2e-3 (lora) / 3e-5 (full)
    assert m.to_dict("records") == [
        {"task": "rte", "method": "full", "seed": 1337, "model": "smollm2-135m",
         "split": "validation", "metric": "accuracy", "score": 0.61, "n_examples": 24,
         "majority_accuracy": 0.5, "steps": 4, "best_step": 4, "stopped_early": False,
         "train_seconds": 30.0, "real_tokens": 900, "trainable_parameters": 134_000_000,
         "lr": 3e-5, "loss": 0.6, "accuracy": 0.61, "f1": pytest.approx(0.56)},
        {"task": "rte", "method": "lora", "seed": 42, "model": "smollm2-135m",
         "split": "validation", "metric": "accuracy", "score": 0.60, "n_examples": 24,
         "majority_accuracy": 0.5, "steps": 4, "best_step": 4, "stopped_early": False,
         "train_seconds": 30.0, "real_tokens": 900, "trainable_parameters": 460_000,
         "lr": 2e-3, "loss": 0.6, "accuracy": 0.60, "f1": pytest.approx(0.55)},
        {"task": "sst2", "method": "lora", "seed": 42, "model": "smollm2-135m",
         "split": "validation", "metric": "accuracy", "score": 0.81, "n_examples": 40,
         "majority_accuracy": 0.5, "steps": 4, "best_step": 4, "stopped_early": False,
         "train_seconds": 30.0, "real_tokens": 900, "trainable_parameters": 460_000,
         "lr": 2e-3, "loss": 0.6, "accuracy": 0.81, "f1": pytest.approx(0.76)},
    ]
    assert m.groupby("method")["score"].mean().round(3).to_dict() == {"full": 0.61,
                                                                      "lora": 0.705}


def test_an_unreadable_metrics_file_is_a_problem_not_an_error(run):
    run.metrics_path("rte", "lora", 42).write_text("{not json")
    r = results(run.root)
    assert list(zip(r.models.task, r.models.method)) == [("rte", "full"), ("sst2", "lora")]
    assert len(r.problems) == 1 and "metrics.json" in r.problems[0]


def test_layers_one_row_per_model_and_state_sorted(run):
    row = {"task": "rte", "method": "lora", "seed": 42, "model": "lora-seed42",
           "state": "block 1", "in_drift": True, "cka": 0.9, "drift": 0.1}
    atomic_write_json(run.drift_path("layers.json"), {"columns": [], "rows": [
        {**row, "layer": 1},
        {**row, "layer": 0, "state": "embeddings", "in_drift": False, "cka": 1.0, "drift": 0.0},
        {**row, "method": "full", "model": "full-seed42", "layer": 0, "cka": 0.5,
         "drift": 0.5}]})
    layers = results(run.root).layers
    assert layers[["method", "layer", "state", "drift"]].values.tolist() == [
        ["full", 0, "block 1", 0.5], ["lora", 0, "embeddings", 0.0],
        ["lora", 1, "block 1", 0.1]]


# the bench stage's requests.csv columns (serving/bench/task.py)
REQUESTS = [
    {"task": "rte", "seed": 42, "kind": "lora_separate", "served_by": "peft", "batch_size": 1,
     "request": 0, "rows": 1, "tokens": 71, "latency_ms": 89.5},
    {"task": "rte", "seed": 42, "kind": "full", "served_by": "", "batch_size": 1,
     "request": 0, "rows": 1, "tokens": 71, "latency_ms": 76.25},
]


def test_requests_one_row_per_timed_request(run):
    write_csv(run.bench_requests_csv, REQUESTS)
    req = results(run.root).requests
    assert req[["kind", "request", "tokens", "latency_ms"]].values.tolist() == [
        ["lora_separate", 0, 71, 89.5], ["full", 0, 71, 76.25]]
    assert req.groupby("kind")["latency_ms"].median().to_dict() == {"full": 76.25,
                                                                    "lora_separate": 89.5}


def test_requests_of_a_run_without_requests_csv_come_from_serving_json(run):
    """A bench that stored no request rows: serving.json's latencies (seconds, in request
    order) per task, seed, batch size and kind."""
    atomic_write_json(run.serving_path, {"tasks": {"rte": {"seeds": {"42": {"batch": {"1": {
        "kinds": {"full": {"served_by": None, "latency_s": [0.08, 0.075]}}}}}}}}})
    req = results(run.root).requests
    assert req[["task", "seed", "kind", "batch_size", "request", "latency_ms"]].values.tolist() \
        == [["rte", 42, "full", 1, 0, 80.0], ["rte", 42, "full", 1, 1, 75.0]]
    assert math.isnan(req.tokens[0])


def test_a_run_before_any_stage_gives_empty_frames_with_their_columns(tmp_path):
    r = results(tmp_path / "nothing-yet")
    assert r.models.empty and r.layers.empty and r.weights.empty and r.requests.empty
    assert r.problems == []
    # notebook code written for a finished run runs on it
    assert r.layers.groupby(["task", "method", "layer"])["drift"].mean().empty
    assert r.models.groupby(["task", "method"])["score"].agg(["mean", "std"]).empty
    assert r.requests.groupby("kind")["latency_ms"].median().empty


def test_loralens_results_is_the_loader_and_tables_index_by_name(run):
    assert loralens.results is results
    r = loralens.results(str(run.root))
    assert isinstance(r["models"], pd.DataFrame) and r["models"] is r.models
    with pytest.raises(KeyError):
        r["nope"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        loralens.nope
