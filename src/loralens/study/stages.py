"""The stage table: each stage of a study exists once, here.

A stage has a name, the config section it reads, the run-directory artifacts it reads
and writes (names of :class:`~loralens.core.run_dir.RunDir` attributes), the command-line
selectors and flags it takes, and one ``run(ctx)`` entry point. ``loralens run`` runs
the table in order; every single-stage subcommand (``loralens sanity``, ``loralens
train``, ...) is generated from the same entry, so a stage behaves the same whichever
way it is started, and its jobs always go through the job queue.

``ctx`` (:class:`Context`) carries the resolved config, the run directory, the base
model (loaded lazily, once), the tasks' prepared data (cached), the selection
(tasks, methods, seeds), progress on/off and the job queue.

Work distribution: a stage's units of work are jobs in the queue (``work.JobQueue``,
on the run directory's SQLite database or on ``search.storage``), so workers on
several machines sharing the run directory split them; a job's output in the run
directory is the final word on completion. The search's units are Optuna trials,
coordinated by the study's own storage. Cheap, idempotent stages (drift, report)
run in every worker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from loralens.core.config import StudyConfig
from loralens.core.run_dir import RunDir
from loralens.models.methods import FAMILIES, is_pair_study
from loralens.tasks.registry import resolve_config_tasks

log = logging.getLogger(__name__)

ALL_FAMILIES = frozenset(FAMILIES)


# --------------------------------------------------------------------------- the context

@dataclass
class Context:
    """What a stage needs: config, run directory, selection, shared lazily-loaded state."""

    cfg: StudyConfig
    run: RunDir
    progress: bool = True
    select_tasks: list[str] | None = None      # None: the config's
    select_methods: list[str] | None = None
    select_seeds: list[int] | None = None
    overwrite: bool = False                    # redo finished work (train, extract, bench)
    use_search: bool = True                    # train with the search's best hyperparameters
    bar: Any = None                            # the study's progress bar (``loralens run``)
    executor: Any = None                       # loralens.study.executors (None: this process)
    _base: Any = field(default=None, repr=False)
    _prepared: dict = field(default_factory=dict, repr=False)
    _queue: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # The tasks the config defines (task files, task_defs), known by name in this
        # process: a worker process builds its Context from a config it did not load.
        resolve_config_tasks(self.cfg)

    @property
    def tasks(self) -> list[str]:
        return list(self.select_tasks or self.cfg.tasks)

    @property
    def methods(self) -> list[str]:
        return list(self.select_methods or self.cfg.methods)

    @property
    def seeds(self) -> list[int]:
        return list(self.select_seeds or self.cfg.seeds)

    def pairs(self) -> list[tuple[str, str]]:
        return [(t, m) for t in self.tasks for m in self.methods]

    def train_keys(self) -> list[tuple[str, str, int]]:
        return [(t, m, s) for t, m in self.pairs() for s in self.seeds]

    @property
    def base(self):
        """The base model (:class:`loralens.models.classifier.Base`), loaded on first use."""
        if self._base is None:
            from loralens.models.classifier import load_base

            self._base = load_base(self.cfg)
        return self._base

    def prepared(self, task: str):
        """A task's tokenized data (:class:`loralens.training.job.Prepared`), once per process."""
        if task not in self._prepared:
            from loralens.training.job import prepare_task

            self._prepared[task] = prepare_task(self.cfg, task, self.base.tokenizer)
            self.run.record_data(task, self._prepared[task].stats())
        return self._prepared[task]

    @property
    def queue(self):
        if self._queue is None:
            from loralens.core.redaction import resolve_storage
            from loralens.core.job_queue import JobQueue

            url = resolve_storage(self.cfg.search.storage) or self.run.sqlite_url("jobs")
            self._queue = JobQueue(url, queue=f"study:{self.run.root.name}",
                                   stale_after=self.cfg.search.grace_period)
        return self._queue

    def tick(self, n: int = 1) -> None:
        if self.bar is not None and n:
            self.bar.update(n)

    def run_queue(self, queue: str, run_one: Callable[[dict], None]) -> list[dict]:
        """Run ``run_one(payload)`` for the units of work of ``queue`` (a name in
        :data:`QUEUES`: a stage's, e.g. ``train``, or ``weights-sweep``) that are not done,
        as the stage table defines them; returns the payloads skipped as done."""
        _, q = QUEUES[queue]
        return self.work(queue, q.jobs(self), run_one, finished=lambda p: q.done(self, p))

    def work(self, stage: str, jobs: dict[str, dict], run_one: Callable[[dict], None],
             finished: Callable[[dict], bool] = lambda p: False) -> list[dict]:
        """Run ``run_one(payload)`` for every job not ``finished``, through the queue;
        returns the payloads skipped as finished.

        Finished jobs (their output is there, and ``overwrite`` is off) are skipped;
        the others are (re)opened in the queue and claimed one at a time, so several
        workers never run the same job. Under data parallelism (``accelerate launch``,
        torchrun) every rank runs every job in the same order instead: the ranks of one
        job must meet in the same collective operations.
        """
        from loralens.training.loop import dist_info

        todo = {k: p for k, p in jobs.items() if self.overwrite or not finished(p)}
        skipped = [p for k, p in jobs.items() if k not in todo]
        self.tick(len(skipped))
        if dist_info()[1] > 1:
            for payload in todo.values():
                run_one(payload)
            return skipped

        def claimed(key, payload):  # another worker may have finished it meanwhile
            if self.overwrite or not finished(payload):
                run_one(payload)

        if self.executor is not None:  # Ray: each job a task running ``claimed`` below
            return self.executor.work(self, stage, todo, skipped, claimed,
                                      finished=None if self.overwrite else finished)
        # a done job is reopened only if its output is still missing once its row reads done
        # (another worker may have finished it since the test above); overwrite redoes all
        self.queue.add(stage, todo, reopen=True, finished=None if self.overwrite else finished)
        self.queue.work(stage, claimed, keys=list(jobs))  # this command's selection only
        return skipped


# --------------------------------------------------------------------------- stages

def run_sanity(ctx: Context) -> bool:
    """Every task and method overfits a handful of rows (the pipeline is wired right)."""
    from loralens.training.sanity import collect_sanity, sanity_job

    def one(p):
        sanity_job(ctx.cfg, ctx.run, p["task"], p["method"], ctx.base, ctx.prepared(p["task"]),
                   progress=ctx.progress)
        ctx.tick()

    ctx.run_queue("sanity", one)
    res = collect_sanity(ctx.run, ctx.tasks, ctx.methods)
    failed = [f"{r['task']}/{r['method']}" for r in res if not r["passed"]]
    log.info(f"sanity: {len(res) - len(failed)}/{len(res)} passed"
             + (f" (failed: {', '.join(failed)}; a study continues, the report flags it)"
                if failed else ""))
    return not failed


def run_search(ctx: Context) -> bool:
    """One persistent Optuna TPE study per task and method."""
    from loralens.training.search import run_search as search_pair

    if not ctx.cfg.search.enabled:
        log.info("search disabled (search.enabled=false): training uses the config's values")
        return True
    if ctx.executor is not None:  # Ray: every trial a task; each study's budget is then
        ctx.executor.search(ctx)  # spent, and the loop below writes its best trial
    for t, m in ctx.pairs():
        res = search_pair(ctx.cfg, ctx.run, t, m, ctx.base, progress=ctx.progress,
                          on_trial=ctx.tick)
        log.info(f"search {t}/{m}: best {res['metric']} {res['best']['value']:.4f} "
                 f"(trial {res['best']['number']}) with {res['best']['params']}; "
                 f"trials {res['counts']}")
    return True


def search_overrides(ctx: Context, task: str, method: str) -> dict | None:
    """The search's best hyperparameters for (task, method), when it ran and is wanted."""
    from loralens.training.search import best_overrides

    if not (ctx.use_search and ctx.cfg.search.enabled):
        return None
    overrides = best_overrides(ctx.run, task, method)
    where = ctx.run.search_path(task, method)
    log.info(f"train {task}/{method}: " + (
        f"hyperparameters of the search's best trial ({where}): {overrides}" if overrides
        else f"no search result ({where} missing): the config's hyperparameters"))
    return overrides


def run_train(ctx: Context) -> bool:
    """Train and evaluate every (task, method, seed), each with its pair's best settings."""
    from loralens.training.loop import init_distributed
    from loralens.training.job import summary_line, train_job

    init_distributed()
    keys = ctx.train_keys()

    def one(p):
        t, m, s = p["task"], p["method"], p["seed"]
        metrics = train_job(ctx.cfg, ctx.run, t, m, s, prepared=ctx.prepared(t), base=ctx.base,
                            overrides=search_overrides(ctx, t, m), overwrite=ctx.overwrite,
                            progress=ctx.progress)
        if "rank" not in metrics:  # data parallel: rank 0 reports
            log.info(summary_line(metrics))
        ctx.tick()

    skipped = ctx.run_queue("train", one)
    for p in skipped:
        done = train_job(ctx.cfg, ctx.run, p["task"], p["method"], p["seed"])  # reads metrics
        log.info("skipped: " + summary_line(done))
    missing = [k for k in keys if not ctx.run.job_done(*k)]
    if missing:
        raise RuntimeError(f"training jobs not finished: {missing}")
    return True


def run_extract(ctx: Context) -> bool:
    """Pooled hidden states of the base model and every trained model, per task."""
    from loralens.analysis.extract import run_extract as extract, summary_line

    ec = ctx.cfg.extract

    def one(p):
        for r in extract(ctx.cfg, ctx.run, [p["task"]], n_examples=ec.examples, seed=ec.seed,
                         batch_size=ec.batch_size, overwrite=ctx.overwrite, base=ctx.base,
                         progress=ctx.progress):
            log.info(summary_line(r))

    for p in ctx.run_queue("extract", one):
        log.info(f"extract {p['task']}: up to date ({ctx.run.extract_manifest(p['task'])})")
    return True


def run_drift(ctx: Context) -> bool:
    """Layer-wise similarity to the base model, Tables 3-4 (seconds; every worker)."""
    from loralens.analysis.drift.stage import run_drift as drift, summary_lines

    log.info("\n".join(summary_lines(drift(ctx.cfg, ctx.run, ctx.tasks,
                                             progress=ctx.progress))))
    if not is_pair_study(ctx.cfg.methods):  # more methods: each vs the reference
        from loralens.analysis.drift.stage import method_drift

        res = method_drift(ctx.cfg, ctx.run, ctx.tasks)
        log.info(f"drift of {len(ctx.cfg.methods)} methods vs {res['reference_method']}: "
                 f"{res['files'][1]}")
    return True


def run_weights(ctx: Context) -> bool:
    """Intruder dimensions, the weight change's spectrum and forgetting (seconds per model)."""
    from loralens.analysis.weights.stage import run_weights as weights

    return weights(ctx)


def run_bench(ctx: Context) -> bool:
    """Serving cost: separate vs merged adapters vs full models, several adapters at once.

    One job: timings from several machines at once would not be comparable, and the
    multi-adapter part loads adapters of every task on one base.
    """
    from loralens.serving.bench.stage import run_bench as bench, summary_lines
    from loralens.core.files import read_json

    bc = ctx.cfg.bench
    result: dict = {}

    def one(p):
        result.update(bench(ctx.cfg, ctx.run, tasks=ctx.tasks, batch_sizes=bc.batch_sizes,
                            warmup=bc.warmup, n_requests=bc.requests,
                            mixed_batch_size=bc.mixed_batch_size, progress=ctx.progress,
                            base=ctx.base, identity_examples=bc.identity_examples))
        log.info("\n".join(summary_lines(result)))
        log.info(f"results in {ctx.run.bench_dir}")

    skipped = ctx.run_queue("bench", one)
    if not result and ctx.run.serving_path.is_file():
        result = read_json(ctx.run.serving_path)
        if skipped:  # else another worker (a Ray task) measured them just now
            log.info(f"bench: results exist in {ctx.run.bench_dir} "
                     "(--overwrite to measure again)")
    return all(result.get("checks", {}).values())


def run_report(ctx: Context) -> bool:
    """Markdown and one self-contained HTML page from the run directory's files."""
    from loralens.report import build_report

    log.info(f"report: {build_report(ctx.run)}")
    from loralens.study.tracking import log_study, logged_where

    if log_study(ctx.cfg, ctx.run) is not None:  # --report-to: the study's run
        log.info(f"report: headline numbers and report files tracked "
                 f"({logged_where(ctx.cfg, ctx.run)})")
    return True


@dataclass(frozen=True)
class Flag:
    """A stage's own command-line option: sets a config key or a :class:`Context` field."""

    name: str                  # "--trials"
    help: str
    config_key: str | None = None       # e.g. "search.trials"
    context_field: str | None = None    # e.g. "overwrite"
    type: type | None = None            # None: a switch (store_true)
    value: Any = True                   # what a switch sets the context field to


@dataclass(frozen=True)
class Queue:
    """One queue of a stage's units of work: its jobs (key -> payload) for a context and
    whether a payload's output is already in the run directory. Its name is derived from
    the stage (:meth:`Stage.queue_name`) and looked up, never parsed (:data:`QUEUES`)."""

    jobs: Callable[[Context], dict[str, dict]]
    done: Callable[[Context, dict], bool]
    suffix: str | None = None   # None: the stage's own queue; "sweep": "<stage>-sweep"


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    section: str | None            # the config section the stage reads (besides model/data)
    reads: tuple[str, ...]         # RunDir attributes it reads
    writes: tuple[str, ...]        # RunDir attributes it writes
    run: Callable[[Context], bool]  # True: everything checked out
    selects: tuple[str, ...] = ()  # "task", "method", "seed": command-line selectors
    flags: tuple[Flag, ...] = ()
    units: Callable[[Context], int] = lambda ctx: 0  # jobs shown on the study's bar
    aliases: tuple[str, ...] = ()
    read_only: bool = False        # never writes config/env (may read any run directory)
    queues: tuple[Queue, ...] = ()  # its units of work, through the job queue
    work: Callable | None = None   # the dry run's count: (cfg, tokenizer, prepared, model shapes) -> StageWork
    cheap: bool = False            # computes on arrays and files only: a plan of such stages alone loads no model
    families: frozenset = ALL_FAMILIES  # method families it handles (others: a ConfigError)

    def queue_name(self, queue: Queue) -> str:
        return self.name if queue.suffix is None else f"{self.name}-{queue.suffix}"


OVERWRITE = Flag("--overwrite", "redo work that already finished (its results are replaced)",
                 context_field="overwrite")


def _weights_jobs(ctx: Context) -> dict[str, dict]:
    return {f"weights/{t}/{m}/seed{s}": {"task": t, "method": m, "seed": s}
            for t, m, s in ctx.run.finished_jobs() if t in ctx.tasks}


def _weights_done(ctx: Context, p: dict) -> bool:
    from loralens.analysis.weights.analyzer import is_done

    return is_done(ctx.run, ctx.cfg, p["task"], p["method"], p["seed"])


def _sweep_jobs(ctx: Context) -> dict[str, dict]:
    from loralens.analysis.weights.intruder_sweep import sweep_keys

    return {f"sweep/{t}/seed{s}": {"task": t, "seed": s} for t, s in sweep_keys(ctx)}


def _sweep_done(ctx: Context, p: dict) -> bool:
    from loralens.analysis.weights.intruder_sweep import is_done

    return is_done(ctx.run, ctx.cfg, p["task"], p["seed"])


def _extract_done(ctx: Context, p: dict) -> bool:
    from loralens.analysis.extract import is_extracted

    return is_extracted(ctx.run, p["task"])


def _count(name: str) -> Callable:
    """The dry run's count of a stage (:mod:`loralens.study.plan.work`), loaded on use (it
    needs the data layer; the stage table is read by every command, --help included)."""

    def count(cfg, tokenizer, prepared, model=None):
        from loralens.study.plan import work

        return getattr(work, name)(cfg, tokenizer, prepared, model)

    return count


SANITY_JOBS = Queue(lambda c: {f"{t}/{m}": {"task": t, "method": m} for t, m in c.pairs()},
                    lambda c, p: c.run.sanity_path(p["task"], p["method"]).is_file())
TRAIN_JOBS = Queue(lambda c: {f"{t}/{m}/seed{s}": {"task": t, "method": m, "seed": s}
                              for t, m, s in c.train_keys()},
                   lambda c, p: c.run.job_done(p["task"], p["method"], p["seed"]))
EXTRACT_JOBS = Queue(lambda c: {t: {"task": t} for t in c.tasks}, _extract_done)
WEIGHTS_JOBS = Queue(_weights_jobs, _weights_done)
SWEEP_JOBS = Queue(_sweep_jobs, _sweep_done, suffix="sweep")
BENCH_JOBS = Queue(lambda c: {"all": {}}, lambda c, p: c.run.serving_path.is_file())

STAGES: tuple[Stage, ...] = (
    Stage("sanity", "check each task and method overfits a few training rows", "sanity",
          reads=("config_path",), writes=("sanity_path", "sanity_summary_path", "data_path"),
          run=run_sanity, selects=("task", "method"), units=lambda c: len(c.pairs()),
          queues=(SANITY_JOBS,), work=_count("sanity")),
    Stage("search", "Optuna TPE search, one persistent study per task and method", "search",
          reads=("config_path",), writes=("search_path", "data_path"),
          run=run_search, selects=("task", "method"), aliases=("hpo",),
          flags=(Flag("--trials", "trials per task and method (search.trials)",
                      config_key="search.trials", type=int),),
          units=lambda c: len(c.pairs()) * c.cfg.search.trials if c.cfg.search.enabled else 0,
          work=_count("search")),
    Stage("train", "train and evaluate (task, method, seed) jobs", "train",
          reads=("config_path", "search_path"),
          writes=("weights_dir", "val_logits_path", "metrics_path", "data_path"),
          run=run_train, selects=("task", "method", "seed"),
          flags=(OVERWRITE, Flag("--no-search", "train with the config's hyperparameters even "
                                 "where the search ran", context_field="use_search",
                                 value=False)),
          units=lambda c: len(c.train_keys()), queues=(TRAIN_JOBS,), work=_count("train")),
    Stage("extract", "pooled hidden states of the base and every trained model", "extract",
          reads=("metrics_path", "weights_dir"), writes=("extract_dir", "extract_manifest"),
          run=run_extract, selects=("task",), flags=(OVERWRITE,), queues=(EXTRACT_JOBS,),
          work=_count("extract")),
    Stage("drift", "layer-wise similarity to the base model and Tables 3-4", "drift",
          reads=("extract_manifest", "metrics_path"), writes=("drift_dir", "drift_path"),
          run=run_drift, selects=("task",), work=_count("drift"), cheap=True),
    Stage("weights", "intruder dimensions, weight-change spectra and forgetting per model",
          "weights", reads=("weights_dir", "metrics_path"),
          writes=("weightspace_dir", "weightspace_model_path", "weightspace_path",
                  "weightspace_sweep_path"),
          run=run_weights, selects=("task",), units=lambda c: len(c.train_keys()),
          queues=(WEIGHTS_JOBS, SWEEP_JOBS), work=_count("weights")),
    Stage("bench", "serving cost: separate vs merged adapters vs full models", "bench",
          reads=("weights_dir", "metrics_path"), writes=("bench_dir", "serving_path"),
          run=run_bench, selects=("task",), flags=(OVERWRITE,), queues=(BENCH_JOBS,),
          work=_count("bench")),
    Stage("report", "Markdown + self-contained HTML report of a run directory", None,
          reads=("config_path", "env_path", "data_path", "timings_path", "plan_path",
                 "sanity_summary_path",
                 "search_path", "metrics_path", "extract_manifest", "drift_dir",
                 "serving_path", "loadtest_path"),
          writes=("report_dir",), run=run_report, read_only=True, work=_count("report"), cheap=True),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
# queue name -> (stage, queue): how an executor finds the stage of a queued job
QUEUES: dict[str, tuple[Stage, Queue]] = {
    st.queue_name(q): (st, q) for st in STAGES for q in st.queues}


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if name == s.name or name in s.aliases:
            return s
    raise KeyError(name)


def check_methods(stage: Stage, ctx: Context) -> None:
    """Refuse (``ConfigError`` naming method and stage) a method the stage cannot handle:
    one whose family is not in the stage's ``families``."""
    from loralens.core.errors import ConfigError
    from loralens.models.methods import get_method

    if stage.name == "search" and not ctx.cfg.search.enabled:
        return
    for name in ctx.methods:
        m = get_method(name, ctx.cfg)
        if m.family not in stage.families:
            raise ConfigError(f"method {name!r} (family {m.family}) is not supported by the "
                              f"{stage.name} stage yet; it supports families "
                              f"{sorted(stage.families)}", "methods")


def run_stage(stage: Stage, ctx: Context, record: bool = True) -> bool:
    """Run one stage and (``record``) add its wall time to the run directory's timings."""
    if ctx.cfg.train.threads:  # every stage computes with the same number of threads
        import torch

        torch.set_num_threads(ctx.cfg.train.threads)
    check_methods(stage, ctx)
    t0 = time.perf_counter()
    ok = stage.run(ctx)
    if record:
        ctx.run.add_timing(stage.name, time.perf_counter() - t0)
    return ok


def run_study(ctx: Context, names: tuple[str, ...] = STAGE_NAMES) -> bool:
    """``loralens run``: the stages in table order, resumably; a study-level progress bar.

    A failed sanity check or serving check does not stop the study (the report flags
    it); the return value says whether every stage checked out.
    """
    from tqdm.auto import tqdm

    stages = [get_stage(n) for n in names]
    for stage in stages:  # before any work: a stage that would refuse a method refuses now
        check_methods(stage, ctx)
    t0 = time.perf_counter()
    ok = True
    with tqdm(total=sum(s.units(ctx) for s in stages), desc="study", unit="job",
              disable=not ctx.progress, position=1, leave=True) as ctx.bar:
        for i, stage in enumerate(stages):
            log.info(f"== stage {i + 1}/{len(stages)}: {stage.name}")
            ok = run_stage(stage, ctx) and ok
    ctx.bar = None
    log.info(f"study finished in {time.perf_counter() - t0:.0f} s; "
             f"run directory {ctx.run.root}")
    return ok
