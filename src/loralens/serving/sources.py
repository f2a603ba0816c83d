"""Which adapters to serve: run directories (every finished LoRA job's adapter, found
through :class:`~loralens.core.run_dir.RunDir`), adapter directories, or ``NAME=DIR``; their
names and tasks; copies for load tests."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from loralens.core.run_dir import RunDir
from loralens.models.cards import read_record
from loralens.models.methods import STUDY_LORA, is_study_lora
from loralens.tasks.registry import get_task
from loralens.serving.backends import AdapterError

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$"  # also in the OpenAPI schema
_NAME = re.compile(NAME_PATTERN.replace("$", r"\Z"))  # Python's $ also matches before a "\n"
NAME_RULE = "use letters, digits and _ . @ + - (at most 128 characters)"


def valid_name(name: str) -> bool:
    """An adapter name the server accepts (it appears in URLs and logs)."""
    return bool(_NAME.match(name))


@dataclass
class AdapterSpec:
    name: str
    path: Path
    task: str | None = None


def _known_task(task: str) -> str | None:
    try:
        get_task(task)
    except (KeyError, ValueError):  # tasks.get_task raises ConfigError (a ValueError)
        return None
    return task


def task_of(path: Path) -> tuple[str | None, str]:
    """(task, default name) of an adapter dir laid out as models/<task>/lora/seed<s>/adapter."""
    parts = path.resolve().parts
    if len(parts) >= 5 and parts[-1] == "adapter" and is_study_lora(parts[-3]) \
            and parts[-2].startswith("seed") and parts[-5] == "models":
        from loralens.tasks.registry import register_run_tasks

        register_run_tasks(Path(*parts[:-5]))  # tasks from task files: their label names
        return _known_task(parts[-4]), f"{parts[-4]}-{parts[-2]}"
    name = path.parent.name if path.name == "adapter" else path.name
    return None, name


def collect_adapters(sources: Sequence[str]) -> tuple[list[AdapterSpec], Path | None]:
    """Adapters named by ``sources``: run directories (every LoRA adapter in them),
    adapter directories, or ``name=directory``. Returns (specs, run dir if one was given)."""
    specs: list[AdapterSpec] = []
    run_dir = None
    for src in sources:
        name = None
        if "=" in src and not Path(src).exists():
            name, src = src.split("=", 1)
        path = Path(src)
        run = RunDir(path)
        if name is None and run.is_run_dir():
            run_dir = run_dir or path
            found = run.adapters(STUDY_LORA)
            if not found:
                raise AdapterError(f"{path}: run directory without trained LoRA adapters "
                                   "(finished jobs of models/<task>/lora/seed<seed>/)")
            specs += [AdapterSpec(f"{task}-seed{seed}", d, _known_task(task))
                      for task, seed, d in found]
            continue
        if not (path / "adapter_config.json").is_file():
            raise AdapterError(f"{path}: neither a run directory (config.yaml) nor a "
                               "PEFT adapter directory (adapter_config.json)")
        task, default = task_of(path)
        specs.append(AdapterSpec(name or default, path, task))
    seen = set()
    for s in specs:
        if not valid_name(s.name):
            raise AdapterError(f"adapter name {s.name!r} ({s.path}): {NAME_RULE}")
        if s.name in seen:
            raise AdapterError(f"two adapters named {s.name!r}; name them with NAME=DIR")
        seen.add(s.name)
    return specs, run_dir


def recorded_max_length(specs: Sequence[AdapterSpec]) -> int | None:
    """The training ``max_length`` that the adapters' model cards record (the card's
    ``loralens`` block that ``loralens export`` writes, :func:`loralens.models.cards.read_record`,
    as ``predict`` reads it), for serving bare adapter directories without ``--max-length``:
    inputs are then cut where training cut them. The largest when the cards differ (no
    adapter sees less than it was trained on; logged), None when no card records one."""
    found = {s.name: ml for s in specs
             if isinstance(ml := read_record(s.path).get("max_length"), int) and ml > 0}
    if len(set(found.values())) > 1:
        listed = ", ".join(f"{name} {ml}" for name, ml in found.items())
        log.warning(f"the adapters' cards record different max_length ({listed}): serving "
                    f"with the largest, {max(found.values())}; set --max-length to choose")
    return max(found.values(), default=None)


@dataclass(frozen=True)
class Served:
    """What ``loralens serve SOURCES`` serves: the adapters (copies included), the run
    directory among the sources (or None) with its config, and the truncation length."""
    specs: list[AdapterSpec]
    run_dir: Path | None
    run_cfg: object | None  # the run's StudyConfig
    max_length: int


def served(sources: Sequence[str], max_length: int | None = None,
           copies: int = 0) -> Served:
    """The adapters of ``sources`` (:func:`collect_adapters`; the run's tasks registered),
    at least ``copies`` of them (:func:`replicate`), and the truncation length:
    ``max_length`` when given, else the run's ``data.max_length``, else the training
    ``max_length`` the adapters' cards record (:func:`recorded_max_length`, as predict),
    else 384. One place for the one-process server and the Ray Serve replicas."""
    from loralens.tasks.registry import resolve_config_tasks

    specs, run_dir = collect_adapters(sources)
    run_cfg = RunDir(run_dir).load_config() if run_dir is not None else None
    if run_cfg is not None:
        resolve_config_tasks(run_cfg)
    length = max_length or (run_cfg.data.max_length if run_cfg is not None
                            else recorded_max_length(specs) or 384)
    if copies:
        specs = replicate(specs, copies)
    return Served(specs, run_dir, run_cfg, length)


def replicate(specs: list[AdapterSpec], n: int) -> list[AdapterSpec]:
    """At least ``n`` adapters: the given ones, then copies named ``<name>@2``, ``@3``...

    For load tests that need more adapters than a run trained: each copy is a
    separate adapter to every backend (its own slot, PEFT adapter or merged
    model); the cost of serving does not depend on the factor values.
    """
    out = list(specs)
    k = 0
    while len(out) < n:
        s = specs[k % len(specs)]
        out.append(AdapterSpec(f"{s.name}@{k // len(specs) + 2}", s.path, s.task))
        k += 1
    return out
