"""The study runner: sanity -> search -> training -> extraction -> drift -> serving -> report.

Each stage skips work already done (its outputs in the run directory are the
record), so a run killed at any point resumes where it stopped. Jobs are claimed
through the job queue (``work.JobQueue``): on the run directory's SQLite database
by default, or on ``search.storage`` (PostgreSQL) so that workers on several
machines sharing the run directory split the work without running a job twice.
Cheap, idempotent stages (drift, report) run in every worker once the jobs before
them are finished.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from tqdm.auto import tqdm

from .config import StudyConfig
from .store import RunDir, atomic_write_json, read_json
from .work import JobQueue

STAGES = ("sanity", "search", "train", "extract", "drift", "bench", "report")


def jobs_url(cfg: StudyConfig, run: RunDir) -> str:
    if cfg.search.storage:
        return cfg.search.storage
    run.root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(run.root / 'jobs.db').resolve()}"


class Study:
    """One worker's view of a study in a run directory."""

    def __init__(self, cfg: StudyConfig, run: RunDir, progress: bool = True,
                 stages: tuple[str, ...] = STAGES):
        self.cfg, self.run, self.progress, self.stages = cfg, run, progress, stages
        self.queue = JobQueue(jobs_url(cfg, run), queue=f"study:{run.root.name}",
                              stale_after=cfg.search.grace_period)
        self._base = None
        self._prepared: dict = {}
        self.bar = None

    # ---- shared, lazily loaded state
    @property
    def base(self):
        if self._base is None:
            from .train import load_base

            self._base = load_base(self.cfg)
        return self._base

    def prepared(self, task: str):
        if task not in self._prepared:
            from .train import prepare_task

            self._prepared[task] = prepare_task(self.cfg, task, self.base[1])
            self.run.record_data(task, self._prepared[task].stats())
        return self._prepared[task]

    def pairs(self):
        return [(t, m) for t in self.cfg.tasks for m in self.cfg.methods]

    def train_keys(self):
        return [(t, m, s) for t, m in self.pairs() for s in self.cfg.seeds]

    # ---- bookkeeping
    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        print(f"== stage {self.stages.index(name) + 1}/{len(self.stages)}: {name}", flush=True)
        yield
        path = self.run.root / "timings.json"
        data = read_json(path) if path.is_file() else {}
        data[name] = data.get(name, 0.0) + (time.perf_counter() - t0)
        atomic_write_json(path, data)

    def _units(self) -> int:
        n = 0
        if "sanity" in self.stages:
            n += len(self.pairs())
        if "search" in self.stages and self.cfg.search.enabled:
            n += len(self.pairs()) * self.cfg.search.trials
        if "train" in self.stages:
            n += len(self.train_keys())
        return n

    def tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    # ---- stages
    def do_sanity(self) -> None:
        from .sanity import collect_sanity, sanity_job, sanity_path

        todo = {f"{t}/{m}": {"task": t, "method": m} for t, m in self.pairs()}
        self.tick(sum(sanity_path(self.run, t, m).is_file() for t, m in self.pairs()))
        self.queue.add("sanity", todo)

        def one(key, p):
            if sanity_path(self.run, p["task"], p["method"]).is_file():
                return
            sanity_job(self.cfg, self.run, p["task"], p["method"], self.base,
                       self.prepared(p["task"]), progress=self.progress)
            self.tick()

        self.queue.work("sanity", one)
        res = collect_sanity(self.run, self.cfg.tasks, self.cfg.methods)
        failed = [f"{r['task']}/{r['method']}" for r in res if not r["passed"]]
        print(f"sanity: {len(res) - len(failed)}/{len(res)} passed"
              + (f" (failed: {', '.join(failed)}; the study continues, the report flags it)"
                 if failed else ""), flush=True)

    def do_search(self) -> None:
        from .search import run_search

        if not self.cfg.search.enabled:
            print("search disabled (search.enabled=false): training uses the config's values")
            return
        for t, m in self.pairs():
            res = run_search(self.cfg, self.run, t, m, self.base, progress=self.progress,
                             on_trial=self.tick)
            print(f"search {t}/{m}: best {res['metric']} {res['best']['value']:.4f} "
                  f"with {res['best']['params']}", flush=True)

    def do_train(self) -> None:
        from .search import best_overrides
        from .train import summary_line, train_job

        keys = self.train_keys()
        self.tick(sum(self.run.job_done(*k) for k in keys))
        self.queue.add("train", {f"{t}/{m}/seed{s}": {"task": t, "method": m, "seed": s}
                                 for t, m, s in keys})

        def one(key, p):
            t, m, s = p["task"], p["method"], p["seed"]
            if self.run.job_done(t, m, s):
                return
            overrides = best_overrides(self.run, t, m) if self.cfg.search.enabled else None
            metrics = train_job(self.cfg, self.run, t, m, s, prepared=self.prepared(t),
                                base=self.base, overrides=overrides, progress=self.progress)
            print(summary_line(metrics), flush=True)
            self.tick()

        self.queue.work("train", one)
        missing = [k for k in keys if not self.run.job_done(*k)]
        if missing:
            raise RuntimeError(f"training jobs not finished: {missing}")

    def do_extract(self) -> None:
        from .extract import run_extract

        ec = self.cfg.extract
        self.queue.add("extract", {t: {"task": t} for t in self.cfg.tasks})
        self.queue.work("extract", lambda key, p: run_extract(
            self.cfg, self.run, tasks=[p["task"]], n_examples=ec.examples, seed=ec.seed,
            batch_size=ec.batch_size, base=self.base, progress=self.progress))

    def do_drift(self) -> None:
        from .drift import run_drift

        run_drift(self.cfg, self.run, tasks=self.cfg.tasks, progress=self.progress)

    def do_bench(self) -> None:
        # One job: timings from several machines at once would not be comparable, and the
        # multi-adapter part loads adapters of every task on one base.
        from .serving.bench import run_bench

        bc = self.cfg.bench
        self.queue.add("bench", {"all": {}})
        self.queue.work("bench", lambda key, p: run_bench(
            self.cfg, self.run, tasks=self.cfg.tasks, batch_sizes=bc.batch_sizes,
            warmup=bc.warmup, n_requests=bc.requests, mixed_batch_size=bc.mixed_batch_size,
            progress=self.progress))

    def do_report(self) -> None:
        from .report import build_report

        path = build_report(self.run)
        print(f"report: {path}", flush=True)

    def run_all(self) -> None:
        t0 = time.perf_counter()
        with tqdm(total=self._units(), desc="study", unit="job", disable=not self.progress,
                  position=1, leave=True) as self.bar:
            for name in self.stages:
                with self.stage(name):
                    getattr(self, f"do_{name}")()
        print(f"study finished in {time.perf_counter() - t0:.0f} s; run directory {self.run.root}",
              flush=True)
