"""Experiment tracking: each training job logged to TensorBoard and/or MLflow.

``tracking.report_to`` (``--report-to``, several allowed: HF Trainer's convention) names
the trackers; ``none`` (the default) logs nothing and imports neither library. Per
training job, one tracked run named ``TASK/METHOD/seedN`` holding:

- parameters: the job's hyperparameters (``metrics.json``'s ``hyperparameters``, flattened);
- ``train/loss`` (the mean loss of each optimizer step's rows) and ``train/lr``, per step;
- ``selection/val_loss``, ``selection/val_accuracy``, ``selection/val_f1``,
  ``selection/val_mcc`` at each early-stopping evaluation (the selection rows);
- at the last step: ``validation/*`` (the reported split, once), ``fit/tokens_per_s``
  (real tokens per second of the training steps), ``fit/mfu``, ``fit/train_seconds``,
  ``fit/final_train_loss``, ``fit/best_step``.

Per search trial, a run ``search/TASK/METHOD/trialN``: its sampled parameters, the
``selection/*`` evaluations it was pruned on, and ``search/objective`` (absent when pruned).

Per study, after the report stage, a run ``study``: the report's headline numbers and, in
MLflow, the report files as artifacts (:mod:`loralens.study.tracking`).

The runs of one study are grouped: TensorBoard writes ``RUN_DIR/tensorboard/TASK-METHOD-seedN``
(``tensorboard --logdir RUN_DIR/tensorboard``); MLflow puts them in one experiment named
``tracking.experiment`` (default: the run directory's name), in the store at
``--tracking-uri`` / ``$MLFLOW_TRACKING_URI``, else ``sqlite:///RUN_DIR/mlflow.db``. The
tracking URI is never stored in the run directory (it may carry credentials) and is shown
redacted.

Beside those two, accelerate's trackers by name (``accelerate.tracking.LOGGER_TYPE_TO_CLASS``
through its ``GeneralTracker`` interface): ``wandb``, ``aim``, ``clearml``, ``comet_ml``,
``dvclive``, ``trackio``, ``swanlab``: each tracked run (job, trial, study) is one tracker
instance, started, given the same parameters and scalars, and finished; their local files go
under ``RUN_DIR/trackers/NAME`` (wandb: unless ``$WANDB_DIR`` is set). ``all`` is every
tracker whose package is installed here (transformers' convention). TensorBoard and MLflow
stay loralens's own sinks: accelerate's MLflow tracker drives MLflow's process-global active
run and its TensorBoard tracker names its folder by the clock, while a study needs one named,
tagged run per job, trial and study in the run directory's own store, with the report files
as artifacts.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from loralens.core.config import REPORT_TO
from loralens.core.errors import ConfigError
from loralens.core.redaction import redact_url
from loralens.core.run_dir import RunDir

URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own variable
OWN = ("tensorboard", "mlflow")  # loralens's own sinks (see the module's docstring for why)

# tracker -> (the module it imports, what to call it): the ``tracking`` extra installs them;
# ``make run`` / ``pip install loralens`` do not
TRACKER_MODULES = {"tensorboard": ("tensorboard", "TensorBoard"), "mlflow": ("mlflow", "MLflow")}

# accelerate's trackers: name -> (the module it imports, its pip package). The names are
# accelerate.tracking.LOGGER_TYPE_TO_CLASS's, less loralens's own (a unit test keeps them equal).
ACCELERATE_TRACKERS = {"wandb": ("wandb", "wandb"), "aim": ("aim", "aim"),
                       "clearml": ("clearml", "clearml"), "comet_ml": ("comet_ml", "comet-ml"),
                       "dvclive": ("dvclive", "dvclive"), "trackio": ("trackio", "trackio"),
                       "swanlab": ("swanlab", "swanlab")}
EXTRAS = {"wandb": "wandb"}  # trackers with a loralens extra of their own


def _module(name: str) -> str:
    return (TRACKER_MODULES.get(name) or ACCELERATE_TRACKERS[name])[0]


def reporters(report_to: list[str], find_spec=importlib.util.find_spec) -> list[str]:
    """The trackers asked for, in ``REPORT_TO``'s order: ``none`` dropped (with another it is
    an error), ``all`` expanded to every tracker whose package is installed here; an unknown
    name is a ConfigError listing the known ones."""
    asked = list(dict.fromkeys(report_to))
    for name in asked:
        if name not in REPORT_TO:
            raise ConfigError(f"tracking.report_to: {name!r} is not one of {list(REPORT_TO)}",
                              "tracking.report_to")
    if "none" in asked and len(asked) > 1:
        raise ConfigError(f"tracking.report_to: 'none' together with {asked}: give 'none' "
                          "alone, or the trackers", "tracking.report_to")
    named = set(asked)
    if "all" in named:
        named |= {n for n in REPORT_TO[2:] if find_spec(_module(n)) is not None}
    return [n for n in REPORT_TO[2:] if n in named]


def require_installed(asked: list[str], find_spec=importlib.util.find_spec) -> None:
    """A ConfigError naming ``tracking.report_to`` and what to install when a tracker in
    ``asked`` is not installed (each is optional: the study runs without it)."""
    for name in asked:
        if name in ACCELERATE_TRACKERS:
            module, package = ACCELERATE_TRACKERS[name]
            if find_spec(module) is None:
                extra = (f" (or pip install 'loralens[{EXTRAS[name]}]')" if name in EXTRAS
                         else "")
                raise ConfigError(f"tracking.report_to: {name!r} needs the {package} package, "
                                  f"which is not installed here: pip install {package}{extra}",
                                  "tracking.report_to")
            continue
        module, label = TRACKER_MODULES[name]
        if find_spec(module) is None:
            raise ConfigError(f"tracking.report_to: {name!r} needs {label}, which is not "
                              "installed here; install the tracking extra: pip install "
                              "'loralens[tracking]' (or pip install -e '.[tracking]' in a "
                              "checkout)", "tracking.report_to")


def tracking_uri(run_root: Path, environ=os.environ) -> str:
    return environ.get(URI_ENV) or f"sqlite:///{RunDir(Path(run_root).resolve()).mlflow_db}"


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and None as their text."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class _TensorBoard:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(log_dir=str(log_dir))

    def params(self, params: dict) -> None:
        lines = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.w.add_text("hyperparameters", "| key | value |\n|---|---|\n" + lines, 0)

    def scalars(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.w.add_scalar(k, v, step)

    def text(self, tag: str, text: str) -> None:
        self.w.add_text(tag, text, 0)

    def artifacts(self, local_dir: Path, path: str) -> None:
        pass  # TensorBoard holds no files: the report is its text summary

    def close(self, ok: bool) -> None:
        self.w.close()


class _MLflow:
    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict,
                 artifact_root: Path):
        from mlflow import MlflowClient

        self.c = MlflowClient(uri)
        exp = self.c.get_experiment_by_name(experiment)
        # artifacts next to the run directory's store, never in the current directory
        exp_id = exp.experiment_id if exp else self.c.create_experiment(
            experiment, artifact_location=Path(artifact_root).resolve().as_uri())
        self.run_id = self.c.create_run(exp_id, run_name=run_name, tags=tags).info.run_id

    def params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.c.log_batch(self.run_id, params=items[i:i + 100])

    def scalars(self, step: int, values: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.c.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step)
                                               for k, v in values.items()])

    def text(self, tag: str, text: str) -> None:
        pass  # the same text travels as a file among the artifacts

    def artifacts(self, local_dir: Path, path: str) -> None:
        self.c.log_artifacts(self.run_id, str(local_dir), path)

    def close(self, ok: bool) -> None:
        self.c.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _accelerate_args(name: str, project: str, run_name: str, folder: str, log_dir: Path,
                     tags: dict, environ=os.environ) -> tuple[tuple, dict]:
    """(positional, keyword) arguments of accelerate's tracker ``name`` for one tracked run:
    the project groups a study's runs, the run is named like MLflow's, local files go under
    ``log_dir`` (``RUN_DIR/trackers/NAME``)."""
    if name == "wandb":  # wandb.init(project=..., **kw); the API key comes from its env only
        kw = {"name": run_name, "job_type": tags.get("kind"), "reinit": "finish_previous",
              "config": {f"tag.{k}": v for k, v in tags.items()}}
        if not environ.get("WANDB_DIR"):
            kw["dir"] = str(log_dir)
        return (environ.get("WANDB_PROJECT") or project,), kw
    if name == "aim":  # Run(repo=log_dir, experiment=...); the first argument names the run
        return (run_name, str(log_dir)), {"experiment": project}
    if name == "clearml":  # Task.init(project_name=..., task_name=...)
        return (project,), {"task_name": run_name}
    if name == "dvclive":  # Live(dir=...): one folder per tracked run
        return (run_name,), {"dir": str(log_dir / folder)}
    if name == "trackio":  # trackio.init(project=..., name=...)
        return (project,), {"name": run_name}
    if name == "swanlab":  # swanlab.init(project=..., experiment_name=..., logdir=...)
        return (project,), {"experiment_name": run_name, "logdir": str(log_dir)}
    return (project,), {}  # comet_ml.start(project_name=...)


class _Accelerate:
    """One tracked run in one of accelerate's trackers (``accelerate.tracking``'s
    ``GeneralTracker`` interface: start, store_init_configuration, log, finish)."""

    def __init__(self, name: str, args: tuple, kwargs: dict):
        from accelerate import PartialState
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        PartialState()  # accelerate's trackers log through its state (one process: no group)
        self.name = name
        self.t = LOGGER_TYPE_TO_CLASS[name](*args, **kwargs)
        self.t.start()

    def params(self, params: dict) -> None:
        self.t.store_init_configuration(params)

    def scalars(self, step: int, values: dict) -> None:
        if values:
            self.t.log(values, step=step)

    def text(self, tag: str, text: str) -> None:
        pass  # the GeneralTracker interface carries numbers and parameters only

    def artifacts(self, local_dir: Path, path: str) -> None:
        pass

    def close(self, ok: bool) -> None:
        if not ok and self.name == "wandb":  # accelerate's finish() would mark it a success
            self.t.tracker.finish(exit_code=1)
        else:
            self.t.finish()


class JobTracker:
    """One training job's tracked runs (one per tracker); hooks for ``loop.fit``."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def params(self, params: dict) -> None:
        flat = flatten(params)
        for s in self.sinks:
            s.params(flat)

    def scalars(self, step: int, values: dict) -> None:
        finite = {k: float(v) for k, v in values.items()
                  if isinstance(v, (int, float)) and math.isfinite(v)}
        for s in self.sinks:
            s.scalars(step, finite)

    def on_step(self, step: int, loss: float, lr: float) -> None:
        self.scalars(step, {"train/loss": loss, "train/lr": lr})

    def on_eval(self, entry: dict) -> None:
        self.scalars(entry["step"], {f"selection/{k}": v for k, v in entry.items()
                                     if k.startswith("val_")})

    def finish(self, metrics: dict) -> None:
        """The job's final numbers, from what ``metrics.json`` holds, at its last step."""
        fit = metrics["fit"]
        seconds = fit.get("step_seconds") or 0.0
        values = {f"validation/{k}": v for k, v in metrics["validation"].items()}
        values.update({"fit/tokens_per_s": fit["real_tokens"] / seconds if seconds else math.nan,
                       "fit/mfu": fit.get("mfu", math.nan),
                       "fit/train_seconds": fit["train_seconds"],
                       "fit/final_train_loss": fit["final_train_loss"],
                       "fit/best_step": fit["best_step"]})
        self.scalars(fit["steps"], values)

    def text(self, tag: str, text: str) -> None:
        for s in self.sinks:
            s.text(tag, text)

    def artifacts(self, local_dir: Path, path: str) -> None:
        """The files under ``local_dir`` as artifacts under ``path`` (MLflow only)."""
        for s in self.sinks:
            s.artifacts(local_dir, path)

    def close(self, ok: bool = True) -> None:
        for s in self.sinks:
            s.close(ok)


def open_job(cfg, run_root: Path, task: str, method: str, seed: int) -> JobTracker | None:
    """The training job's tracker, or None when ``tracking.report_to`` is ``none``."""
    return open_tracked(cfg, run_root, f"{task}/{method}/seed{seed}",
                        f"{task}-{method}-seed{seed}",
                        {"task": task, "method": method, "seed": str(seed), "kind": "train"})


def open_trial(cfg, run_root: Path, task: str, method: str, number: int) -> JobTracker | None:
    """A search trial's tracker (``search/TASK/METHOD/trialN``; TensorBoard:
    ``tensorboard/search-TASK-METHOD-trialN``), or None."""
    return open_tracked(cfg, run_root, f"search/{task}/{method}/trial{number}",
                        f"search-{task}-{method}-trial{number}",
                        {"task": task, "method": method, "trial": str(number),
                         "kind": "search"})


def open_tracked(cfg, run_root: Path, name: str, tb_dir: str, tags: dict
                 ) -> JobTracker | None:
    asked = reporters(cfg.tracking.report_to)
    if not asked:
        return None
    require_installed(asked)
    run_root, sinks = Path(run_root), []
    if "tensorboard" in asked:
        sinks.append(_TensorBoard(RunDir(run_root).tensorboard_dir(tb_dir)))
    project = cfg.tracking.experiment or run_root.resolve().name
    if "mlflow" in asked:
        uri = tracking_uri(run_root)
        try:
            sinks.append(_MLflow(uri, project, name, tags, RunDir(run_root).mlflow_artifacts_dir))
        except Exception as e:  # the URI may carry a password: never show it whole
            raise RuntimeError(f"MLflow tracking at {redact_url(uri)}: "
                               f"{type(e).__name__}") from None
    try:
        for tracker in (a for a in asked if a in ACCELERATE_TRACKERS):
            log_dir = RunDir(run_root).tracker_dir(tracker)
            log_dir.mkdir(parents=True, exist_ok=True)
            args, kwargs = _accelerate_args(tracker, project, name, tb_dir, log_dir, tags)
            sinks.append(_Accelerate(tracker, args, kwargs))
    except BaseException:
        JobTracker(sinks).close(ok=False)  # the runs already started end as failed
        raise
    return JobTracker(sinks)
