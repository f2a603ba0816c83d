"""Search (Optuna TPE on SQLite) and the job queue, on the tiny random Llama (tiny-random)."""

import threading

import optuna
import pytest

from loralens.core.config import StudyConfig
from loralens.study.config import load_config
from loralens.training.search import run_search, space, suggest
from loralens.training.job import with_overrides
from loralens.core.run_dir import RunDir
from loralens.core.job_queue import JobQueue
from tests.helpers.overrides import tiny
from tests.helpers.search import configs, search_cfg, search_within


# The whole resolved space (what the sampler sees) of each method, as literals: the study's
# at the defaults, and the quick preset's (its search.* keys feed the space).
STUDY_SPACE = {
    "full": {"lr": ("loguniform", 1e-6, 5e-5),
             "batch_size": ("categorical", [1, 2, 4]),
             "warmup_ratio": ("uniform", 0.0, 0.2),
             "weight_decay": ("uniform", 0.0, 0.01),
             "epochs": ("categorical", [2, 3, 4])},
    "lora": {"lr": ("loguniform", 5e-5, 5e-3),
             "batch_size": ("categorical", [4, 8, 16]),
             "warmup_ratio": ("uniform", 0.0, 0.3),
             "weight_decay": ("uniform", 0.0, 0.1),
             "epochs": ("categorical", [2, 3, 4]),
             "alpha": ("categorical", [8, 16, 32, 64]),
             "dropout": ("uniform", 0.0, 0.3)},
}
QUICK_SPACE = {  # the quick preset's learning-rate search: search.params [lr]
    "full": {"lr": ("loguniform", 3e-6, 3e-4)},
    "lora": {"lr": ("loguniform", 1e-4, 1e-2)},
}


def test_spaces_are_the_studys(tmp_path):
    for method in ("full", "lora"):
        assert space(method, StudyConfig()) == STUDY_SPACE[method]
        assert space(method, load_config("quick")) == QUICK_SPACE[method]
        # the numbers are floats, as Optuna's suggest_float gets them
        for kind, *args in space(method, StudyConfig()).values():
            assert kind == "categorical" or all(type(a) is float for a in args)
    # search.prune decides the pruner of the opened (persistent) study
    from loralens.training.search import FractionMedianPruner, open_study

    run = RunDir(tmp_path / "run")
    study = open_study(load_config(), run, "rte", "lora")  # defaults: prune on, 5 start-ups
    assert type(study.pruner) is FractionMedianPruner  # the median at equal fractions
    assert study.pruner.n_startup_trials == 5
    study = open_study(load_config(overrides=["search.prune=false"]), run, "rte", "full")
    assert type(study.pruner) is optuna.pruners.NopPruner
    quick = open_study(load_config("quick"), run, "mrpc", "full").pruner  # 3 start-ups
    assert type(quick) is FractionMedianPruner and quick.n_startup_trials == 3
    assert type(open_study(load_config("paper"), run, "sst2", "full").pruner) is \
        optuna.pruners.NopPruner
    cfg = load_config()
    study = optuna.create_study(direction="maximize")
    ov = suggest(study.ask(), "lora", cfg)
    assert set(ov["lora"]) == {"alpha", "dropout"}  # the rank is never searched nor forced
    assert set(ov["train"]) == {"lr", "batch_size", "warmup_ratio", "weight_decay", "epochs"}
    assert "lora" not in suggest(optuna.create_study().ask(), "full", cfg)
    # a rank study keeps its rank through the search's overrides
    rank16 = load_config(overrides=["lora.r=16"])
    assert with_overrides(rank16, suggest(study.ask(), "lora", rank16)).lora.r == 16


def test_one_persistent_study_with_exactly_n_trials_and_resume(tmp_path, glue_dir, tiny_base):
    cfg = search_cfg(glue_dir)
    run = RunDir(tmp_path)
    res = run_search(cfg, run, "rte", "lora", tiny_base, progress=False)
    assert res["counts"]["COMPLETE"] == 4 and len(res["trials"]) == 4
    assert res["sampler"]["startup_trials"] == 2
    assert res["best"]["user_attrs"]["train_rows"] == 16
    assert res["best"]["user_attrs"]["eval_rows"] == 16
    assert (tmp_path / "search.db").is_file() and (tmp_path / "search" / "rte-lora.json").is_file()
    # Rerun: the study is loaded from storage; nothing is repeated.
    again = run_search(cfg, run, "rte", "lora", tiny_base, progress=False)
    assert [t["params"] for t in again["trials"]] == [t["params"] for t in res["trials"]]
    # Raising the budget adds exactly the missing trials to the same study.
    more = run_search(search_cfg(glue_dir, trials=6), run, "rte", "lora", tiny_base,
                      progress=False)
    assert more["counts"]["COMPLETE"] == 6
    assert [t["params"] for t in more["trials"][:4]] == [t["params"] for t in res["trials"]]
    # The rank is the config's, never the search's (search keeps lora.r).
    assert "r" not in more["overrides"]["lora"]
    assert with_overrides(cfg, more["overrides"]).lora.r == cfg.lora.r == 8


def test_two_threads_complete_exactly_n_trials(tmp_path, glue_dir, tiny_base):
    cfg = search_cfg(glue_dir, trials=5)
    run = RunDir(tmp_path)
    errors = []

    def worker():
        try:
            run_search(cfg, run, "sst2", "full", tiny_base, progress=False)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    study = optuna.load_study(study_name="loralens-sst2-full",
                              storage=f"sqlite:///{tmp_path / 'search.db'}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 5 and len(states) == 5


def test_job_queue_claims_each_job_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    q = JobQueue(url, "study:x")
    q.add("train", {f"job{i}": {"i": i} for i in range(6)})
    q.add("train", {"job0": {"i": 99}})  # duplicates are ignored
    claimed = []
    while (job := q.claim("train", worker="w")) is not None:
        claimed.append(job)
        q.done(job[0])
    assert [k for k, _ in claimed] == [f"job{i}" for i in range(6)]
    assert claimed[0][1] == {"i": 0}
    assert q.counts("train") == {"done": 6}


def test_stale_job_is_reclaimed(tmp_path):
    q = JobQueue(f"sqlite:///{tmp_path / 'jobs.db'}", "s", stale_after=0.0)
    q.add("train", {"a": {}})
    assert q.claim("train", worker="dead")[0] == "a"
    again = q.claim("train", worker="alive")
    assert again is not None and again[0] == "a"
    assert q.rows("train")[0]["attempts"] == 2


def test_a_trial_has_a_heartbeat_before_training_starts(tmp_path, glue_dir, tiny_base,
                                                        monkeypatch):
    """A worker killed before its heartbeat thread first beats must not leave a RUNNING
    trial that is never failed (Optuna only fails trials that have a heartbeat)."""
    import sqlite3
    import threading

    import loralens.training.search as S

    class Killed(Exception):
        pass

    seen = []

    def no_beats(trial_id, storage):  # a heartbeat thread that never gets to beat
        return threading.Thread(target=lambda: None)

    def dies(*args, **kwargs):
        with sqlite3.connect(tmp_path / "search.db") as c:
            seen.append(c.execute("SELECT t.state, COUNT(h.trial_id) FROM trials t LEFT JOIN "
                                  "trial_heartbeats h ON h.trial_id = t.trial_id").fetchone())
        raise Killed

    monkeypatch.setattr(S, "get_heartbeat_thread", no_beats)
    monkeypatch.setattr(S, "train_model", dies)
    with pytest.raises(Killed):
        run_search(search_cfg(glue_dir, trials=1), RunDir(tmp_path), "rte", "lora", tiny_base,
                   progress=False)
    assert seen == [("RUNNING", 1)]


@pytest.mark.parametrize("drawn", [0, 1])
def test_a_trial_killed_before_its_first_heartbeat_is_failed_and_retried(tmp_path, glue_dir,
                                                                           tiny_base, drawn):
    """A worker killed between ask() and its first heartbeat leaves a RUNNING trial with
    no heartbeat (Optuna never fails those); the next worker must not wait for it forever
    but fail it after the grace period and retry its configuration (the CI hang of stop 20).
    drawn=1: killed between its first and second suggestion (stop 24's CI failure)."""
    from loralens.training.search import make_sampler, open_study

    cfg = search_cfg(glue_dir, trials=2, extra=["search.heartbeat_interval=1",
                                                "search.grace_period=1"])
    run = RunDir(tmp_path)
    orphan = open_study(cfg, run, "rte", "lora").ask()  # dies here: no heartbeat recorded

    class Killed(Exception):
        pass

    def sampler_for(name):  # the worker dies once it has drawn `drawn` parameters
        if len(orphan.params) >= drawn:
            raise Killed
        return make_sampler(cfg, "rte", "lora", 0, name)

    with pytest.raises(Killed):
        suggest(orphan, "lora", cfg, sampler_for)
    orphan_params = dict(orphan.params)
    assert len(orphan_params) == drawn
    done, trials = search_within(cfg, run, tiny_base,
                                 "run_search waited forever on a trial that never had a heartbeat")
    assert trials[orphan.number].state == optuna.trial.TrialState.FAIL
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2 and done[0]["counts"]["COMPLETE"] == 2
    retry = [t for t in complete if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retry) == 1 and orphan_params.items() <= retry[0].params.items()
    # The retry keeps what the orphan drew and draws the rest as the uninterrupted trial
    # did: it takes the orphan's sampler position and each parameter has its own seed, so
    # the study holds the uninterrupted study's configurations (the fault drill of stop
    # 23's CI: a kill during the first trial's data preparation)
    scratch = run_search(cfg, RunDir(tmp_path / "scratch"), "rte", "lora", tiny_base,
                         progress=False)
    assert sorted(tuple(sorted(t.params.items())) for t in complete) == sorted(configs(scratch))
    assert len(set(configs(scratch))) == 2


def test_trials_train_with_the_search_seed_and_score_the_selection_rows(tmp_path, glue_dir,
                                                                        tiny_base, monkeypatch):
    import loralens.training.search as S

    seen = []
    real = S.train_model

    def spy(cfg, prepared, method, seed, *a, **k):
        seen.append((seed, prepared.early_stop.ids.tolist()))
        return real(cfg, prepared, method, seed, *a, **k)

    monkeypatch.setattr(S, "train_model", spy)
    cfg = search_cfg(glue_dir, 1, ["seeds=[42]", "search.seed=5"])
    res = run_search(cfg, RunDir(tmp_path), "rte", "lora", tiny_base, progress=False)
    from loralens.training.job import prepare_task

    p = prepare_task(cfg, "rte", tiny_base.tokenizer)
    (seed, ids), = seen
    assert seed == 5 and res["trial_seed"] == 5
    assert len(ids) == 16 and set(ids) <= set(p.selection_split.ids())
    assert set(ids).isdisjoint(p.train_split.ids())
    assert res["trials"][0]["user_attrs"]["eval_split"] == "train"


def test_a_command_for_some_tasks_claims_only_their_jobs(tmp_path):
    """A killed `loralens run` leaves every task's jobs pending; `loralens train --task rte`
    afterwards must train rte only (it trained whatever was pending)."""
    q = JobQueue(f"sqlite:///{tmp_path / 'jobs.db'}", queue="study:x")
    q.add("train", {f"{t}/lora/seed1": {"task": t} for t in ("mrpc", "rte", "sst2")})
    ran = []
    assert q.work("train", lambda k, p: ran.append(k), keys=["rte/lora/seed1"]) == 1
    assert ran == ["rte/lora/seed1"]
    assert {r["key"]: r["status"] for r in q.rows("train")} == {
        "mrpc/lora/seed1": "pending", "rte/lora/seed1": "done", "sst2/lora/seed1": "pending"}
    assert q.claim("train", keys=[]) is None
    assert q.work("train", lambda k, p: ran.append(k)) == 2  # no selection: the rest
    assert ran == ["rte/lora/seed1", "mrpc/lora/seed1", "sst2/lora/seed1"]


def test_train_with_a_task_selection_leaves_other_pending_jobs_alone(tmp_path, glue_dir,
                                                                      tiny_base):
    from loralens import cli

    run = RunDir(tmp_path / "run")
    args = ["--run-dir", str(run.root), "--glue-dir", str(glue_dir), "--no-progress",
            *tiny("tasks=[rte,sst2]", "methods=[lora]", "seeds=[1]", "search.enabled=false")]
    run.bind_config(load_config(overrides=args[5:]))
    # what a killed `loralens run` leaves behind: both tasks' jobs pending
    q = JobQueue(run.sqlite_url("jobs"), queue=f"study:{run.root.name}")
    q.add("train", {f"{t}/lora/seed1": {"task": t, "method": "lora", "seed": 1}
                    for t in ("rte", "sst2")})
    assert cli.main(["train", "--task", "rte", *args]) == 0
    assert run.metrics_path("rte", "lora", 1).is_file()
    assert not run.metrics_path("sst2", "lora", 1).exists()


def test_sampler_position_of_new_trials_and_of_a_killed_trials_retry():
    """New trials take the next position held (FAILed and WAITING trials hold none); the
    retry of a killed trial (the oldest WAITING one, which ask() takes) takes the killed
    trial's recorded position, or, unrecorded, the one it was asked at."""
    from optuna.trial import TrialState, create_trial

    from loralens.training.search import POSITION_ATTR, sampler_position

    def trial(n, state, **sys):
        t = create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                         system_attrs=sys)
        t.number = n
        return t

    C, R, F, W = TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING
    assert sampler_position([]) == 0
    assert sampler_position([trial(0, C), trial(1, R)]) == 2   # a running worker holds one
    # killed trial 1 (position 1): its retry replays position 1, the next new trial takes 2
    killed = [trial(0, C, **{POSITION_ATTR: 0}), trial(1, F, **{POSITION_ATTR: 1})]
    assert sampler_position([*killed, trial(2, W, failed_trial=1)]) == 1
    assert sampler_position([*killed, trial(2, C, failed_trial=1)]) == 2
    # a worker killed while another went on: trial 0 failed after trial 1 took position 1
    assert sampler_position([trial(0, F, **{POSITION_ATTR: 0}), trial(1, C),
                             trial(2, W, failed_trial=0)]) == 0
    # no recorded position (a trial asked outside loralens): as if asked in order
    assert sampler_position([trial(0, C), trial(1, F), trial(2, W, failed_trial=1)]) == 1
