"""Work distribution over a shared database: study locks and a job queue.

Several workers (processes or machines) that share a run directory and a database
claim jobs so that none runs twice. On PostgreSQL a worker claims the next pending
job with ``SELECT ... FOR UPDATE SKIP LOCKED`` inside an UPDATE: concurrent
claimers skip each other's locked rows instead of waiting, and no extra service or
library is needed (the database Optuna already uses is the queue). On SQLite (one
machine) the same statement runs in a write transaction, which SQLite serialises.

A running job's heartbeat is refreshed by a background thread; a job whose
heartbeat is older than ``stale_after`` seconds belonged to a killed worker and is
claimed again. A job's own output (e.g. ``metrics.json``) is the final word on
completion: the queue only decides who works on what.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Collection, Iterator

import sqlalchemy as sa

from loralens.core.leftovers import pid_alive

_ENGINES: dict[str, sa.Engine] = {}


def sqlite_url(path: str | Path) -> str:
    """SQLAlchemy URL of a SQLite file (absolute, so every process agrees on it)."""
    return f"sqlite:///{Path(path).resolve()}"


def engine_kwargs(url: str) -> dict:
    """The engine options for every database loralens opens (job queue and Optuna):
    SQLite waits up to 60 s for a writer's lock; PostgreSQL checks pooled connections."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}


def engine(url: str) -> sa.Engine:
    """One engine per URL and process."""
    if url not in _ENGINES:
        _ENGINES[url] = sa.create_engine(url, **engine_kwargs(url))
    return _ENGINES[url]


def _key64(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def study_lock(url: str, name: str, root: Path) -> Iterator[None]:
    """A cross-process lock: PostgreSQL advisory lock, else a file lock in ``root``."""
    if url.startswith("postgresql"):
        with engine(url).connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _key64(name)})
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _key64(name)})
                conn.commit()
    else:
        from filelock import FileLock

        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f".{name}.lock")):
            yield


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def dead_local(worker: str | None) -> bool:
    """Whether ``worker`` (a :func:`worker_id`) is a process of this host, other than this
    one, that no longer runs: its claimed job or asked trial can be taken over at once."""
    host, _, pid = (worker or "").rpartition(":")
    return (host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid()
            and not pid_alive(int(pid)))


DDL = """
CREATE TABLE IF NOT EXISTS loralens_jobs (
    queue TEXT NOT NULL,
    key TEXT NOT NULL,
    stage TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    worker TEXT,
    heartbeat DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, key)
)"""


class JobQueue:
    """Jobs of one study (``queue``), each with a unique ``key`` and a JSON payload."""

    def __init__(self, url: str, queue: str, stale_after: float = 180.0):
        self.url, self.queue, self.stale_after = url, queue, stale_after
        self.engine = engine(url)
        self.pg = url.startswith("postgresql")
        with self.engine.begin() as c:
            if self.pg:  # CREATE TABLE IF NOT EXISTS races on PostgreSQL's catalog
                c.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _key64("ddl")})
            c.execute(sa.text(DDL))

    def add(self, stage: str, jobs: dict[str, dict], reopen: bool = False,
            finished: Callable[[dict], bool] | None = None) -> None:
        """Enqueue jobs (key -> payload); keys already present are left as they are, except
        that ``reopen`` puts 'done' ones back to pending (their output was found missing,
        or is to be redone).

        With ``finished`` (the job's done test on its payload), a 'done' job is reopened
        only when ``finished`` still says its output is missing after its row was read as
        'done', and only if the row has not changed since (same attempts, still 'done'):
        one conditional UPDATE. A worker marks a job done after writing its output, so a
        job that another worker finished after the caller last looked is left done (an
        unconditional reopen of it was the race that raised ``attempts`` to 2 with two
        workers: the job was claimed again, found finished, and not rerun)."""
        with self.engine.begin() as c:
            for key, payload in jobs.items():
                c.execute(sa.text(
                    "INSERT INTO loralens_jobs (queue, key, stage, payload) "
                    "VALUES (:q, :k, :s, :p) ON CONFLICT DO NOTHING"),
                    {"q": self.queue, "k": key, "s": stage, "p": json.dumps(payload)})
        if not reopen:
            return
        for key, payload in jobs.items():
            with self.engine.begin() as c:
                if finished is None:  # to be redone, whatever its state
                    c.execute(sa.text(
                        "UPDATE loralens_jobs SET status = 'pending', worker = NULL "
                        "WHERE queue = :q AND key = :k AND status = 'done'"),
                        {"q": self.queue, "k": key})
                    continue
                row = c.execute(sa.text(
                    "SELECT status, attempts FROM loralens_jobs WHERE queue = :q AND key = :k"),
                    {"q": self.queue, "k": key}).first()
            if row is None or row[0] != "done" or finished(payload):
                continue
            with self.engine.begin() as c:
                c.execute(sa.text(
                    "UPDATE loralens_jobs SET status = 'pending', worker = NULL "
                    "WHERE queue = :q AND key = :k AND status = 'done' AND attempts = :a"),
                    {"q": self.queue, "k": key, "a": row[1]})

    def release_dead_local(self, stage: str) -> None:
        """Jobs 'running' under a process of this host that no longer exists go back.

        Each release is conditional (one UPDATE: still 'running' under that dead worker):
        another worker may have released and claimed the job since the rows were read, and
        an unconditional release would take it from that live worker (a second claim, and
        a second run of the job)."""
        for r in self.rows(stage):
            if r["status"] == "running" and dead_local(r["worker"]):
                with self.engine.begin() as c:
                    c.execute(sa.text(
                        "UPDATE loralens_jobs SET status = 'pending', worker = NULL "
                        "WHERE queue = :q AND key = :k AND status = 'running' AND worker = :w"),
                        {"q": self.queue, "k": r["key"], "w": r["worker"]})

    def claim(self, stage: str, worker: str | None = None,
              keys: Collection[str] | None = None) -> tuple[str, dict] | None:
        """Atomically take the next pending (or stale running) job of ``stage``, among
        ``keys`` when given (a command run for some tasks must not take the others' jobs
        that an earlier, killed run left in the queue)."""
        self.release_dead_local(stage)
        now = time.time()
        lock = " FOR UPDATE SKIP LOCKED" if self.pg else ""
        among = " AND key IN :keys" if keys is not None else ""
        sql = sa.text(
            "UPDATE loralens_jobs SET status = 'running', worker = :w, heartbeat = :now, "
            "attempts = attempts + 1 WHERE queue = :q AND key = ("
            "  SELECT key FROM loralens_jobs WHERE queue = :q AND stage = :s AND"
            f"  (status = 'pending' OR (status = 'running' AND heartbeat < :stale)){among}"
            f"  ORDER BY key LIMIT 1{lock}) RETURNING key, payload")
        params = {"w": worker or worker_id(), "now": now, "q": self.queue, "s": stage,
                  "stale": now - self.stale_after}
        if keys is not None:
            if not keys:
                return None
            sql = sql.bindparams(sa.bindparam("keys", expanding=True))
            params["keys"] = list(keys)
        with self.engine.begin() as c:  # one statement: atomic on SQLite too
            row = c.execute(sql, params).first()
        return (row[0], json.loads(row[1])) if row else None

    def _set(self, key: str, **fields) -> None:
        sets = ", ".join(f"{k} = :{k}" for k in fields)
        with self.engine.begin() as c:
            c.execute(sa.text(f"UPDATE loralens_jobs SET {sets} WHERE queue = :q AND key = :key"),
                      {**fields, "q": self.queue, "key": key})

    def done(self, key: str) -> None:
        self._set(key, status="done", heartbeat=time.time())

    def release(self, key: str) -> None:
        """Give a job back (e.g. on Ctrl-C) so another worker takes it at once."""
        self._set(key, status="pending", worker=None)

    def beat(self, key: str) -> None:
        self._set(key, heartbeat=time.time())

    def counts(self, stage: str, keys: Collection[str] | None = None) -> dict[str, int]:
        rows = [r for r in self.rows(stage) if keys is None or r["key"] in keys]
        out: dict[str, int] = {}
        for r in rows:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out

    def rows(self, stage: str) -> list[dict]:
        with self.engine.connect() as c:
            rows = c.execute(sa.text(
                "SELECT key, status, worker, attempts FROM loralens_jobs WHERE queue = :q AND "
                "stage = :s ORDER BY key"), {"q": self.queue, "s": stage}).all()
        return [dict(key=r[0], status=r[1], worker=r[2], attempts=r[3]) for r in rows]

    @contextlib.contextmanager
    def heartbeat(self, key: str, interval: float = 30.0) -> Iterator[None]:
        stop = threading.Event()

        def loop():
            while not stop.wait(interval):
                try:
                    self.beat(key)
                except Exception:  # a missed beat is retried at the next interval
                    pass

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join(timeout=5)

    def work(self, stage: str, run_one, poll: float = 2.0, wait: bool = True,
             keys: Collection[str] | None = None) -> int:
        """Claim and run jobs of ``stage`` (only ``keys``, when given) until none is
        pending; then, if ``wait``, wait for those other workers are running (taking over
        stale ones). Returns jobs run here."""
        ran = 0
        keys = set(keys) if keys is not None else None
        while True:
            job = self.claim(stage, keys=keys)
            if job is None:
                c = self.counts(stage, keys)
                if not wait or c.get("running", 0) == 0:
                    return ran
                time.sleep(poll)
                continue
            key, payload = job
            try:
                with self.heartbeat(key, interval=max(1.0, self.stale_after / 6)):
                    run_one(key, payload)
            except BaseException:  # Ctrl-C or an error: give the job back, then stop
                self.release(key)
                raise
            self.done(key)
            ran += 1
