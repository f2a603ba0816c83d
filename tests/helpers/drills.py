"""The command line as another process (the fault drills, Ray and Postgres resume tests):
start, finish, and the comparison of a drilled run with the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# train.precision=fp32: runs compared across processes must compute alike. precision=auto
# times bf16 against float32 GEMMs in each process, and where the gain sits near its 1.1x
# threshold (this project's AMD EPYC, avx512_bf16: 0.88x and 1.92x measured by two runs
# sharing the cores) two processes choose differently; that choice is not what these
# drills test.
SETTINGS = ["--preset", "micro", "tasks=[rte]", "search.heartbeat_interval=1",
            "search.grace_period=3", "train.precision=fp32"]


# not compared: records of this machine and this invocation, the databases (their rows are
# checked through the outputs), and the serving benchmark and report (wall-clock latencies)
VOLATILE_FILES = {"env.json", "timings.json", "jobs.db", "search.db"}


VOLATILE_DIRS = ("bench/", "report/", "loadtest/")


VOLATILE_KEYS = ("time", "seconds", "latency", "per_s", "wall", "elapsed", "throughput",
                 "uptime", "date", "mfu", "precision_note",  # measured GFLOP/s
                 "extracted_at", "metrics_sha256",  # a hash of metrics.json (wall times)
                 "resumed",  # fit.resumed_at: the steps this invocation resumed a killed job at
                 "peak")  # fit.peak_*: this process's GEMM peaks and the load they met


def start(args, run_dir, glue_dir) -> subprocess.Popen:
    exe = os.path.join(os.path.dirname(sys.executable), "loralens")
    env = {k: v for k, v in os.environ.items() if k != "LORALENS_STORAGE"}
    return subprocess.Popen([exe, *args, "--run-dir", str(run_dir), "--glue-dir", str(glue_dir),
                             "--no-progress", *SETTINGS], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)


def finish(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    return out


def strip(obj):
    if isinstance(obj, dict):
        return {k: sorted(v) if k == "target_modules" and isinstance(v, list) else strip(v)
                for k, v in obj.items()  # PEFT writes target_modules from a set: any order
                if not any(w in k.lower() for w in VOLATILE_KEYS)}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in VOLATILE_FILES and not p.name.endswith(".lock")}


def content(rel: str, path: Path, root: Path):
    """What is compared of a file: JSON without wall times, arrays, or the bytes (the run
    directory's own path, which model cards quote, replaced)."""
    if rel.endswith(".json"):
        data = strip(json.loads(path.read_text()))
        if rel.startswith("search/"):  # a killed trial is failed and retried: same outcome
            data = {k: data[k] for k in ("best", "overrides", "space", "selection")}
            data["best"].pop("number", None)
        return data
    if rel.endswith(".npz"):
        with np.load(path) as z:
            return {k: strip(json.loads(str(z[k]))) if k == "meta" else z[k].tolist()
                    for k in z.files}
    return path.read_bytes().replace(str(root).encode(), b"<run>")


def assert_same_study(ref: Path, drill: Path) -> None:
    half_written = [p for p in drill.rglob(".*") if not p.name.endswith(".lock")]
    assert half_written == [], half_written  # atomic writes: no temporary file left
    a, b = files(ref), files(drill)
    assert sorted(a) == sorted(b)
    differ = [rel for rel in a if not rel.startswith(VOLATILE_DIRS)
              and content(rel, a[rel], ref) != content(rel, b[rel], drill)]
    assert differ == [], differ


# the resume tests' settings on top of --preset micro: one step per job, fast heartbeats
RESUME = ["data.max_length=32", "data.train_size=16", "data.early_stop_size=8",
        "search.train_size=8", "search.eval_size=8", "search.epochs=[1]", "search.prune=false",
        "search.startup_trials=2", "search.heartbeat_interval=1", "search.grace_period=4",
        "train.max_steps=1", "train.batch_size=8", "train.eval_batch_size=64",
        "train.precision=fp32"]  # as SETTINGS: one precision in every process


def loralens(args, run_dir, glue_dir):
    exe = os.path.join(os.path.dirname(sys.executable), "loralens")
    return subprocess.Popen([exe, *args, "--run-dir", str(run_dir), "--glue-dir", str(glue_dir),
                             "--no-progress", *RESUME], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
