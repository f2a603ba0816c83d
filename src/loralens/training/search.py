"""Hyperparameter search: one persistent Optuna TPE study per task and method.

Unlike the study's published code (10 trials, 10 random start-up trials, a fresh
in-memory study per trial, a sampler seed from Python's salted ``hash()``), every
trial of a (task, method) reports to ONE study in a persistent storage, TPE gets
fewer start-up trials than trials so it really models, each trial's sampler seed is a
stable hash of task, method and the trial's position (no worker or resumed process
draws a configuration again; a killed trial's retry replays the killed one's), trials train with ``search.seed`` (never a training
seed), and trials are scored on the selection rows (``data.selection``), never on
the split the report's Table 3 reports under the default protocol.

Storage is SQLite in the run directory by default, or any SQLAlchemy URL
(PostgreSQL) so that workers on several machines run trials of the same study at
once. Heartbeats mark a killed worker's trial as failed and its configuration is
retried. Workers start a trial only while fewer than ``search.trials`` trials are
complete, pruned or running, deciding under a lock (a file lock for SQLite, a
PostgreSQL advisory lock otherwise), so N trials are completed exactly.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import logging
import time

import warnings

import numpy as np
import optuna
from optuna.storages._heartbeat import get_heartbeat_thread

from loralens.core.config import StudyConfig
from loralens.core.errors import ConfigError
from loralens.models.classifier import Base
from loralens.models.methods import (
    ADAPTER_KIND, FULL_KIND, SEARCH_LORA_KEYS, get_method, inherited_lora_keys, is_study_lora,
    space_overrides,
)
from loralens.core.redaction import resolve_storage
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json, read_json
from loralens.tasks.registry import get_task
from loralens.training.loop import evaluate, steps_per_epoch
from loralens.training.job import prepare_task, train_model, with_overrides
from loralens.core.job_queue import dead_local, engine_kwargs, study_lock, worker_id

log = logging.getLogger(__name__)

# The study's spaces per optimizer kind (Method.optimizer_kind), for the dimensions the
# config does not set: the learning-rate range, epoch and batch-size choices come from
# ``search.*`` (see :func:`space`), the LoRA rank and target modules from ``lora.*``
# (never searched).
SPACES: dict[str, dict[str, tuple]] = {
    FULL_KIND: {
        "warmup_ratio": ("uniform", 0.0, 0.2),
        "weight_decay": ("uniform", 0.0, 0.01),
    },
    ADAPTER_KIND: {
        "warmup_ratio": ("uniform", 0.0, 0.3),
        "weight_decay": ("uniform", 0.0, 0.1),
    },
}
LORA_SPACE: dict[str, tuple] = {  # LoRA's own hyperparameters, suggested after the rest
    "alpha": ("categorical", [8, 16, 32, 64]),
    "dropout": ("uniform", 0.0, 0.3),
}
LORA_KEYS = set(SEARCH_LORA_KEYS)  # trial values that go to the lora section
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
           optuna.trial.TrialState.RUNNING)


def space(method: str, cfg: StudyConfig) -> dict[str, tuple]:
    """The resolved search space of ``method``: ``{name: (kind, *args)}``.

    Its family's default (:mod:`loralens.models.methods`): full fine-tuning searches
    ``search.lr_full``/``batch_full``; head-only and adapter methods ``lr_lora``/
    ``batch_lora``; LoRA-type methods also LoRA's alpha and dropout where they take
    them from the ``lora`` section. Then the method's own ``search`` entries
    (``method_defs.<name>.search``) replace or add dimensions. ``search.params``, when set,
    keeps only the dimensions it names (the others stay at the config's values, which the
    trials and the trained models then share); a name in no method's space is a
    ``ConfigError``.
    """
    whole = _whole_space(method, cfg)
    params = cfg.search.params
    if not params:
        return whole
    known = set(whole).union(*(_whole_space(m, cfg) for m in cfg.methods))
    unknown = [p for p in params if p not in known]
    if unknown:
        raise ConfigError(f"search.params: {', '.join(map(repr, unknown))} is not a dimension "
                          f"of the search space of {', '.join(cfg.methods)}; known: "
                          f"{', '.join(sorted(known))}", "search.params")
    return {k: v for k, v in whole.items() if k in params}


def _whole_space(method: str, cfg: StudyConfig) -> dict[str, tuple]:
    """Every dimension of ``method``'s space (:func:`space` before ``search.params``)."""
    sc = cfg.search
    meth = get_method(method, cfg)
    full = meth.trains_all
    lo, hi = sc.lr_full if full else sc.lr_lora
    lora_keys = inherited_lora_keys(method, cfg)
    return {"lr": ("loguniform", float(lo), float(hi)),
            "batch_size": ("categorical", list(sc.batch_full if full else sc.batch_lora)),
            **SPACES[meth.optimizer_kind],
            "epochs": ("categorical", list(sc.epochs)),
            **{k: v for k, v in LORA_SPACE.items() if k in lora_keys},
            **space_overrides(method, cfg)}


POSITION_ATTR = "loralens:sampler_position"  # a trial's system attribute (sampler_position)
WORKER_ATTR = "loralens:worker"  # host:pid of the process that asked the trial


def sampler_seed(task: str, method: str, position: int = 0, base: int = 0,
                 param: str | None = None) -> int:
    """The TPE seed of the trial asked when the study holds ``position`` trials, and of
    its parameter ``param`` when given.

    Stable across processes and machines (Python's hash() is salted per process). One
    fixed seed per study would make every worker, and every resumed process, draw the
    same first configurations again; a seed per position never repeats a draw while a
    rerun from scratch repeats the whole search. A seed per parameter makes each value a
    function of the study's history alone, not of which parameters this process drew
    first: the retry of a trial killed between two suggestions keeps the values drawn
    and draws the rest as the uninterrupted trial did.
    """
    key = f"{task}/{method}/{base}/{position}" + (f"/{param}" if param else "")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")


def make_sampler(cfg: StudyConfig, task: str, method: str, position: int,
                 param: str | None = None) -> optuna.samplers.TPESampler:
    sc = cfg.search
    return optuna.samplers.TPESampler(
        n_startup_trials=min(sc.startup_trials, sc.trials),
        seed=sampler_seed(task, method, position, sc.sampler_seed, param))


def study_name(task: str, method: str) -> str:
    return f"loralens-{task}-{method}"


def storage_url(cfg: StudyConfig, run: RunDir) -> str:
    """search.storage (else $LORALENS_STORAGE; a redacted one restored from it), else the
    run directory's SQLite file."""
    return resolve_storage(cfg.search.storage) or run.sqlite_url("search")


def open_study(cfg: StudyConfig, run: RunDir, task: str, method: str) -> optuna.Study:
    # Workers starting together would race to create Optuna's tables and the study
    # (PostgreSQL: duplicate key on pg_type); creation is serialized under a lock.
    with study_lock(storage_url(cfg, run), "optuna-init", run.root):
        return _open_study(cfg, run, task, method)


def _open_study(cfg: StudyConfig, run: RunDir, task: str, method: str) -> optuna.Study:
    sc = cfg.search
    storage = optuna.storages.RDBStorage(
        storage_url(cfg, run), heartbeat_interval=sc.heartbeat_interval,
        grace_period=sc.grace_period,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=sc.max_retry),
        engine_kwargs=engine_kwargs(storage_url(cfg, run)))
    sampler = make_sampler(cfg, task, method, 0)  # replaced before each ask (run_search)
    return optuna.create_study(study_name=study_name(task, method), storage=storage,
                               sampler=sampler, pruner=make_pruner(sc), direction="maximize",
                               load_if_exists=True)


# --------------------------------------------------------------------------- pruning
#
# Trials compare at equal fractions of their own training. The k-th evaluation is not the
# same fraction in every trial: a 4-epoch trial's 2nd evaluation (of 4 per epoch) is 1/8 of
# its training, a 2-epoch trial's is 1/4, and its cosine learning rate is at another point
# of its decay; batch sizes change the evaluations per epoch too (eval_every is a whole
# number of steps: 3 or 4 per epoch). Keyed by evaluation index, the median pruner compared
# a long schedule early in its training with short ones further on, and pruned it: the
# search favoured short schedules. So a trial reports each evaluation at the per-mille of
# its own optimizer steps done, and the pruner reads every completed trial's curve at that
# same fraction (linear between its two evaluations around it, never extrapolated).

REPORT_SCALE = 1000  # intermediate values are reported at per-mille of the trial's training
REPORT_ATTR = "pruning_step"  # a trial's user attribute: what its reported steps count
REPORT_UNIT = "per-mille of the trial's optimizer steps"


def total_train_steps(n_rows: int, tc) -> int:
    """Optimizer steps of a whole training schedule of ``n_rows`` rows under ``tc`` (the
    train config): the total of the loop's cosine schedule."""
    total = steps_per_epoch(n_rows, tc) * tc.epochs
    return min(total, tc.max_steps) if tc.max_steps else total


def report_step(step: int, total: int) -> int:
    """The pruner's step of an evaluation after ``step`` of ``total`` optimizer steps:
    the fraction of training done, in per mille (0..1000)."""
    return min(REPORT_SCALE, round(REPORT_SCALE * step / max(total, 1)))


def value_at(curve: dict[int, float], at: int) -> float | None:
    """A trial's intermediate value at per-mille ``at``: its report there, else the linear
    interpolation between its reports around it; None outside its reports (before its
    first evaluation, after its last, e.g. once it stopped early)."""
    keys = sorted(curve)
    if not keys or at < keys[0] or at > keys[-1]:
        return None
    j = bisect.bisect_left(keys, at)
    if keys[j] == at:
        return float(curve[at])
    lo, hi = keys[j - 1], keys[j]
    w = (at - lo) / (hi - lo)
    return float((1 - w) * curve[lo] + w * curve[hi])


class FractionMedianPruner(optuna.pruners.BasePruner):
    """Optuna's median rule at equal fractions of training: once ``n_startup_trials`` trials
    reporting per mille (:data:`REPORT_ATTR`) are complete, a running trial is pruned when its
    best value so far is worse than the median of theirs at its latest fraction
    (:func:`value_at`); a trial no completed curve covers yet is not pruned."""

    def __init__(self, n_startup_trials: int = 1):
        self.n_startup_trials = max(int(n_startup_trials), 1)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        at = trial.last_step
        if at is None:
            return False
        done = [t for t in study.get_trials(deepcopy=False,
                                            states=(optuna.trial.TrialState.COMPLETE,))
                if t.user_attrs.get(REPORT_ATTR) == REPORT_UNIT]
        if len(done) < self.n_startup_trials:
            return False
        others = [v for t in done if (v := value_at(t.intermediate_values, at)) is not None]
        if not others:
            return False
        mine = np.asarray(list(trial.intermediate_values.values()), dtype=float)
        if np.isnan(mine).all():
            return True  # as Optuna's median pruner: a trial reporting only NaN goes
        median = float(np.nanmedian(others))
        if study.direction == optuna.study.StudyDirection.MAXIMIZE:
            return float(np.nanmax(mine)) < median
        return float(np.nanmin(mine)) > median


def make_pruner(sc) -> optuna.pruners.BasePruner:
    """The search's pruner (``sc``: the search config): median pruning at equal fractions of
    training after ``search.startup_trials`` completed trials, or none (``search.prune``)."""
    if not sc.prune:
        return optuna.pruners.NopPruner()
    return FractionMedianPruner(n_startup_trials=sc.startup_trials)


def suggest(trial: optuna.Trial, method: str, cfg: StudyConfig, sampler_for=None) -> dict:
    """Nested overrides of the ``train`` and ``lora`` sections for one trial;
    ``sampler_for(name)``, when given, is the sampler that draws parameter ``name``."""
    train: dict = {}
    lora: dict = {}
    for name, (kind, *args) in space(method, cfg).items():
        if sampler_for is not None:
            trial.study.sampler = sampler_for(name)
        if kind == "loguniform":
            v = trial.suggest_float(name, args[0], args[1], log=True)
        elif kind == "uniform":
            v = trial.suggest_float(name, args[0], args[1])
        else:
            v = trial.suggest_categorical(name, args[0])
        (lora if name in LORA_KEYS else train)[name] = v
    return params_to_overrides(train | lora, method)


def params_to_overrides(params: dict, method: str) -> dict:
    """Trial parameters as nested config overrides; the rank stays the config's ``lora.r``."""
    out: dict = {"train": {k: v for k, v in params.items() if k not in LORA_KEYS}}
    lora = {k: v for k, v in params.items() if k in LORA_KEYS}
    if lora or is_study_lora(method):  # LoRA-type methods read alpha/dropout from lora.*
        out["lora"] = lora
    return out


def beat_unbeaten(study: optuna.Study) -> list[int]:
    """Give a first heartbeat to RUNNING trials that never had one; call under the study lock.

    A worker asks for a trial and records its first heartbeat under the study lock,
    so a RUNNING trial seen without a heartbeat under that lock belongs to a worker
    killed between the two (Optuna never fails a trial without a heartbeat, and the
    run would wait for it forever). Beating it once makes it stale after the grace
    period, and the normal path fails and retries it.
    """
    import sqlalchemy

    storage = study._storage
    rdb = getattr(storage, "_backend", storage)  # Optuna wraps RDBStorage in a cache
    with rdb.engine.connect() as c:
        ids = [r[0] for r in c.execute(sqlalchemy.text(
            "SELECT t.trial_id FROM trials t LEFT JOIN trial_heartbeats h "
            "ON h.trial_id = t.trial_id WHERE t.study_id = :s AND t.state = 'RUNNING' "
            "AND h.trial_id IS NULL"), {"s": study._study_id})]
    for trial_id in ids:
        storage.record_heartbeat(trial_id)
    return ids


def fail_dead_local(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials asked by a process of this host that no longer runs, and
    retry them (Optuna's stale-trial callback); call under the study lock.

    The job table's ``release_dead_local`` for trials: a killed worker's trial is failed at
    once instead of after the heartbeat's grace period, so a command resumed on the same
    machine retries it before it asks a new trial, and the study ends as the uninterrupted
    one would (TPE draws from the trials finished before each one). Trials of other hosts,
    and of processes that run, are left to their heartbeats.
    """
    storage, failed = study._storage, []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not dead_local(t.system_attrs.get(WORKER_ATTR)):
            continue
        try:
            if storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL):
                failed.append(t._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:  # another process failed it
            pass
    retry = storage.get_heartbeat_stale_trial_callback()
    for trial_id in failed:
        retry and retry(study, copy.deepcopy(storage.get_trial(trial_id)))
    return failed


def _ask_under_lock(cfg: StudyConfig, run: RunDir, task: str, method: str,
                    study: optuna.Study) -> tuple[optuna.Trial | None, list]:
    """Under the study lock, fail stale trials and ask for a trial while the budget allows.

    Returns the new trial, with its first heartbeat recorded (None once ``search.trials``
    trials are complete, pruned or running), and those counted trials as seen under the lock.
    """
    with study_lock(storage_url(cfg, run), study_name(task, method), run.root):
        # A killed worker's trial stops beating: fail it (its configuration is
        # re-enqueued by RetryHeartbeatStaleTrialCallback and taken by the next ask()).
        fail_dead_local(study)
        beat_unbeaten(study)
        optuna.storages.fail_stale_trials(study)
        all_trials = study.get_trials(deepcopy=False)
        counted_trials = [t for t in all_trials if t.state in COUNTED]
        if len(counted_trials) >= cfg.search.trials:
            return None, counted_trials
        # Trials are only created under this lock, so the study's size orders them.
        position = sampler_position(all_trials)
        study.sampler = make_sampler(cfg, task, method, position)
        trial = study.ask()
        study._storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, worker_id())
        study._storage.set_trial_system_attr(trial._trial_id, POSITION_ATTR, position)
        # Beat once before anyone can see the trial RUNNING: Optuna only fails
        # trials that have a heartbeat, so a worker killed before its heartbeat
        # thread's first beat would leave a RUNNING trial nobody ever fails.
        study._storage.record_heartbeat(trial._trial_id)
    return trial, counted_trials


def sampler_position(trials: list) -> int:
    """The sampler position of the trial ``ask()`` gives next (:func:`sampler_seed`).

    A new trial takes the next free position: one per trial that holds one (neither
    FAILed nor WAITING). A killed worker's trial is FAILed and retried by a WAITING copy,
    which ``ask()`` takes first: the retry takes the killed trial's position, so it draws
    the killed trial's configuration even when the kill landed before the trial drew it,
    and the study ends as the uninterrupted one would.
    """
    holds = lambda t: t.state not in (optuna.trial.TrialState.FAIL,  # noqa: E731
                                      optuna.trial.TrialState.WAITING)
    by_number = {t.number: t for t in trials}
    waiting = sorted((t for t in trials if t.state == optuna.trial.TrialState.WAITING),
                     key=lambda t: t.number)
    if waiting:  # ask() takes the oldest waiting trial
        failed = by_number.get(waiting[0].system_attrs.get("failed_trial"))
        if failed is not None:  # recorded when it was asked; else as if asked in order
            return int(failed.system_attrs.get(POSITION_ATTR, sum(
                holds(t) for t in trials if t.number < failed.number)))
    return sum(holds(t) for t in trials)


def _prepare_search_task(cfg: StudyConfig, train_cfg: StudyConfig, task: str, tokenizer):
    """The task as trials train on it, and the encoded selection rows they are scored on.

    Trials are scored on (and stop early and prune on) the selection rows: a slice held
    out of the training split unless data.selection is validation.
    """
    prepared = prepare_task(train_cfg, task, tokenizer)
    from loralens.training import batches as B

    eval_enc = B.encode_split(tokenizer, prepared.selection_rows(
        cfg.search.eval_size, cfg.data.subset_seed), cfg.data.max_length)
    prepared.early_stop = eval_enc
    return prepared, eval_enc


def _pruning_reporter(trial: optuna.Trial, metric: str, total_steps: int, tracker=None):
    """``on_eval`` callback of a trial of ``total_steps`` optimizer steps: report each
    evaluation (to the experiment tracker too, if any) at the fraction of the trial's
    training done (:func:`report_step`: trials compare like with like whatever their
    epochs and batch size), prune when the pruner says so."""
    trial.set_user_attr(REPORT_ATTR, REPORT_UNIT)
    trial.set_user_attr("total_steps", int(total_steps))

    reported: set[int] = set()

    def on_eval(entry):
        tracker and tracker.on_eval(entry)
        at = report_step(entry["step"], total_steps)
        if at in reported:  # evaluations under 0.1% of training apart: the first one counts
            return
        reported.add(at)
        trial.report(entry[f"val_{metric}"], at)
        if trial.should_prune():
            raise optuna.TrialPruned()

    return on_eval


def _run_trial(cfg: StudyConfig, train_cfg: StudyConfig, study: optuna.Study,
               trial: optuna.Trial, task: str, method: str, base: Base, prepared, eval_enc,
               progress: bool, run_root=None) -> None:
    """Suggest, train and score one trial with a heartbeat running; tell the study its end."""
    from loralens.training.tracking import open_trial

    sc = cfg.search
    position = study._storage.get_trial_system_attrs(trial._trial_id).get(POSITION_ATTR)
    overrides = suggest(trial, method, cfg, None if position is None else (
        lambda name: make_sampler(cfg, task, method, position, name)))
    tracker = open_trial(cfg, run_root, task, method, trial.number) if run_root else None
    trial.set_user_attr("train_rows", len(prepared.train))
    trial.set_user_attr("eval_rows", len(eval_enc))
    trial.set_user_attr("eval_split", prepared.selection_info["split"])
    trial.set_user_attr("seed", sc.seed)
    metric = prepared.task.metric
    beat = get_heartbeat_thread(trial._trial_id, study._storage)
    beat.start()  # ask/tell gets no heartbeat from Optuna itself (only optimize does)
    try:
        trial_cfg = with_overrides(train_cfg, overrides)
        total = total_train_steps(len(prepared.train), trial_cfg.train)
        model, fitres = train_model(trial_cfg, prepared, method, sc.seed, base, progress,
                                    desc=f"search {task}/{method} #{trial.number}",
                                    on_eval=_pruning_reporter(trial, metric, total, tracker))
        val = evaluate(model, eval_enc, prepared.pad_id, cfg.train.eval_batch_size)
        value = val[metric]
        trial.set_user_attr("accuracy", val["accuracy"])
        trial.set_user_attr("f1", val["f1"])
        trial.set_user_attr("steps", fitres.steps)
        study.tell(trial, value)
        log.info(f"search {task}/{method} trial {trial.number}: {metric} {value:.4f} "
                 f"{trial.params}")
        if tracker:
            tracker.params({"params": trial.params, "metric": metric, "seed": sc.seed})
            tracker.scalars(fitres.steps, {"search/objective": value,
                                           **{f"search/{k}": val[k] for k in ("accuracy", "f1")}})
    except optuna.TrialPruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        log.info(f"search {task}/{method} trial {trial.number}: pruned")
        tracker and tracker.params({"params": trial.params, "metric": metric, "pruned": True})
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        tracker and tracker.close(ok=False)
        tracker = None
        raise
    finally:
        beat.join()
        tracker and tracker.close()


def run_search(cfg: StudyConfig, run: RunDir, task: str, method: str, base: Base,
               progress: bool = True, on_trial=None) -> dict:
    """Run trials of (task, method) until the study has ``search.trials`` of them."""
    study = run_trials(cfg, run, task, method, base, progress, on_trial)
    return write_best(cfg, run, task, method, study)


def trial_config(cfg: StudyConfig) -> StudyConfig:
    """The config trials train with: ``search.train_size`` rows of every task when it is
    set, else the data's own (``data.train_size`` and ``data.train_size_per_task``, as the
    trained models)."""
    sc = cfg.search
    if sc.train_size is None:
        return cfg
    return with_overrides(cfg, {"data": {"train_size": sc.train_size,
                                         "train_size_per_task": {}}})


def trial_bounds(cfg: StudyConfig, method: str) -> tuple[int, int]:
    """(most epochs, smallest batch) a trial of ``method`` can draw: the search's choices
    where its space has them, else the config's ``train.epochs``/``train.batch_size``."""
    dims = space(method, cfg)
    epochs = max(dims["epochs"][1]) if "epochs" in dims else cfg.train.epochs
    batch = min(dims["batch_size"][1]) if "batch_size" in dims else cfg.train.batch_size
    return epochs, batch


def run_trials(cfg: StudyConfig, run: RunDir, task: str, method: str, base: Base,
               progress: bool = True, on_trial=None, limit: int | None = None) -> optuna.Study:
    """Run trials of (task, method) while the study's budget allows, at most ``limit`` here
    (a Ray task runs one); returns once the budget is spent and no trial is running, or
    after ``limit`` trials."""
    sc = cfg.search
    study = open_study(cfg, run, task, method)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
    train_cfg = trial_config(cfg)
    prepared = eval_enc = None
    ran = 0
    while limit is None or ran < limit:
        trial, counted_trials = _ask_under_lock(cfg, run, task, method, study)
        if trial is None:
            # Budget taken: done once no other worker's trial is still running (a dead
            # worker's trial turns stale, fails, and its retry reopens the budget).
            if not any(t.state == optuna.trial.TrialState.RUNNING for t in counted_trials):
                break
            time.sleep(min(sc.heartbeat_interval, 5))
            continue
        if prepared is None:
            prepared, eval_enc = _prepare_search_task(cfg, train_cfg, task, base.tokenizer)
        _run_trial(cfg, train_cfg, study, trial, task, method, base, prepared, eval_enc,
                   progress, run.root)
        ran += 1
        on_trial and on_trial()
    return study


def write_best(cfg: StudyConfig, run: RunDir, task: str, method: str,
               study: optuna.Study | None = None) -> dict:
    study = study or open_study(cfg, run, task, method)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        raise RuntimeError(f"search {task}/{method}: no completed trial in {study.study_name}")
    best = max(done, key=lambda t: (t.value, -t.number))
    trials = study.get_trials(deepcopy=False)
    result = {
        "task": task, "method": method, "study": study.study_name,
        "storage": "external" if resolve_storage(cfg.search.storage) else "sqlite (run directory)",
        "sampler": {"name": "TPE", "seeding": "per trial and parameter: sha256(task/method/"
                    "search.sampler_seed/position/parameter; position: trials holding one "
                    "when asked; a killed trial's retry takes the killed trial's)",
                    "sampler_seed": cfg.search.sampler_seed,
                    "startup_trials": min(cfg.search.startup_trials, cfg.search.trials)},
        "trial_seed": cfg.search.seed,
        "selection": cfg.data.selection,
        "space": {k: list(v) for k, v in space(method, cfg).items()},
        "metric": get_task(task).metric,
        "best": {"number": best.number, "value": best.value, "params": best.params,
                 "user_attrs": best.user_attrs},
        "overrides": params_to_overrides(best.params, method),
        "trials": [{"number": t.number, "state": t.state.name, "value": t.value,
                    "params": t.params, "user_attrs": t.user_attrs} for t in trials],
        "counts": {s: sum(t.state.name == s for t in trials)
                   for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")},
    }
    atomic_write_json(run.search_path(task, method), result)
    return result


def best_overrides(run: RunDir, task: str, method: str) -> dict | None:
    path = run.search_path(task, method)
    if not path.is_file():
        return None
    return read_json(path)["overrides"]
