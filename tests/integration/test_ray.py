"""``loralens run --executor ray`` on a local Ray cluster started by the test (two CPUs, on
loopback), on the micro preset (the tiny random model, RTE): the Ray run's directory
equals a local run's (same files; same metrics, models, hidden states and drift, wall
times left out); a Ray worker SIGKILLed in the middle of a training job or of a search
trial has its task rerun by Ray, and the job table and the Optuna study show nothing
lost and nothing done twice; the search through Ray runs exactly its N trials."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.helpers.drills import assert_same_study, finish, start

# search.startup_trials = trials: every trial's configuration is a seeded function of its
# position, so trials running at once draw what one process draws in turn (a TPE trial
# sees the trials complete when it is asked: with several at once, not the same ones)
EQUAL = ["search.startup_trials=2"]
# every stage that has units of work (the report only reads the run directory)
STAGES = ["--stages", "sanity,search,train,extract,drift,weights,bench"]


@pytest.fixture(scope="module")
def ray_address():
    """A two-CPU Ray cluster on loopback for this module (its start-up paid once)."""
    try:
        import ray
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("ray is not installed: the test extra (pip install -e '.[test]') "
                        "brings it")
        pytest.skip("ray is not installed (pip install -e '.[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=100 * 2**20, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def ray_args(address: str, *args: str) -> list[str]:
    return ["run", "--executor", "ray", "--ray-address", address, *args]


def rows(run: Path, stage: str) -> dict[str, tuple[str, int]]:
    """The job table's rows of ``stage``: key -> (status, attempts)."""
    with sqlite3.connect(run / "jobs.db") as c:
        return {k: (s, a) for k, s, a in c.execute(
            "SELECT key, status, attempts FROM loralens_jobs WHERE stage = ?", (stage,))}


def trial_states(run: Path, method: str) -> list[str]:
    import optuna

    study = optuna.load_study(study_name=f"loralens-rte-{method}",
                              storage=f"sqlite:///{run / 'search.db'}")
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def test_ray_run_equals_the_local_run(ray_address, tmp_path, glue_dir):
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    runs = [start(["run", *STAGES, *EQUAL], local, glue_dir),
            start(ray_args(ray_address, *STAGES, *EQUAL), on_ray, glue_dir)]
    out = [finish(p) for p in runs]
    assert "run_job pid=" in out[1] and "run_trial pid=" in out[1], out[1][-3000:]  # on Ray
    assert_same_study(local, on_ray)  # same files, same numbers (bench, report: wall times)
    for method in ("lora", "full"):  # the same search and the same models, to the bit
        for seed in (42, 1337):
            a, b = (json.loads((r / f"models/rte/{method}/seed{seed}/metrics.json").read_text())
                    for r in (local, on_ray))
            assert a["validation"] == b["validation"] and a["overrides"] == b["overrides"]
        assert trial_states(on_ray, method) == ["COMPLETE", "COMPLETE"]
    assert rows(on_ray, "train") == rows(local, "train")  # each job once: done, attempt 1
    assert set(rows(on_ray, "train").values()) == {("done", 1)}


def running_job(run: Path, stage: str, deadline: float) -> tuple[str, int]:
    """(key, worker pid) of the first job of ``stage`` seen running in the job table."""
    while time.time() < deadline:
        if (run / "jobs.db").is_file():
            try:
                with sqlite3.connect(run / "jobs.db") as c:
                    row = c.execute("SELECT key, worker FROM loralens_jobs WHERE stage = ? AND "
                                    "status = 'running' ORDER BY key", (stage,)).fetchone()
            except sqlite3.OperationalError:  # the table is being created
                row = None
            if row:
                return row[0], int(row[1].rsplit(":", 1)[1])
        time.sleep(0.02)
    raise AssertionError(f"no {stage} job ran within the time allowed")


def test_a_ray_worker_killed_mid_job_has_its_job_rerun_once(ray_address, tmp_path, glue_dir):
    """SIGKILL the Ray worker process of a running training job (longer jobs: 48 rows, 2
    epochs): Ray reruns its task, the new worker takes the job over in the job table, and
    every job ends done with one metrics.json; only the killed one ran twice."""
    run = tmp_path / "run"
    p = start(ray_args(ray_address, "--stages", "train", "search.enabled=false",
                       "data.train_size=48", "train.epochs=2"), run, glue_dir)
    key, pid = running_job(run, "train", time.time() + 120)
    assert pid != p.pid  # a Ray worker, not the driver
    time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    out = finish(p)
    print(f"killed Ray worker {pid} during train job {key}; job table: {rows(run, 'train')}")
    jobs = rows(run, "train")
    assert jobs[key] == ("done", 2), (jobs, out[-3000:])  # killed once, rerun once
    assert all(v == ("done", 1) for k, v in jobs.items() if k != key), jobs
    assert sorted(jobs) == sorted(f"rte/{m}/seed{s}" for m in ("lora", "full")
                                  for s in (42, 1337))
    metrics = sorted(run.glob("models/rte/*/seed*/metrics.json"))
    assert len(metrics) == 4 and all(json.loads(m.read_text())["validation"] for m in metrics)
    assert [q for q in run.rglob(".*") if not q.name.endswith(".lock")] == []


def ray_task_processes(name: str) -> list[int]:
    """Pids of this machine's Ray worker processes running task ``name`` (Ray titles a
    worker ``ray::NAME`` while it runs a task)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(
                    f"ray::{name}".encode()):
                pids.append(int(proc.name))
        except OSError:  # the process ended
            pass
    return pids


def running_trials(run: Path) -> int:
    try:
        with sqlite3.connect(run / "search.db") as c:
            return c.execute("SELECT count(*) FROM trials WHERE state = 'RUNNING'").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_the_search_on_ray_runs_exactly_n_trials_a_killed_one_rerun(ray_address, tmp_path,
                                                                     glue_dir):
    """Three trials of one study as Ray tasks, two at a time; the worker of a running trial
    SIGKILLed: its trial turns stale and fails, its configuration is rerun by the retried
    task, and the study ends with exactly three finished trials."""
    run = tmp_path / "run"
    p = start(ray_args(ray_address, "--stages", "search", "methods=[lora]",
                       "reference_method=lora", "search.trials=3", "search.startup_trials=3",
                       "search.prune=false"), run, glue_dir)
    deadline, pids = time.time() + 120, []
    while time.time() < deadline and p.poll() is None:
        # every worker titled run_trial has asked for its trial: each is in the middle of one
        pids = ray_task_processes("run_trial")
        if pids and running_trials(run) == len(pids):
            break
        time.sleep(0.02)
    assert pids, "no Ray worker ran a trial"
    os.kill(pids[0], signal.SIGKILL)
    out = finish(p)
    states = trial_states(run, "lora")
    print(f"killed Ray worker {pids[0]} during a search trial; trial states {states}")
    assert states.count("COMPLETE") == 3, (states, out[-3000:])  # exactly N
    assert set(states) <= {"COMPLETE", "FAIL"} and states.count("FAIL") <= 1, states
    result = json.loads((run / "search" / "rte-lora.json").read_text())
    assert result["counts"]["COMPLETE"] == 3
