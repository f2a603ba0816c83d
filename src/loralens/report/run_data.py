"""What the run directory holds, read defensively for the report.

:func:`load_run` reads every file the stages write, each through its :class:`RunDir`
path; a missing file leaves its field empty and an unreadable one is recorded in
``problems``, never an error. :attr:`RunData.protocol` says which selection protocol
(``data.selection``) produced the numbers, read from config.yaml and data.json.

Sources (see the writers for the exact fields): ``config.yaml``, ``env.json``,
``data.json``, ``timings.json`` (store.py, runner.py); ``models/<task>/<method>/
seed<seed>/metrics.json`` (train.py); ``sanity/*.json`` (sanity.py);
``search/<task>-<method>.json`` (search.py); ``extract/<task>/manifest.json``
(extract.py); ``drift/table3.json``, ``table4.json``, ``layers.json`` (drift.py);
``bench/serving.json`` (serving/bench.py); ``loadtest/loadtest.json``
(serving/loadtest.py).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from loralens.core.run_dir import RunDir

if TYPE_CHECKING:
    from loralens.core.config import StudyConfig

# The stage order of loralens.study.stages.STAGES (the report is below the study layer and
# cannot import it; tests/unit/study/test_stage_order.py keeps the two equal).
STAGES = ("sanity", "search", "train", "extract", "drift", "weights", "bench", "report")


@dataclass
class RunData:
    run: RunDir
    config: dict | None = None
    env: dict | None = None
    data: dict | None = None
    timings: dict | None = None
    jobs: dict = field(default_factory=dict)       # (task, method, seed) -> metrics.json
    sanity: list = field(default_factory=list)     # one dict per (task, method)
    search: dict = field(default_factory=dict)     # (task, method) -> search result
    extract: dict = field(default_factory=dict)    # task -> manifest
    table3: dict | None = None
    table4: dict | None = None
    layers: list | None = None                     # drift/layers.json rows
    serving: dict | None = None
    loadtest: dict | None = None                   # loadtest/loadtest.json
    problems: list = field(default_factory=list)   # files that exist but could not be read
    cache: dict = field(default_factory=dict)      # values computed once per report

    @property
    def root(self) -> Path:
        return self.run.root

    # ---- what the study should contain: the config, else what is present
    def _configured(self, key: str, present: list) -> list:
        """The config's list for ``key`` followed by what is present beyond it."""
        cfg = (self.config or {}).get(key)
        if isinstance(cfg, list) and cfg:
            return list(cfg) + [x for x in present if x not in cfg]
        return present

    @property
    def tasks(self) -> list[str]:
        return self._configured("tasks", sorted({k[0] for k in self.jobs} | set(self.extract)))

    @property
    def methods(self) -> list[str]:
        return self._configured("methods", sorted({k[1] for k in self.jobs})) or ["lora", "full"]

    @property
    def seeds(self) -> list[int]:
        return self._configured("seeds", sorted({k[2] for k in self.jobs}))

    def cfg(self, *keys: str, default: Any = None) -> Any:
        node: Any = self.config or {}
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return default
            node = node[k]
        return node

    @property
    def search_enabled(self) -> bool:
        return bool(self.cfg("search", "enabled", default=True))

    def metric(self, task: str) -> str:
        try:
            from loralens.tasks.registry import get_task

            return get_task(task).metric
        except (KeyError, ValueError):  # a task file this process has not read
            return "accuracy"

    @property
    def protocol(self) -> Protocol | None:
        """The selection protocol of the run (None without a config.yaml)."""
        if "protocol" not in self.cache:
            self.cache["protocol"] = resolve_protocol(
                self.config, self.data, stored_correction(self.table3, self.table4)) \
                if self.config is not None else None
        return self.cache["protocol"]


def stored_correction(*files: dict | None) -> str | None:
    """The family-wise correction the stored test files were made with: the first stored
    family's ``correction``; ``"bonferroni"`` for families (or comparisons) written before
    the correction was a choice; None without a stored test.

    config.yaml is the whole resolved config (RunDir.bind_config), so one without
    ``stats.correction`` predates the key; a stage run on it since then applied today's
    default, one run before it Bonferroni: the stored files say which.
    """
    for src in files:
        if not isinstance(src, dict):
            continue
        fams = [f for f in (src.get("families") or {}).values() if isinstance(f, dict)]
        if fams:
            return next((str(f["correction"]) for f in fams if f.get("correction")),
                        "bonferroni")
        if src.get("tasks"):  # a file from before declared families: Bonferroni only
            return "bonferroni"
    return None


# --------------------------------------------------------------------------- protocol

# Config keys the protocol text and the list of differences read; a stored config without
# them predates them, and the report says which values it had to assume.
PROTOCOL_KEYS = ("data.selection", "data.selection_fraction", "data.selection_min",
                 "data.subset_seed", "search.seed", "search.sampler_seed", "train.eval_every",
                 "train.evals_per_epoch", "train.patience")
SELECTIONS = ("train_slice", "validation")


@dataclass
class Protocol:
    """Which protocol produced the numbers: what selects (search, pruning, early stopping)
    and what Table 3 reports, from config.yaml, with what data.json recorded per task."""

    name: str                        # "train_slice" or "validation"
    info: dict                       # protocol.selection_protocol(cfg)
    differences: list                # protocol.differences(cfg): (key, text)
    assumed: str = ""                # why name was assumed (config.yaml lacks data.selection)
    missing: list = field(default_factory=list)    # PROTOCOL_KEYS absent from config.yaml
    dropped: list = field(default_factory=list)    # stored keys the config could not take
    recorded: dict = field(default_factory=dict)   # task -> data.json "selection" entry
    correction: str = ""             # stats.correction as resolved (stored_correction)

    @property
    def optimistic(self) -> bool:
        return bool(self.info.get("optimistic"))

    def task_protocol(self, task: str) -> str:
        """What the task's data was actually prepared with (data.json), else the config."""
        return str((self.recorded.get(task) or {}).get("protocol") or self.name)

    @property
    def mismatched(self) -> list[str]:
        """Tasks whose data.json records another protocol than config.yaml states."""
        return [t for t in self.recorded if self.task_protocol(t) != self.name]


def resolve_protocol(config: dict, data: dict | None,
                     correction: str | None = None) -> Protocol:
    """Rebuild the run's StudyConfig from the stored dict and ask :mod:`loralens.core.protocol`.

    A config.yaml without ``data.selection`` was written before the key existed, by code
    that selected on the validation split: it is read as the published protocol, never
    as today's default. Keys the current schema rejects (renamed, out of range) are
    dropped one by one, so an old run still gets a protocol; the report lists them.
    A config.yaml without ``stats.correction`` takes ``correction``, the one the stored
    tests were made with (:func:`stored_correction`), so the differences table and the
    tables agree; without stored tests, today's default, which the stages will apply.
    """
    from loralens.core import protocol as P

    stored = copy.deepcopy(config)
    missing = [k for k in PROTOCOL_KEYS if _get(stored, k) is _ABSENT]
    assumed = ""
    if _get(stored, "data.selection") not in SELECTIONS:
        value = _get(stored, "data.selection")
        assumed = ("config.yaml has no data.selection: the run predates the key, and older "
                   "versions selected on the validation split"
                   if value is _ABSENT else
                   f"config.yaml's data.selection {value!r} is not one of "
                   f"{list(SELECTIONS)}, so it is read as the published protocol")
        _set(stored, "data.selection", "validation")
    if _get(stored, "stats.correction") is _ABSENT and correction:
        _set(stored, "stats.correction", correction)  # what the stored tests used
    cfg, dropped = _rebuild(stored)
    recorded = {t: v["selection"] for t, v in (data or {}).items()
                if isinstance(v, dict) and isinstance(v.get("selection"), dict)}
    return Protocol(cfg.data.selection, P.selection_protocol(cfg), P.differences(cfg),
                    assumed, missing, dropped, recorded, cfg.stats.correction)


def _rebuild(stored: dict) -> tuple[StudyConfig, list[str]]:
    """``config_from_dict``, dropping each key it rejects (at most 50); defaults else."""
    from loralens.core.errors import ConfigError
    from loralens.core.config import DataConfig, StudyConfig
    from loralens.core.config_load import config_from_dict

    dropped: list[str] = []
    for _ in range(50):
        try:
            return config_from_dict(stored), dropped
        except ConfigError as e:
            key = (e.key or "").split("[")[0]
            if not key or key == "data.selection" or _get(stored, key) is _ABSENT:
                break
            dropped.append(str(e))  # the message names the key
            _drop(stored, key)
    dropped.append("config.yaml could not be rebuilt: today's defaults stand in for it")
    return StudyConfig(data=DataConfig(selection=_get(stored, "data.selection"))), dropped


_ABSENT = object()


def _get(d: dict, dotted: str) -> Any:
    node: Any = d
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return _ABSENT
        node = node[k]
    return node


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = d
    for k in parents:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[last] = value


def _drop(d: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    node: Any = d
    for k in parents:
        node = node.get(k) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


def read_optional(path: Path, problems: list[str], kind: str = "json") -> Any:
    """A run-directory file parsed (``kind``: ``json`` or ``yaml``); ``None`` when it is
    missing (that stage has not run), or unreadable, which is noted in ``problems``."""
    if not path.is_file():
        return None
    try:
        with open(path) as fh:
            return json.load(fh) if kind == "json" else yaml.safe_load(fh)
    except (OSError, ValueError, yaml.YAMLError) as e:
        problems.append(f"{path.name} ({path.parent}) could not be read: {e}")
        return None


def load_run(run: RunDir | str | Path) -> RunData:
    """Everything the report shows, from the run directory alone."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    d = RunData(run)
    p = d.problems
    cfg = read_optional(run.config_path, p, "yaml")
    d.config = cfg if isinstance(cfg, dict) else None
    if d.config:  # tasks read from task files: their label names and metrics
        from loralens.tasks.registry import register_definitions

        p.extend(register_definitions(d.config.get("task_defs")))
    d.env = read_optional(run.env_path, p)
    d.data = read_optional(run.data_path, p)
    d.timings = read_optional(run.timings_path, p)
    for task, method, seed in run.finished_jobs():
        metrics = read_optional(run.metrics_path(task, method, seed), p)
        if isinstance(metrics, dict):
            d.jobs[(task, method, seed)] = metrics
    _load_sanity_and_search(d)
    for man in run.extract_manifests():
        r = read_optional(man, p)
        if isinstance(r, dict):
            d.extract[man.parent.name] = r
    d.table3 = read_optional(run.drift_path("table3.json"), p)
    d.table4 = read_optional(run.drift_path("table4.json"), p)
    layers = read_optional(run.drift_path("layers.json"), p)
    d.layers = layers.get("rows") if isinstance(layers, dict) else None
    d.serving = read_optional(run.serving_path, p)
    d.loadtest = read_optional(run.loadtest_path, p)
    return d


def _load_sanity_and_search(d: RunData) -> None:
    p = d.problems
    for path in d.run.sanity_results():
        r = read_optional(path, p)
        if isinstance(r, dict) and "task" in r:
            d.sanity.append(r)
    if not d.sanity:  # an older layout: only the collected file
        collected = read_optional(d.run.sanity_summary_path, p)
        if isinstance(collected, dict):
            d.sanity = [r for r in collected.get("results", []) if isinstance(r, dict)]
    for path in d.run.search_results():
        r = read_optional(path, p)
        if isinstance(r, dict) and "task" in r and "method" in r:
            d.search[(r["task"], r["method"])] = r
