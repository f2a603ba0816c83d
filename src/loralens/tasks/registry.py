"""The task registry: the built-in tasks (read from ``builtin/*.yaml`` on first use) and the
tasks read from task files in this process, by name.

Registration is explicit: :func:`resolve_config_tasks` (called by the study layer, the
server and the export commands on the config they load) reads a config's task files and
``task_defs`` and registers them, so later lookups by name find them; nothing registers as
a side effect of building a config.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from loralens.core.errors import ConfigError
from loralens.core.run_dir import RunDir
from loralens.tasks.spec import TaskSpec, builtin_paths
from loralens.tasks.task_file import TaskFileError, from_definition, is_builtin_file, load_task_file


@functools.cache
def _builtin(name: str) -> TaskSpec:
    return load_task_file(builtin_paths()[name])


class _Builtins(dict):
    """``TASKS``: the built-in tasks by name, read from their files on first access."""

    def __init__(self):
        super().__init__({n: None for n in builtin_paths()})

    def __getitem__(self, name: str) -> TaskSpec:
        super().__getitem__(name)  # KeyError for an unknown name
        return _builtin(name)

    def get(self, name, default=None):
        return self[name] if name in self else default

    def values(self):
        return [self[n] for n in self]

    def items(self):
        return [(n, self[n]) for n in self]


TASKS: dict[str, TaskSpec] = _Builtins()

# Tasks read from task files in this process (name -> spec); config validation and
# ``get_task(path)`` register them, so later lookups by name find them.
REGISTERED: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    """Make a task read from a file known by its name (a built-in name is refused: a task
    file must not change what ``sst2`` means)."""
    if spec.name in TASKS:
        raise TaskFileError(f"{spec.file}: name: {spec.name!r} is a built-in task; give your "
                            "task another name", "tasks")
    REGISTERED[spec.name] = spec
    return spec


def is_task_file(value: str) -> bool:
    """Whether a task argument names a file (a YAML path) rather than a task name."""
    return value.endswith((".yaml", ".yml")) or "/" in value or "\\" in value


def get_task(name: str, allow_file: bool = False) -> TaskSpec:
    """A task by built-in name (``sst2``, ``SST-2``), by the name of a task file read in
    this process, or, with ``allow_file`` (the command line, configs), by the path of a
    task file (read and registered). Off by default: a name from a request must never
    make a server read files."""
    if name in REGISTERED:
        return REGISTERED[name]
    key = name.lower().replace("-", "")
    if key in TASKS:
        return TASKS[key]
    if allow_file and is_task_file(name):
            return register(load_task_file(Path(name)))
    known = ", ".join([*TASKS, *REGISTERED])
    raise ConfigError(f"unknown task {name!r}; known tasks: {known}, or the path of a task "
                      "file (.yaml)", "tasks")


def task_key(value: str) -> str:
    """The name a task argument (a name or a task file's path) is known by in a run."""
    return get_task(value, allow_file=True).name


def resolve_tasks(entries: list[str], defs: dict) -> tuple[list[str], dict]:
    """The config's ``tasks`` as names, and the definitions of those read from task files.

    An entry is a built-in name, a task file's path (read, checked and registered under its
    name; its definition is kept, so a run directory's config describes the task without
    the file), or the name of a definition kept that way.
    """
    names, out = [], {}
    for entry in entries:
        if is_task_file(entry):
            spec = load_task_file(entry)
            if not (spec.name in TASKS and is_builtin_file(spec)):  # a built-in's own file
                out[spec.name] = {"file": spec.file, "task": spec.definition}
                register(spec)
        elif entry in defs:
            spec = register(from_definition(entry, defs[entry]))
            out[entry] = defs[entry]
        elif entry in TASKS:
            spec = get_task(entry)
        else:
            raise ConfigError(f"tasks: unknown task {entry!r}; known: {', '.join(TASKS)}, or "
                              "the path of a task file (.yaml)", "tasks")
        if spec.name in names:
            raise ConfigError(f"tasks: task {spec.name!r} is listed twice", "tasks")
        names.append(spec.name)
    return names, out


def register_definitions(defs: Any) -> list[str]:
    """Register the task definitions a run directory's config keeps (``task_defs``);
    returns a problem line for each that cannot be read (the report goes on without)."""
    problems = []
    for name, d in (defs or {}).items() if isinstance(defs, dict) else ():
        try:
            register(from_definition(name, d))
        except ConfigError as e:
            problems.append(f"config.yaml task_defs.{name}: {e}")
    return problems


def register_run_tasks(run_dir: str | Path) -> list[str]:
    """Register the task definitions kept in a run directory's ``config.yaml`` (for the
    commands that read a run directory without loading its config, e.g. ``serve``)."""
    path = RunDir(run_dir).config_path
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, yaml.YAMLError) as e:
        return [f"{path}: {e}"]
    return register_definitions(cfg.get("task_defs")) if isinstance(cfg, dict) else []


def resolve_config_tasks(cfg) -> None:
    """Resolve ``cfg.tasks`` (names and task files) into names and ``cfg.task_defs``,
    registering every task they define; check ``data.train_size_per_task`` names them."""
    cfg.tasks, cfg.task_defs = resolve_tasks(cfg.tasks, cfg.task_defs)
    for t in cfg.data.train_size_per_task:
        if t not in TASKS and t not in cfg.tasks:
            raise ConfigError(f"data.train_size_per_task: unknown task {t!r}; known: "
                              f"{', '.join([*TASKS, *cfg.tasks])}", "data.train_size_per_task")
