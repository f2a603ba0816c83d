"""A run's results as tidy pandas DataFrames, for notebooks: ``loralens.results(RUN_DIR)``.

One row per observation, one column per variable, read from the run directory alone
(through :class:`~loralens.core.run_dir.RunDir`'s paths and :func:`.run_data.read_optional`,
as the report reads them): a stage that has not run gives an empty frame, never an error,
and a file that cannot be read is listed in :attr:`Results.problems`.

- ``models``: one row per trained model (``models/<task>/<method>/seed<seed>/metrics.json``).
- ``layers``: one row per trained model and hidden state: the drift measures of the drift
  stage (``drift/layers.json``; ``drift`` is 1 - linear CKA to the base model).
- ``weights``: one row per trained model and weight matrix: the weights stage's measures
  (``weightspace/layers.json``).
- ``requests``: one row per timed serving request of the bench stage
  (``bench/requests.csv``; a run whose requests.csv is empty or missing gives the
  latencies serving.json keeps per task, seed, batch size and kind, in request order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from loralens.core.run_dir import RunDir
from loralens.report.run_data import read_optional

MODEL_COLUMNS = ("task", "method", "seed", "model", "split", "metric", "score", "n_examples",
                 "majority_accuracy", "steps", "best_step", "stopped_early", "train_seconds",
                 "real_tokens", "trainable_parameters", "lr")
# the columns an empty frame still has (a stage not run yet), so that notebook code such as
# ``r.layers.groupby(["task", "method"])["drift"]`` runs before the stage has
LAYER_COLUMNS = ("task", "method", "seed", "model", "layer", "state", "in_drift", "drift")
WEIGHT_COLUMNS = ("task", "method", "seed", "layer", "matrix")
REQUEST_COLUMNS = ("task", "seed", "kind", "served_by", "batch_size", "request", "rows",
                   "tokens", "latency_ms")


@dataclass
class Results:
    """The tidy tables of one run directory (see the module docstring for the rows).

    ``models`` columns: task, method, seed, model (the base model's registry name), split
    (the split the metrics were computed on: validation), metric (the task's study metric)
    and score (its value), n_examples, majority_accuracy (the majority class's accuracy on
    that split), steps, best_step, stopped_early, train_seconds (the fit's wall time, s),
    real_tokens (non-pad training tokens), trainable_parameters, lr; then every metric the
    job computed on the split (accuracy, f1, loss, ... as in metrics.json).
    ``layers``: drift/layers.json's columns (task, method, seed, model, layer, state,
    in_drift, the similarity measures and drift = 1 - cka, ...).
    ``weights``: weightspace/layers.json's columns (task, method, seed, layer, matrix, ...).
    ``requests``: task, seed, kind (the served path), served_by, batch_size, request (its
    index), rows, tokens, latency_ms (milliseconds)."""

    run_dir: Path
    models: pd.DataFrame
    layers: pd.DataFrame
    weights: pd.DataFrame
    requests: pd.DataFrame
    problems: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> pd.DataFrame:
        """``results["models"]`` as ``results.models`` (a dict-like view for notebooks)."""
        if name not in ("models", "layers", "weights", "requests"):
            raise KeyError(name)
        return getattr(self, name)


def results(run_dir: str | Path | RunDir) -> Results:
    """The tidy DataFrames of ``run_dir`` (:class:`Results`: ``models``, ``layers``,
    ``weights``, ``requests``); what a stage has not written yet is an empty frame.

    >>> r = loralens.results("runs/quick")                       # doctest: +SKIP
    >>> r.models.groupby(["task", "method"]).score.agg(["mean", "std"])  # doctest: +SKIP
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    problems: list[str] = []
    return Results(Path(run.root), models_frame(run, problems), layers_frame(run, problems),
                   weights_frame(run, problems), requests_frame(run, problems), problems)


def models_frame(run: RunDir, problems: list[str]) -> pd.DataFrame:
    """One row per finished training job (metrics.json), sorted by task, method, seed."""
    rows = []
    for task, method, seed in run.finished_jobs():
        m = read_optional(run.metrics_path(task, method, seed), problems)
        if isinstance(m, dict):
            rows.append(_model_row(task, method, seed, m))
    frame = pd.DataFrame(rows, columns=_columns(MODEL_COLUMNS, rows))
    return frame.sort_values(["task", "method", "seed"], ignore_index=True) if rows else frame


def _model_row(task: str, method: str, seed: int, m: dict) -> dict:
    val = m.get("validation") or {}
    fit = m.get("fit") or {}
    row = {"task": task, "method": method, "seed": int(seed), "model": m.get("model"),
           "split": "validation", "metric": m.get("selection_metric"), "score": m.get("score"),
           "n_examples": val.get("n"),
           "majority_accuracy": (m.get("majority_baseline") or {}).get("accuracy"),
           "steps": fit.get("steps"), "best_step": fit.get("best_step"),
           "stopped_early": fit.get("stopped_early"), "train_seconds": fit.get("train_seconds"),
           "real_tokens": fit.get("real_tokens"),
           "trainable_parameters": (m.get("parameters") or {}).get("trainable"),
           "lr": (m.get("hyperparameters") or {}).get("lr")}
    row.update({k: v for k, v in val.items() if k != "n" and _scalar(v)})
    return row


def layers_frame(run: RunDir, problems: list[str]) -> pd.DataFrame:
    """drift/layers.json's rows: one per trained model and hidden state."""
    return _rows_frame(read_optional(run.drift_path("layers.json"), problems),
                       ["task", "method", "seed", "layer"], LAYER_COLUMNS)


def weights_frame(run: RunDir, problems: list[str]) -> pd.DataFrame:
    """weightspace/layers.json's rows: one per trained model and weight matrix."""
    return _rows_frame(read_optional(run.weightspace_layers_json, problems),
                       ["task", "method", "seed", "layer"], WEIGHT_COLUMNS)


def requests_frame(run: RunDir, problems: list[str]) -> pd.DataFrame:
    """One row per timed request: bench/requests.csv, else serving.json's latencies."""
    path = run.bench_requests_csv
    if path.is_file() and path.stat().st_size > 0:
        try:
            frame = pd.read_csv(path)
        except (OSError, ValueError) as e:
            problems.append(f"{path.name} ({path.parent}) could not be read: {e}")
        else:
            if len(frame):
                return frame
    serving = read_optional(run.serving_path, problems)
    rows = _serving_requests(serving) if isinstance(serving, dict) else []
    return pd.DataFrame(rows, columns=list(REQUEST_COLUMNS))


def _serving_requests(serving: dict) -> list[dict]:
    """serving.json's per-kind latencies (seconds, request order) as request rows; rows
    and tokens per request are not kept there (NaN)."""
    rows = []
    for task, t in (serving.get("tasks") or {}).items():
        for seed, s in (t.get("seeds") or {}).items():
            for batch, b in (s.get("batch") or {}).items():
                for kind, k in (b.get("kinds") or {}).items():
                    for i, lat in enumerate(k.get("latency_s") or []):
                        rows.append({"task": task, "seed": int(seed), "kind": kind,
                                     "served_by": k.get("served_by"),
                                     "batch_size": int(batch), "request": i,
                                     "rows": math.nan, "tokens": math.nan,
                                     "latency_ms": float(lat) * 1e3})
    return rows


def _rows_frame(doc, order: list[str], empty: tuple[str, ...]) -> pd.DataFrame:
    """A file's ``rows`` sorted by the ``order`` columns; no rows: ``empty``'s columns."""
    rows = doc.get("rows") if isinstance(doc, dict) else None
    rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    if not rows:
        return pd.DataFrame(columns=list(empty))
    frame = pd.DataFrame(rows)
    by = [c for c in order if c in frame.columns]
    return frame.sort_values(by, kind="stable", ignore_index=True) if by else frame


def _columns(first: tuple[str, ...], rows: list[dict]) -> list[str]:
    """``first``, then the other keys of ``rows`` in the order they appear."""
    extra = list(dict.fromkeys(k for r in rows for k in r if k not in first))
    return list(first) + extra


def _scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))
