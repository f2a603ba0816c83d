"""The search across processes and runs (tiny random model): the sampler seed is the same in
every process (Python's hash() is salted per process); a trial whose worker is a dead process
of this host is failed and retried at once; reruns, resumes and a second worker never repeat
a configuration (one search after another: the in-process tests are in
tests/unit/training/test_search_job_queue.py)."""

import os
import subprocess
import sys
import threading

import optuna

from loralens.core.run_dir import RunDir
from loralens.training.search import run_search, sampler_seed, space
from tests.helpers.search import configs, search_cfg, search_within


def test_sampler_seed_is_stable_across_processes():
    code = "from loralens.training.search import sampler_seed; print(sampler_seed('rte', 'lora'))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout.strip()
            for h in (0, 1, 2)}
    assert outs == {str(sampler_seed("rte", "lora"))}
    assert sampler_seed("rte", "lora") != sampler_seed("rte", "full")


def test_a_dead_local_workers_trial_is_retried_at_once_and_the_study_is_unchanged(
        tmp_path, glue_dir, tiny_base):
    """A command resumed right after a SIGKILL finds the killed trial RUNNING with a fresh
    heartbeat. Waiting out the grace period, it asked a new trial first: TPE drew both from
    other histories than the uninterrupted study's (stop 24's CI: the fault drill's round
    19). A trial whose worker (host:pid, recorded at ask) is a dead process of this host
    is failed and retried at once; other hosts' trials and live workers' are left alone."""
    import socket

    from loralens.training.search import (
        WORKER_ATTR,
        fail_dead_local,
        make_sampler,
        open_study,
    )

    cfg = search_cfg(glue_dir, trials=2, extra=["search.heartbeat_interval=1",
                                                "search.grace_period=600"])
    run = RunDir(tmp_path)
    study = open_study(cfg, run, "rte", "lora")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    killed = study.ask()  # killed after its first suggestion, its heartbeat still fresh
    storage = study._storage
    storage.set_trial_system_attr(killed._trial_id, WORKER_ATTR, f"{socket.gethostname()}:{dead}")
    storage.set_trial_system_attr(killed._trial_id, "loralens:sampler_position", 0)
    storage.record_heartbeat(killed._trial_id)
    study.sampler = make_sampler(cfg, "rte", "lora", 0, "lr")
    killed.suggest_float("lr", *space("lora", cfg)["lr"][1:], log=True)
    # other hosts' trials and live processes' trials stay RUNNING
    others = [study.ask() for _ in range(2)]
    storage.set_trial_system_attr(others[0]._trial_id, WORKER_ATTR, f"other-host:{dead}")
    storage.set_trial_system_attr(others[1]._trial_id, WORKER_ATTR,
                                  f"{socket.gethostname()}:{os.getppid()}")
    assert fail_dead_local(study) == [killed._trial_id]
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states == {0: "FAIL", 1: "RUNNING", 2: "RUNNING", 3: "WAITING"}
    assert study.get_trials()[3].system_attrs["failed_trial"] == 0
    for t in others:  # (not part of the study below)
        storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)

    # the run itself: the retry comes first and the study ends as the uninterrupted one
    run2 = RunDir(tmp_path / "resumed")
    study = open_study(cfg, run2, "rte", "lora")
    killed = study.ask()
    study._storage.set_trial_system_attr(killed._trial_id, WORKER_ATTR,
                                         f"{socket.gethostname()}:{dead}")
    study._storage.set_trial_system_attr(killed._trial_id, "loralens:sampler_position", 0)
    study._storage.record_heartbeat(killed._trial_id)  # fresh: 600 s before it turns stale
    done, trials = search_within(cfg, run2, tiny_base,
                                 "run_search waited for the dead worker's heartbeat to go stale")
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].system_attrs["failed_trial"] == 0  # the retry ran first
    scratch = run_search(cfg, RunDir(tmp_path / "scratch"), "rte", "lora", tiny_base,
                         progress=False)
    assert [tuple(sorted(t.params.items())) for t in trials[1:]] == configs(scratch)
    assert done[0]["counts"]["COMPLETE"] == 2


def test_workers_resumes_and_reruns_never_repeat_a_configuration(tmp_path, glue_dir, tiny_base):
    """Every trial random (startup 4 of 4) makes a repeat visible: with one fixed sampler
    seed per study, a resumed process and a second worker both drew trial 0's
    configuration again (issue 12)."""
    extra = ["search.startup_trials=4"]
    scratch = run_search(search_cfg(glue_dir, 4, extra), RunDir(tmp_path / "a"), "rte", "lora",
                         tiny_base, progress=False)
    assert len(set(configs(scratch))) == 4
    rerun = run_search(search_cfg(glue_dir, 4, extra), RunDir(tmp_path / "b"), "rte", "lora",
                       tiny_base, progress=False)
    assert configs(rerun) == configs(scratch)          # reproducible from scratch

    # kill-and-resume: two trials, then a new process (a fresh study object) asks for more
    resumed_dir = RunDir(tmp_path / "c")
    run_search(search_cfg(glue_dir, 2, extra), resumed_dir, "rte", "lora", tiny_base,
               progress=False)
    resumed = run_search(search_cfg(glue_dir, 4, extra), resumed_dir, "rte", "lora", tiny_base,
                         progress=False)
    assert len(set(configs(resumed))) == 4
    assert configs(resumed) == configs(scratch)        # as if never interrupted

    # two workers on one study
    cfg, run = search_cfg(glue_dir, 4, extra), RunDir(tmp_path / "d")
    threads = [threading.Thread(target=run_search, args=(cfg, run, "rte", "lora", tiny_base),
                                kwargs={"progress": False}) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    study = optuna.load_study(study_name="loralens-rte-lora", storage=run.sqlite_url("search"))
    assert len(study.trials) == 4 and len(set(configs(study))) == 4
