"""Executors: where the units of work of a stage run (``run.executor``, ``--executor``).

``local`` (the default, no Ray needed): the process that runs the stage claims the jobs
one at a time from the job table (:mod:`loralens.core.job_queue`); more workers are more
``loralens run`` processes on the same run directory and database.

``ray``: the driver (``loralens run --executor ray``) submits every unit of work as a
Ray task with the stage's resource request (``run.ray_resources``): each search trial
of a task and method, each job of every other stage (sanity, train, extract, weights,
bench). A stage's tasks all finish before the next stage starts, so the stage order is
the dependency (train after search, extract after train). Ray reruns a task whose
worker process died (``run.ray_max_retries``).

A Ray task runs the same code as the local executor: it rebuilds the stage's
:class:`~loralens.study.stages.Context` from the driver's config, run directory and selection,
and runs the stage's own function with an executor (:class:`OneJob`) that lets only
its one job through ``Context.work``, i.e. through the job table: the job is claimed
(a rerun after a dead worker takes it over: ``JobQueue.release_dead_local`` on the same
host, the heartbeat's ``stale_after`` elsewhere), its output in the shared run directory
is the final word on completion, and it is never done twice. A search trial is one
``search.run_trials(limit=1)``: it asks the study in its RDB storage for a trial under
the study lock, so trials from every Ray worker feed one TPE sampler and the study
ends with exactly ``search.trials`` trials. What is left to the driver is what a local
run does around the jobs (summaries, the tables of the weights stage, the search's
best trial), so a Ray run and a local run of one config give the same run directory.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from loralens.core.errors import ConfigError

from loralens.core.config import RAY_RESOURCE_KEYS, RunConfig, StudyConfig

# Passed on to the Ray workers when this driver starts or joins the cluster: where data,
# caches and services are (a worker of an existing cluster has its own environment).
FORWARDED_ENV = ("LORALENS_GLUE_DIR", "LORALENS_CACHE", "LORALENS_STORAGE", "HF_HOME",
                 "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "MLFLOW_TRACKING_URI",
                 "TOKENIZERS_PARALLELISM")


def make_executor(cfg: StudyConfig):
    """The executor of ``cfg.run.executor``: None for local (``Context.work`` as is)."""
    return RayExecutor(cfg.run) if cfg.run.executor == "ray" else None


def import_ray():
    """The ``ray`` module, or a ConfigError naming the extra that installs it."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError("run.executor: 'ray' needs Ray, which is not installed here; install "
                          "the ray extra: pip install 'loralens[ray]' (or pip install -e "
                          "'.[ray]' in a checkout)", "run.executor") from e
    return ray


def ray_options(rc: RunConfig, stage: str) -> dict:
    """``.options()`` of a Ray task of ``stage``: its resource request and retries."""
    request = dict(rc.ray_resources.get(stage) or rc.ray_resources.get("default")
                   or {"num_cpus": 1.0})
    opts: dict[str, Any] = {k: request.pop(k) for k in ("num_cpus", "num_gpus") if k in request}
    if "memory" in request:
        opts["memory"] = int(request.pop("memory"))
    if request:  # custom resources, e.g. {accelerator_type_H100: 1}
        opts["resources"] = request
    assert not set(opts) - {*RAY_RESOURCE_KEYS, "resources"}
    # a worker that died is rerun (Ray's system failures); an exception in the job is the
    # job's own error and goes to the driver as it would locally
    return {**opts, "max_retries": rc.ray_max_retries, "retry_exceptions": False}


@dataclass(frozen=True)
class Spec:
    """What a Ray task needs to rebuild the driver's Context (picklable)."""

    cfg: StudyConfig
    root: str
    tasks: tuple[str, ...] | None
    methods: tuple[str, ...] | None
    seeds: tuple[int, ...] | None
    overwrite: bool
    use_search: bool

    @classmethod
    def of(cls, ctx) -> "Spec":
        t = lambda v: tuple(v) if v is not None else None  # noqa: E731
        return cls(ctx.cfg, str(ctx.run.root.resolve()), t(ctx.select_tasks),
                   t(ctx.select_methods), t(ctx.select_seeds), ctx.overwrite, ctx.use_search)

    def cache_key(self) -> str:
        return json.dumps([self.cfg.to_dict(), self.root, self.tasks, self.methods, self.seeds,
                           self.overwrite, self.use_search], sort_keys=True, default=str)


def stage_of_queue(queue: str):
    """The stage whose function enqueues jobs under ``queue`` (the stage table's
    :data:`~loralens.study.stages.QUEUES`: "train", "weights", "weights-sweep", ...)."""
    from loralens.study.stages import QUEUES

    return QUEUES[queue][0]


class RayExecutor:
    """The driver's side: each unit of work a Ray task; waits for a stage's tasks."""

    def __init__(self, rc: RunConfig):
        self.rc = rc
        self.ray = import_ray()  # fails before any work when Ray is missing
        self._remote: dict = {}

    def remote(self, fn, stage: str):
        """``fn`` as a Ray task of ``stage`` (joining the cluster first: a task submitted
        before ``ray.init`` would start a cluster of its own)."""
        if not self.ray.is_initialized():  # unless connected already (a test, a notebook)
            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            # no address anywhere: Ray starts a cluster of this machine alone, kept on
            # loopback (a cluster reachable from the network is the user's to start)
            local = not (self.rc.ray_address or os.environ.get("RAY_ADDRESS"))
            self.ray.init(address=self.rc.ray_address, runtime_env={"env_vars": env},
                          include_dashboard=False, log_to_driver=True,
                          **({"_node_ip_address": "127.0.0.1"} if local else {}))
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(fn)
        return self._remote[fn].options(**ray_options(self.rc, stage))

    def work(self, ctx, stage: str, todo: dict[str, dict], skipped: list, claimed,
             finished=None) -> list:
        """``Context.work`` on Ray: one task per job not finished; returns ``skipped``
        (each task applies the stage's ``finished`` test itself: :class:`OneJob`)."""
        if todo:
            spec, task = Spec.of(ctx), self.remote(run_job, stage_of_queue(stage).name)
            self.wait(ctx, [task.remote(spec, stage, key) for key in todo])
        return skipped

    def search(self, ctx) -> None:
        """Every trial still to run of every (task, method) a task, all at once."""
        from optuna.trial import TrialState

        from loralens.training.search import open_study

        spec, task = Spec.of(ctx), self.remote(run_trial, "search")
        refs = []
        for t, m in ctx.pairs():  # a killed run's RUNNING trials are rerun: not counted
            done = open_study(ctx.cfg, ctx.run, t, m).get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            refs += [task.remote(spec, t, m)
                     for _ in range(max(0, ctx.cfg.search.trials - len(done)))]
        self.wait(ctx, refs)

    def wait(self, ctx, refs: list) -> None:
        """Wait for every task, adding each one's jobs to the study's bar; the first
        error is raised (the job's own exception type), the rest cancelled."""
        pending = list(refs)
        try:
            while pending:
                (ref,), pending = self.ray.wait(pending, num_returns=1)
                ctx.tick(self.ray.get(ref))
        finally:
            for ref in pending:  # an error or Ctrl-C: the running jobs are given back
                self.ray.cancel(ref)


class JobDone(Exception):
    """Raised by :class:`OneJob` once its job ran: the rest of the stage function (its
    summaries and tables over all jobs) is the driver's."""

    def __init__(self, ticks: int):
        super().__init__(ticks)
        self.ticks = ticks


class OneJob:
    """The executor of a Ray task's Context: only job ``key`` of ``stage``, through the
    job table, as ``Context.work`` runs it locally."""

    def __init__(self, stage: str, key: str):
        self.stage, self.key = stage, key

    def work(self, ctx, stage: str, todo: dict[str, dict], skipped: list, claimed,
             finished=None) -> list:
        if stage != self.stage:  # an earlier call of the stage function (weights: the models
            return []            # before the sweep); its jobs are not this task's
        before = ctx.bar.n
        # as Context.work: a done job is reopened only if its output is still missing once
        # its row reads done (``finished``; None under overwrite: redone whatever its state)
        ctx.queue.add(stage, {k: p for k, p in todo.items() if k == self.key}, reopen=True,
                      finished=finished)
        ctx.queue.work(stage, claimed, keys=[self.key])
        raise JobDone(ctx.bar.n - before)

    def search(self, ctx) -> None:  # pragma: no cover - a search trial is run_trial's
        raise RuntimeError("a Ray task runs one job, not a search")


class Ticks:
    """A Ray task's stand-in for the study's progress bar: counts the jobs it reports."""

    def __init__(self):
        self.n = 0

    def update(self, n: int) -> None:
        self.n += n


_CONTEXTS: dict[str, Any] = {}  # per worker process: the base model and data, loaded once


def worker_logging() -> None:
    """A Ray worker process runs the stages' functions without the CLI, which sets up the
    ``loralens`` logger's handler: give it the CLI's plain format on stdout (Ray forwards a
    worker's stdout to the driver), once, so the stages' INFO lines are not lost."""
    ours = logging.getLogger("loralens")
    if not ours.handlers and not logging.getLogger().handlers:  # nobody configured logging
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)


def worker_context(spec: Spec):
    """The Context of ``spec`` in this worker process (cached like the local process's)."""
    worker_logging()
    from loralens.study.stages import Context
    from loralens.core.run_dir import RunDir

    key = spec.cache_key()
    if key not in _CONTEXTS:
        _CONTEXTS.clear()  # another run's model and data: not kept
        _CONTEXTS[key] = Context(
            spec.cfg, RunDir(spec.root), progress=False,
            select_tasks=list(spec.tasks) if spec.tasks else None,
            select_methods=list(spec.methods) if spec.methods else None,
            select_seeds=list(spec.seeds) if spec.seeds else None,
            overwrite=spec.overwrite, use_search=spec.use_search)
    ctx = _CONTEXTS[key]
    if ctx.cfg.train.threads:  # as stages.run_stage: the same threads as a local run
        import torch

        torch.set_num_threads(ctx.cfg.train.threads)
    ctx.bar = Ticks()
    return ctx


def run_job(spec: Spec, stage: str, key: str) -> int:
    """A Ray task: job ``key`` of ``stage`` by the stage's own function; returns the jobs
    it reports to the study's bar."""
    ctx = worker_context(spec)
    ctx.executor = OneJob(stage, key)
    try:
        stage_of_queue(stage).run(ctx)
    except JobDone as done:
        return done.ticks
    raise RuntimeError(f"{stage} job {key}: the stage never asked for it")


def run_trial(spec: Spec, task: str, method: str) -> int:
    """A Ray task: one trial of (task, method) while the study's budget allows (none once
    it is spent and no trial runs; a retried task waits for a dead worker's trial to turn
    stale and reruns its configuration); returns the trials run."""
    from loralens.training.search import run_trials

    ctx = worker_context(spec)
    run_trials(ctx.cfg, ctx.run, task, method, ctx.base, progress=False, limit=1,
               on_trial=ctx.tick)
    return ctx.bar.n
