"""Study-level tracking: after the report, one tracked run ``study`` per report build.

The run holds the numbers of the report's headline tables, read from the files the report
reads (:func:`loralens.report.run_data.load_run`), never recomputed:

- Table 3 (``drift/table3.json``, else what the report computes from ``metrics.json``):
  ``table3/TASK/METRIC/METHOD/mean`` and ``.../sd`` (the validation metric over seeds),
  ``table3/TASK/METRIC/{difference,p,p_bonferroni,cohens_d}`` and
  ``table3/TASK/majority/METRIC`` (the majority-class baseline);
- Table 4 (``drift/table4.json``): ``table4/TASK/MEASURE/METHOD/mean`` and ``.../sd``
  (drift averaged over the selected layers, over seeds) and
  ``table4/TASK/MEASURE/{delta_percent,p,p_bonferroni,cohens_d}``;
- serving (``bench/serving.json``'s ``comparison``):
  ``serving/TASK/batchB/KIND/{mean_ms,p50_ms,p95_ms,overhead_vs_full_pct}``.

Undefined values (null, NaN) are left out. MLflow: the run is tagged ``kind=study``,
``run_dir`` (the run directory's absolute path) and ``config_sha256`` (of
``config.yaml``), the same two as parameters, and ``RUN_DIR/report/`` (report.md,
report.html, figures) is logged as artifacts under ``report/``; every build adds a run,
the latest is the current one. TensorBoard: ``RUN_DIR/tensorboard/study`` holds the same
numbers as scalars at step 0 and report.md as the text summary ``report``; it shows the
latest build (earlier event files there are replaced).
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

from loralens.core.run_dir import RunDir
from loralens.training.tracking import open_tracked, reporters

STATS = ("difference", "delta_percent", "p", "p_bonferroni", "cohens_d")
LATENCY = ("mean_ms", "p50_ms", "p95_ms", "overhead_vs_full_pct")


def _name(*parts) -> str:
    """A metric name MLflow accepts (letters, digits, ``_-. /``) from its parts."""
    return "/".join(re.sub(r"[^\w\-. ]", "_", str(p)) for p in parts)


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _comparison(out: dict, prefix: tuple, c: dict) -> None:
    """One comparison of methods: each method's mean and sd, then the test's numbers."""
    for method, v in c.items():
        if isinstance(v, dict) and "mean" in v:
            for k in ("mean", "sd"):
                out[_name(*prefix, method, k)] = _number(v.get(k))
    for k in STATS:
        out[_name(*prefix, k)] = _number(c.get(k))


def headline_numbers(d) -> dict[str, float]:
    """The headline tables' numbers of a loaded run (:class:`RunData`), by metric name."""
    from loralens.report.accuracy_tables import accuracy_entries

    out: dict[str, float | None] = {}
    for e in accuracy_entries(d)[0]:
        task = e.get("task")
        for metric, c in (e.get("metrics") or {}).items():
            _comparison(out, ("table3", task, metric), c or {})
        for metric, v in (e.get("majority_baseline") or {}).items():
            if metric != "label":
                out[_name("table3", task, "majority", metric)] = _number(v)
    for e in (d.table4 or {}).get("tasks") or []:
        for measure, c in (e.get("measures") or {}).items():
            _comparison(out, ("table4", e.get("task"), measure), c or {})
    for r in (d.serving or {}).get("comparison") or []:
        for k in LATENCY:
            out[_name("serving", r.get("task"), f"batch{r.get('batch_size')}", r.get("kind"),
                      k)] = _number(r.get(k))
    return {k: v for k, v in out.items() if v is not None}


def config_sha256(run: RunDir) -> str:
    path = run.config_path
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def log_study(cfg, run: RunDir) -> dict[str, float] | None:
    """Log the study run (after ``build_report``); the numbers logged, or None when
    ``tracking.report_to`` is ``none``."""
    if not reporters(cfg.tracking.report_to):
        return None
    from loralens.report.run_data import load_run

    numbers = headline_numbers(load_run(run))
    tb_dir = run.tensorboard_dir("study")
    for old in tb_dir.glob("events.out.tfevents.*"):  # the latest build only
        old.unlink(missing_ok=True)
    info = {"run_dir": str(run.root.resolve()), "config_sha256": config_sha256(run)}
    tracker = open_tracked(cfg, run.root, "study", "study", {"kind": "study", **info})
    ok = False
    try:
        tracker.params(info)
        tracker.scalars(0, numbers)
        report_md = run.report_md
        if report_md.is_file():
            tracker.text("report", report_md.read_text())
        if run.report_dir.is_dir():
            tracker.artifacts(run.report_dir, "report")
        ok = True
    finally:
        tracker.close(ok)
    return numbers


def logged_where(cfg, run: RunDir) -> str:
    """Where the study run went, in words (the tracking URI redacted)."""
    from loralens.core.redaction import redact_url
    from loralens.training.tracking import tracking_uri

    places = []
    for r in reporters(cfg.tracking.report_to):
        if r == "tensorboard":
            places.append(f"TensorBoard {Path(run.root) / 'tensorboard' / 'study'}")
        elif r == "mlflow":
            places.append(f"MLflow {redact_url(tracking_uri(run.root))}")
        else:  # accelerate's trackers: their own store (local files under trackers/NAME)
            places.append(f"{r} {run.tracker_dir(r)}")
    return ", ".join(places)
