"""A run killed with SIGKILL during search and during training resumes without
losing or repeating any completed trial or model. On the ``micro`` preset (the tiny
random model): resuming does not depend on the model, and SmolLM2 only made the processes
slower (and the kill's timing more variable on a loaded machine)."""

import json
import os
import signal
import time

import optuna

from tests.helpers.drills import loralens

def wait_for(cond, proc, timeout=600, every=0.2):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(every)
    raise AssertionError("timed out")


def kill(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()  # reap: a zombie would still look alive


def trials(run_dir, name):
    try:
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'search.db'}")
    except KeyError:
        return []
    return study.get_trials(deepcopy=False)


def test_sigkill_during_search_loses_and_repeats_nothing(tmp_path, glue_dir):
    run = tmp_path / "run"
    # a micro trial lasts a fraction of a second: 6 trials give 5 windows for the kill
    n_trials = 6
    args = ["hpo", "--preset", "micro", "--task", "rte", "--method", "lora", "--trials", str(n_trials)]
    p = loralens(args, run, glue_dir)
    done = lambda: [t for t in trials(run, "loralens-rte-lora") if t.state.name == "COMPLETE"]

    def states():  # cheap poll (plain SQL), so the kill lands while a trial runs
        import sqlite3

        try:
            with sqlite3.connect(run / "search.db", timeout=1) as c:
                return [r[0] for r in c.execute("SELECT state FROM trials ORDER BY number")]
        except sqlite3.Error:
            return []

    # kill while a trial after the first completed one is running
    wait_for(lambda: "COMPLETE" in states() and states()[-1:] == ["RUNNING"], p, every=0.02)
    kill(p)
    first = {t.number: t.params for t in done()}
    killed = [t for t in trials(run, "loralens-rte-lora") if t.state.name == "RUNNING"]
    assert len(first) >= 1
    p = loralens(args, run, glue_dir)
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
    final = trials(run, "loralens-rte-lora")
    complete = [t for t in final if t.state.name == "COMPLETE"]
    assert len(complete) == n_trials
    # completed trials are kept, unchanged, and not run again
    for n, params in first.items():
        assert final[n].state.name == "COMPLETE" and final[n].params == params
    # the killed trial was failed by its missing heartbeat and its configuration retried
    # (a kill before or while the trial drew its configuration leaves it none or part of
    # it: the retry keeps what was drawn and draws the rest at the killed trial's sampler
    # position, as the uninterrupted trial did: tests/unit/training/test_search_job_queue.py)
    for k in killed:
        assert final[k.number].state.name == "FAIL"
        assert any(t.system_attrs.get("failed_trial") == k.number
                   and k.params.items() <= t.params.items() for t in complete)
    best = json.loads((run / "search" / "rte-lora.json").read_text())
    assert best["counts"]["COMPLETE"] == n_trials


def test_sigkill_during_training_resumes(tmp_path, glue_dir):
    run = tmp_path / "run"
    args = ["run", "--preset", "micro", "--stages", "train", "search.enabled=false",
            "tasks=[rte]",
            "seeds=[1,2]", "methods=[lora]"]
    p = loralens(args, run, glue_dir)
    metrics = lambda: sorted(run.glob("models/*/*/seed*/metrics.json"))
    wait_for(lambda: len(metrics()) >= 1, p)
    kill(p)
    before = {m: m.stat().st_mtime_ns for m in metrics()}
    p = loralens(args, run, glue_dir)
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
    after = metrics()
    assert len(after) == 2
    for m, t in before.items():  # finished models were not retrained
        assert m.stat().st_mtime_ns == t
    import sqlite3

    rows = sqlite3.connect(run / "jobs.db").execute(
        "SELECT key, status FROM loralens_jobs WHERE stage='train' ORDER BY key").fetchall()
    assert rows == [("rte/lora/seed1", "done"), ("rte/lora/seed2", "done")]


# a job long enough to be killed between its checkpoints: 64 rows in batches of 2 for two
# epochs (64 optimizer steps per job, a checkpoint after each), no search, one seed
MID_JOB = ["search.enabled=false", "seeds=[42]", "methods=[lora,full]", "data.train_size=64",
           "train.batch_size=2", "train.epochs=2", "train.patience=0",
           "train.checkpoint_every=1"]


def test_sigkill_mid_job_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, glue_dir):
    """``loralens train`` SIGKILLed after the full fine-tuning job's first checkpoint: the
    rerun keeps the finished LoRA job, continues the full one from its checkpoint (not from
    step 0) and ends byte-identical to an uninterrupted run, its checkpoint removed."""
    from tests.helpers.drills import assert_same_study, finish, start

    ref, run = tmp_path / "ref", tmp_path / "run"
    finish(start(["train", *MID_JOB], ref, glue_dir))
    ckpt = run / "models" / "rte" / "full" / "seed42" / "checkpoint.safetensors"
    p = start(["train", *MID_JOB], run, glue_dir)
    wait_for(ckpt.is_file, p, timeout=300, every=0.01)
    kill(p)
    assert ckpt.is_file() and not (ckpt.parent / "metrics.json").exists()  # killed mid-job
    out = finish(start(["train", *MID_JOB], run, glue_dir))
    assert "resuming from the checkpoint at step" in out
    fit = json.loads((ckpt.parent / "metrics.json").read_text())["fit"]
    assert len(fit["resumed_at"]) == 1 and 0 < fit["resumed_at"][0] < fit["steps"]
    assert not list(run.glob("models/*/*/seed*/checkpoint.safetensors"))  # removed when done
    for rel in ("models/rte/full/seed42/model/model.safetensors",
                "models/rte/lora/seed42/adapter/adapter_model.safetensors"):
        assert (run / rel).read_bytes() == (ref / rel).read_bytes(), rel
    assert_same_study(ref, run)  # metrics, logits, cards: the same, wall times left out
