"""What the run directory holds, read defensively for the report.

:func:`load_run` reads every file the stages write, each through its :class:`RunDir`
path; a missing file leaves its field empty and an unreadable one is recorded in
``problems``, never an error.

Sources (see the writers for the exact fields): ``config.yaml``, ``env.json``,
``data.json``, ``timings.json`` (store.py, runner.py); ``models/<task>/<method>/
seed<seed>/metrics.json`` (train.py); ``sanity/*.json`` (sanity.py);
``search/<task>-<method>.json`` (search.py); ``extract/<task>/manifest.json``
(extract.py); ``drift/table3.json``, ``table4.json``, ``layers.json`` (drift.py);
``bench/serving.json`` (serving/bench.py); ``loadtest/loadtest.json``
(serving/loadtest.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..store import RunDir

STAGES = ("sanity", "search", "train", "extract", "drift", "bench", "report")


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
            from ..tasks import get_task

            return get_task(task).metric
        except KeyError:
            return "accuracy"


def _read(path: Path, problems: list[str], kind: str = "json") -> Any:
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
    cfg = _read(run.config_path, p, "yaml")
    d.config = cfg if isinstance(cfg, dict) else None
    d.env = _read(run.env_path, p)
    d.data = _read(run.data_path, p)
    d.timings = _read(run.timings_path, p)
    for task, method, seed in run.finished_jobs():
        metrics = _read(run.metrics_path(task, method, seed), p)
        if isinstance(metrics, dict):
            d.jobs[(task, method, seed)] = metrics
    _load_sanity_and_search(d)
    for man in run.extract_manifests():
        r = _read(man, p)
        if isinstance(r, dict):
            d.extract[man.parent.name] = r
    d.table3 = _read(run.drift_path("table3.json"), p)
    d.table4 = _read(run.drift_path("table4.json"), p)
    layers = _read(run.drift_path("layers.json"), p)
    d.layers = layers.get("rows") if isinstance(layers, dict) else None
    d.serving = _read(run.serving_path, p)
    d.loadtest = _read(run.loadtest_path, p)
    return d


def _load_sanity_and_search(d: RunData) -> None:
    p = d.problems
    for path in d.run.sanity_results():
        r = _read(path, p)
        if isinstance(r, dict) and "task" in r:
            d.sanity.append(r)
    if not d.sanity:  # an older layout: only the collected file
        collected = _read(d.run.sanity_summary_path, p)
        if isinstance(collected, dict):
            d.sanity = [r for r in collected.get("results", []) if isinstance(r, dict)]
    for path in d.run.search_results():
        r = _read(path, p)
        if isinstance(r, dict) and "task" in r and "method" in r:
            d.search[(r["task"], r["method"])] = r
