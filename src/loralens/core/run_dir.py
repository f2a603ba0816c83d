"""The run directory (:class:`RunDir` owns its layout), its format version and stored
config, and provenance (versions, commit, hardware). Files are written through
:mod:`loralens.core.files` (atomic writes, JSON, CSV)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import yaml

from loralens.core.constraints import constraints_record
from loralens.core.errors import ConfigError, RunDirError
from loralens.core.files import atomic_write_json, atomic_write_text, read_json
from loralens.core.leftovers import remove_stale_temporaries

PACKAGES = ("loralens", "torch", "transformers", "peft", "datasets", "accelerate", "optuna",
            "numpy", "scipy", "safetensors", "gguf", "tokenizers", "matplotlib")


# Keys that may differ between the machines that share one run directory.
# where this machine finds things or reports to, not what the study is
MACHINE_LOCAL = {"data.glue_dir", "search.storage", "tracking.report_to", "tracking.experiment",
                 "run.executor", "run.ray_address",
                 # how often a job checkpoints, not what it learns: a killed run may be
                 # resumed with another interval
                 "train.checkpoint_every"}
# Config sections of how one invocation executes (config.RunConfig), not of the study:
# never stored, never a difference (a Ray run and a local run give the same run directory)
NOT_STORED = ("run",)


def git_commit() -> str | None:
    """Commit of the loralens source tree, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name ("AMD EPYC 7B13"): /proc/cpuinfo's first "model name", else
    platform.processor(), else the architecture (platform.machine)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Versions, commit and hardware, recorded in each run directory; ``constraints``: the
    sha256 of the constraints files the environment was installed from (by file name; {}
    where none is found: :mod:`loralens.core.constraints`)."""
    import torch

    versions = {name: _version(name) for name in PACKAGES}
    hw = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_model": cpu_model(),
          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
    return {"python": platform.python_version(), "packages": versions, "git_commit": git_commit(),
            "hardware": hw, "constraints": constraints_record()}


DRIFT_FILES = ("layers.csv", "layers.json", "table3.csv", "table3.json", "table4.csv",
               "table4.json")
WEIGHTSPACE_FILES = ("layers.csv", "layers.json", "forgetting.csv", "forgetting.json",
                     "summary.json", "methods.json", "sweep.csv", "sweep.json")

FORMAT_VERSION = 1
"""Layout version of a run directory, stored in ``loralens.json``. A directory without
the file was written before versioning (format 0): same layout, opened as it is."""


class RunDir:
    """A run directory and its layout: the one place that knows where each artifact lives.

    Layout (every stage reads what the earlier ones wrote)::

        loralens.json                      format version, loralens version that created it
        config.yaml                        the resolved config (written once)
        env.json                           package versions, git commit, hardware per command
        data.json                          rows used per task and split
        timings.json                       wall seconds per stage
        plan.json                          the dry-run plan's estimates per stage (run --plan)
        jobs.db                            the job queue (SQLite; or search.storage)
        search.db                          Optuna studies (SQLite; or search.storage)
        sanity/<task>-<method>.json        one sanity check;  sanity.json: all of them
        search/<task>-<method>.json        space, trials, best hyperparameters
        models/<task>/<method>/seed<seed>/ adapter/ (a PEFT method's adapter, PEFT's layout)
                                           or model/ (a whole classifier), val_logits.npy,
                                           metrics.json (written last: its presence marks
                                           the job finished); checkpoint.safetensors
                                           while it trains (train.checkpoint_every)
        extract/<task>/                    manifest.json + one <method>-seed<seed>.npz per
                                           model (base.npz: the base model)
        drift/                             layers.*, table3.*, table4.*; methods.* (a study
                                           of more methods than LoRA and full fine-tuning)
        weightspace/                       models/, layers.*, forgetting.*, summary.json,
                                           methods.json, sweep/, sweep.* (weights stage)
        bench/                             serving.json, latency.csv, comparison.csv,
                                           requests.csv, multi.csv, identity.csv
        loadtest/                          loadtest.json, loadtest.csv, loadtest_runs.csv
        report/                            report.md, report.html, figures/ (+ legends.json)
        tensorboard/, mlflow.db, mlartifacts/  experiment tracking (tracking.report_to)
        trackers/                          accelerate's trackers' local files (wandb, aim, ...)

    A job directory's own files also have static methods (:meth:`job_metrics`,
    :meth:`job_adapter_dir`, :meth:`job_model_dir`) for code given only a job directory.
    Which weights folder a method saves is the method registry's to say
    (``loralens.models.methods.Method.is_adapter``); core knows no methods, so the caller
    passes it to :meth:`weights_dir`.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- top-level files
    @property
    def format_path(self) -> Path:
        return self.root / "loralens.json"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def env_path(self) -> Path:
        return self.root / "env.json"

    @property
    def data_path(self) -> Path:
        return self.root / "data.json"

    @property
    def timings_path(self) -> Path:
        return self.root / "timings.json"

    @property
    def plan_path(self) -> Path:
        """``plan.json``: the estimates of the dry run made before the first invocation
        (``loralens run --plan FILE``; study.plan.dry_run.adopt_plan keeps the first)."""
        return self.root / "plan.json"

    def sqlite_url(self, name: str) -> str:
        """SQLite URL of a database file in the run directory (``jobs``, ``search``)."""
        from loralens.core.job_queue import sqlite_url

        self.root.mkdir(parents=True, exist_ok=True)
        return sqlite_url(self.root / f"{name}.db")

    # ---- sanity and search
    def sanity_path(self, task: str, method: str) -> Path:
        return self.root / "sanity" / f"{task}-{method}.json"

    @property
    def sanity_summary_path(self) -> Path:
        return self.root / "sanity.json"

    def sanity_results(self) -> list[Path]:
        return sorted((self.root / "sanity").glob("*.json"))

    def search_path(self, task: str, method: str) -> Path:
        return self.root / "search" / f"{task}-{method}.json"

    def search_results(self) -> list[Path]:
        return sorted((self.root / "search").glob("*.json"))

    # ---- models
    def job_dir(self, task: str, method: str, seed: int) -> Path:
        return self.root / "models" / task / method / f"seed{seed}"

    def metrics_path(self, task: str, method: str, seed: int) -> Path:
        return self.job_metrics(self.job_dir(task, method, seed))

    @staticmethod
    def job_metrics(job_dir: str | Path) -> Path:
        """A job directory's ``metrics.json`` (written last: its presence marks the job
        finished; its hash, the job's fingerprint)."""
        return Path(job_dir) / "metrics.json"

    def val_logits_path(self, task: str, method: str, seed: int) -> Path:
        return self.job_dir(task, method, seed) / "val_logits.npy"

    def checkpoint_path(self, task: str, method: str, seed: int) -> Path:
        """A running job's checkpoint (``train.checkpoint_every``: trained parameters,
        optimizer, schedule, RNG states, data position, early stopping; one safetensors
        file, written atomically); removed once the job finishes."""
        return self.job_dir(task, method, seed) / "checkpoint.safetensors"

    def weights_dir(self, task: str, method: str, seed: int, adapter: bool | None = None
                    ) -> Path:
        """The job's weights folder: ``adapter/`` when ``adapter`` (a PEFT method: PEFT's
        adapter layout, the head saved with it), else ``model/`` (a whole classifier).
        ``adapter`` is the method's ``Method.is_adapter``, asked of the method registry by
        the caller; left out, the folder the job holds: ``model/`` where it exists, else
        ``adapter/``."""
        job = self.job_dir(task, method, seed)
        if adapter is None:
            adapter = not self.job_model_dir(job).is_dir()
        return self.job_adapter_dir(job) if adapter else self.job_model_dir(job)

    @staticmethod
    def job_adapter_dir(job_dir: str | Path) -> Path:
        """A job directory's ``adapter/``: a PEFT method's adapter (PEFT's layout)."""
        return Path(job_dir) / "adapter"

    @staticmethod
    def job_model_dir(job_dir: str | Path) -> Path:
        """A job directory's ``model/``: a whole classifier (a standard checkpoint)."""
        return Path(job_dir) / "model"

    def job_done(self, task: str, method: str, seed: int) -> bool:
        return self.metrics_path(task, method, seed).is_file()

    def finished_jobs(self) -> list[tuple[str, str, int]]:
        """Every finished (task, method, seed), sorted."""
        out = []
        for m in sorted((self.root / "models").glob("*/*/seed*/metrics.json")):
            seed_dir = m.parent
            if seed_dir.name[4:].isdigit():  # not e.g. a hand-made "seed42.old" copy
                out.append((seed_dir.parent.parent.name, seed_dir.parent.name,
                            int(seed_dir.name[4:])))
        return sorted(out)

    def adapters(self, method: str) -> list[tuple[str, int, Path]]:
        """(task, seed, adapter directory) of every finished job of ``method`` that saved an
        adapter, sorted."""
        return [(t, s, self.weights_dir(t, m, s, adapter=True))
                for t, m, s in self.finished_jobs()
                if m == method and self.weights_dir(t, m, s, adapter=True).is_dir()]

    # ---- analysis outputs
    def extract_dir(self, task: str) -> Path:
        return self.root / "extract" / task

    def extract_manifest(self, task: str) -> Path:
        return self.extract_dir(task) / "manifest.json"

    def extract_array_path(self, task: str, key: str) -> Path:
        """One model's pooled states of ``task``: ``<key>.npz`` (``key``: ``base`` or
        ``<method>-seed<seed>``)."""
        return self.extract_dir(task) / f"{key}.npz"

    def extract_manifests(self) -> list[Path]:
        return sorted((self.root / "extract").glob("*/manifest.json"))

    @property
    def drift_dir(self) -> Path:
        return self.root / "drift"

    def drift_path(self, name: str) -> Path:
        """A drift output of the two-method study: ``layers``, ``table3`` or ``table4``,
        with ``.csv`` or ``.json``."""
        if name not in DRIFT_FILES:
            raise ValueError(f"unknown drift file {name!r}; one of {DRIFT_FILES}")
        return self.drift_dir / name

    @property
    def drift_methods_json(self) -> Path:
        """``drift/methods.json``: every method's drift and accuracy vs the reference method
        (a study of more methods than LoRA and full fine-tuning)."""
        return self.drift_dir / "methods.json"

    @property
    def drift_methods_csv(self) -> Path:
        """``drift/methods.csv``: the rows of ``methods.json``, one per task, measure and
        method."""
        return self.drift_dir / "methods.csv"

    @property
    def weightspace_dir(self) -> Path:
        """``weightspace/``: the weights stage (``models/`` one JSON per trained model,
        ``sweep/`` one JSON per swept model, and the files below)."""
        return self.root / "weightspace"

    def weightspace_path(self, name: str) -> Path:
        """A weights-stage output by file name (one of :data:`WEIGHTSPACE_FILES`; each also
        has its own attribute below)."""
        if name not in WEIGHTSPACE_FILES:
            raise ValueError(f"unknown weightspace file {name!r}; one of {WEIGHTSPACE_FILES}")
        return self.weightspace_dir / name

    @property
    def weightspace_layers_json(self) -> Path:
        """``weightspace/layers.json``: intruders and change spectra per model and matrix."""
        return self.weightspace_path("layers.json")

    @property
    def weightspace_layers_csv(self) -> Path:
        """``weightspace/layers.csv``: the rows of ``layers.json``."""
        return self.weightspace_path("layers.csv")

    @property
    def weightspace_forgetting_json(self) -> Path:
        """``weightspace/forgetting.json``: forgetting of general text per model."""
        return self.weightspace_path("forgetting.json")

    @property
    def weightspace_forgetting_csv(self) -> Path:
        """``weightspace/forgetting.csv``: the rows of ``forgetting.json``."""
        return self.weightspace_path("forgetting.csv")

    @property
    def weightspace_summary_json(self) -> Path:
        """``weightspace/summary.json``: the two-method summary and its tests."""
        return self.weightspace_path("summary.json")

    @property
    def weightspace_methods_json(self) -> Path:
        """``weightspace/methods.json``: every method vs the reference method (a study of
        more methods than LoRA and full fine-tuning)."""
        return self.weightspace_path("methods.json")

    @property
    def weightspace_sweep_json(self) -> Path:
        """``weightspace/sweep.json``: the intruder sweep's rows and summary."""
        return self.weightspace_path("sweep.json")

    @property
    def weightspace_sweep_csv(self) -> Path:
        """``weightspace/sweep.csv``: the intruder sweep's rows."""
        return self.weightspace_path("sweep.csv")

    def weightspace_model_path(self, task: str, method: str, seed: int) -> Path:
        return self.weightspace_dir / "models" / f"{task}-{method}-seed{seed}.json"

    def weightspace_sweep_path(self, task: str, seed: int) -> Path:
        """One LoRA model's intruder-removal sweep (the weights stage, weights.sweep)."""
        return self.weightspace_dir / "sweep" / f"{task}-lora-seed{seed}.json"

    @property
    def bench_dir(self) -> Path:
        return self.root / "bench"

    @property
    def serving_path(self) -> Path:
        return self.bench_dir / "serving.json"

    @property
    def bench_latency_csv(self) -> Path:
        """``bench/latency.csv``: one row per task, seed, batch size and served kind."""
        return self.bench_dir / "latency.csv"

    @property
    def bench_comparison_csv(self) -> Path:
        """``bench/comparison.csv``: Table 5's rows (each kind vs its baselines)."""
        return self.bench_dir / "comparison.csv"

    @property
    def bench_requests_csv(self) -> Path:
        """``bench/requests.csv``: every timed request."""
        return self.bench_dir / "requests.csv"

    @property
    def bench_multi_csv(self) -> Path:
        """``bench/multi.csv``: several adapters on one base."""
        return self.bench_dir / "multi.csv"

    @property
    def bench_identity_csv(self) -> Path:
        """``bench/identity.csv``: the identity checks of the served paths."""
        return self.bench_dir / "identity.csv"

    @property
    def loadtest_dir(self) -> Path:
        return self.root / "loadtest"

    @property
    def loadtest_path(self) -> Path:
        return self.loadtest_dir / "loadtest.json"

    @property
    def loadtest_csv(self) -> Path:
        """``loadtest/loadtest.csv``: one row per cell of the load test."""
        return self.loadtest_dir / "loadtest.csv"

    @property
    def loadtest_runs_csv(self) -> Path:
        """``loadtest/loadtest_runs.csv``: one row per run of the load test."""
        return self.loadtest_dir / "loadtest_runs.csv"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def report_md(self) -> Path:
        """``report/report.md``: the report in Markdown."""
        return self.report_dir / "report.md"

    @property
    def report_html(self) -> Path:
        """``report/report.html``: the report as one self-contained page."""
        return self.report_dir / "report.html"

    @property
    def report_figures_dir(self) -> Path:
        """``report/figures/``: each figure as ``<id>.png`` and ``<id>.svg``
        (:meth:`report_figure_path`) and ``legends.json``."""
        return self.report_dir / "figures"

    def report_figure_path(self, figure_id: str, fmt: str) -> Path:
        """One figure's file: ``report/figures/<figure_id>.<fmt>`` (``png`` or ``svg``)."""
        return self.report_figures_dir / f"{figure_id}.{fmt}"

    @property
    def report_legends_json(self) -> Path:
        """``report/figures/legends.json``: the methods each drawn figure's legends name."""
        return self.report_figures_dir / "legends.json"

    # ---- experiment tracking (tracking.report_to)
    def tensorboard_dir(self, name: str) -> Path:
        """``tensorboard/<name>/``: one tracked run's TensorBoard events (``name``: a job's
        ``<task>-<method>-seed<seed>``, a trial's ``search-<task>-<method>-trial<n>``, or
        ``study``)."""
        return self.root / "tensorboard" / name

    def tracker_dir(self, name: str) -> Path:
        """``trackers/<name>/``: the local files of accelerate's tracker ``name`` (wandb's
        offline runs, aim's repository, dvclive's folders)."""
        return self.root / "trackers" / name

    @property
    def mlflow_db(self) -> Path:
        """``mlflow.db``: MLflow's default tracking store (SQLite) when no URI is given."""
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts_dir(self) -> Path:
        """``mlartifacts/``: MLflow's artifacts of the run directory's tracked runs."""
        return self.root / "mlartifacts"

    # ---- format version and config
    def is_run_dir(self) -> bool:
        return self.config_path.is_file()

    def format_version(self) -> int:
        return int(read_json(self.format_path)["format"]) if self.format_path.is_file() else 0

    def check_format(self) -> None:
        """Older formats open as they are; a newer one needs a newer loralens."""
        v = self.format_version()
        if v > FORMAT_VERSION:
            raise RunDirError(f"{self.root} was written by a newer loralens (run directory "
                              f"format {v}, this version reads up to {FORMAT_VERSION}); "
                              "upgrade loralens")

    def bind_config(self, cfg) -> None:
        """Store the resolved config, or check it equals the stored one.

        A run directory holds one study; running it again with different settings
        would mix results, so a difference is an error naming the keys. A config
        stored by an older version is read through the current schema first, so keys
        added since then take their defaults and are no difference.
        """
        from loralens.core.redaction import redact_config_file, without_secrets

        self.check_format()
        remove_stale_temporaries(self.root)  # what writers killed earlier left
        new = cfg.to_dict()
        if self.config_path.is_file():
            old = self.load_config().to_dict()
            diffs = [d for d in _diff(old, new) if d[0] not in MACHINE_LOCAL
                     and d[0].split(".", 1)[0] not in NOT_STORED]
            if diffs:
                shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:8])
                raise RunDirError(f"{self.config_path} was written with other settings ({shown}); "
                                  "use another --run-dir, or the stored settings")
            redact_config_file(self.config_path)  # one an older version wrote
        else:
            stored = {k: v for k, v in new.items() if k not in NOT_STORED}
            atomic_write_text(self.config_path, yaml.safe_dump(without_secrets(stored),
                                                               sort_keys=False))
        if not self.format_path.is_file():
            atomic_write_json(self.format_path, {"format": FORMAT_VERSION,
                                                 "loralens": _version("loralens")})

    def load_config(self):
        from loralens.core.config_load import config_from_dict

        if not self.config_path.is_file():
            raise RunDirError(f"{self.root} is not a run directory (no config.yaml)")
        self.check_format()
        with open(self.config_path) as f:
            data = _before_held_out_selection(yaml.safe_load(f) or {}, self.config_path)
        try:
            return config_from_dict(data)
        except ConfigError as e:
            raise RunDirError(
                f"{self.config_path} does not fit this version's settings ({e}); "
                f"`loralens upgrade {self.root}` rewrites it (unknown keys dropped, the "
                "old file kept as config.yaml.bak)") from None

    def upgrade(self) -> list[str]:
        """Rewrite an older run directory's config for this version: keys this version
        does not know are dropped (listed in the return), new keys get their defaults,
        the old file is kept as ``config.yaml.bak``."""
        from loralens.core.config_load import config_from_dict
        from loralens.core.redaction import without_secrets

        with open(self.config_path) as f:
            data = _before_held_out_selection(yaml.safe_load(f) or {}, self.config_path)
        dropped: list[str] = []
        while True:
            try:
                cfg = config_from_dict(data)
                break
            except ConfigError as e:
                key = getattr(e, "key", None)
                # only keys this version does not know; a known key with a bad value stays
                # an error (the user must decide what it should be)
                if not key or not str(e).startswith(f"unknown key {key!r}") \
                        or not _drop(data, key):
                    raise RunDirError(f"{self.config_path}: cannot upgrade: {e}") from None
                dropped.append(key)
        atomic_write_text(self.config_path.with_name("config.yaml.bak"),
                          self.config_path.read_text())
        atomic_write_text(self.config_path, yaml.safe_dump(without_secrets(cfg.to_dict()),
                                                           sort_keys=False))
        atomic_write_json(self.format_path, {"format": FORMAT_VERSION,
                                             "loralens": _version("loralens")})
        return dropped

    # ---- records
    def record_environment(self, command: str) -> None:
        self._update_json(self.env_path, command, environment())

    def record_data(self, task: str, stats: dict) -> None:
        self._update_json(self.data_path, task, stats)

    def add_timing(self, stage: str, seconds: float) -> None:
        self._update_json(self.timings_path, stage, lambda old: (old or 0.0) + seconds)

    def _update_json(self, path: Path, key: str, value: Any) -> None:
        """Set ``key`` of a JSON object file; ``value`` may be a function of the old value.
        Under a file lock: workers (Ray tasks) recording different tasks at once would
        otherwise each write back what they read, and one entry would be lost."""
        from filelock import FileLock

        with FileLock(str(path.with_name(f".{path.name}.lock"))):
            data = read_json(path) if path.is_file() else {}
            data[key] = value(data.get(key)) if callable(value) else value
            atomic_write_json(path, data)


def _before_held_out_selection(data: dict, path: Path) -> dict:
    """A config stored before ``data.selection`` existed, read as what that run did: its
    search and early stopping read the validation split, evaluated once per epoch.

    Read otherwise, it would take today's defaults (a held-out slice) and a continued
    run would mix two protocols in one directory. A run whose search trials trained
    with a training seed cannot be expressed in today's schema: it can be reported, not
    continued or served from its config.
    """
    section = data.get("data")
    if not isinstance(section, dict) or "selection" in section:
        return data
    data = {**data, "data": {**section, "selection": "validation"}}
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    if not train.get("eval_every"):
        data["train"] = {**train, "evals_per_epoch": 1}
    search = data.get("search") if isinstance(data.get("search"), dict) else {}
    seed = search.get("seed", 42)
    if search.get("enabled", True) and seed in (data.get("seeds") or [42, 1337, 2024]):
        raise RunDirError(
            f"{path} was written before held-out selection: its search trials trained with "
            f"seed {seed}, also a training seed, and selected on the validation split. "
            "Report it as it is (`loralens report --run-dir "
            f"{path.parent}`); to continue the study, start a new --run-dir")
    return data


def _drop(data: dict, dotted: str) -> bool:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict) and parts[-1] in node:
        del node[parts[-1]]
        return True
    return False


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]

