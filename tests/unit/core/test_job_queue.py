"""The job table under two workers, interleaved by hand on SQLite (no processes): a job
that one worker finished while another was looking is not reopened, and a dead worker's
job that a live worker took over is not taken from it by a second worker's stale read."""

from __future__ import annotations

import socket

from loralens.core import job_queue
from loralens.core.job_queue import JobQueue


def queues(tmp_path) -> tuple[JobQueue, JobQueue]:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    return JobQueue(url, "study:x"), JobQueue(url, "study:x")


def test_a_job_finished_by_another_worker_after_the_done_test_is_not_reopened(tmp_path):
    a, b = queues(tmp_path)
    outputs: set[str] = set()           # the jobs' outputs (metrics.json) on disk
    finished = lambda p: p["key"] in outputs  # noqa: E731 - the stage's done test
    jobs = {"rte/lora/seed1": {"key": "rte/lora/seed1"}}
    # B runs its done test first: the output is missing, so the job is in its todo
    todo_b = {k: p for k, p in jobs.items() if not finished(p)}
    assert todo_b == jobs
    # meanwhile A enqueues, claims, writes the output, marks it done
    a.add("train", jobs, reopen=True, finished=finished)
    assert a.claim("train", worker="A")[0] == "rte/lora/seed1"
    outputs.add("rte/lora/seed1")
    a.done("rte/lora/seed1")
    # now B enqueues its (stale) todo for reopening: the job stays done, B claims nothing
    b.add("train", todo_b, reopen=True, finished=finished)
    assert b.claim("train", worker="B") is None
    assert a.rows("train") == [
        {"key": "rte/lora/seed1", "status": "done", "worker": "A", "attempts": 1}]


def test_a_done_job_whose_output_is_missing_is_reopened(tmp_path):
    a, b = queues(tmp_path)
    jobs = {"j": {"key": "j"}}
    a.add("train", jobs)
    assert a.claim("train", worker="A")[0] == "j"
    a.done("j")
    # the output was deleted later: the next command's done test says missing
    b.add("train", jobs, reopen=True, finished=lambda p: False)
    assert [(r["status"], r["worker"]) for r in b.rows("train")] == [("pending", None)]
    assert b.claim("train", worker="B")[0] == "j"
    assert b.rows("train")[0]["attempts"] == 2
    # without a done test (overwrite: redo whatever is done) every done job reopens
    b.done("j")
    b.add("train", jobs, reopen=True)
    assert b.rows("train")[0]["status"] == "pending"


def test_a_stale_read_does_not_release_a_job_a_live_worker_took_over(tmp_path, monkeypatch):
    a, b = queues(tmp_path)
    dead = f"{socket.gethostname()}:999999991"
    monkeypatch.setattr(job_queue, "dead_local", lambda w: w == dead)
    a.add("train", {"j": {}})
    assert a.claim("train", worker=dead)[0] == "j"        # the worker then died
    stale = b.rows("train")                                 # B reads: j under the dead one
    assert stale[0]["worker"] == dead
    assert a.claim("train", worker="A")[0] == "j"          # A releases and takes it over
    monkeypatch.setattr(b, "rows", lambda stage: stale)    # B acts on what it read
    assert b.claim("train", worker="B") is None             # j stays A's
    monkeypatch.undo()
    assert a.rows("train") == [{"key": "j", "status": "running", "worker": "A", "attempts": 2}]
