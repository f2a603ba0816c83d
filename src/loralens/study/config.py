"""A study config checked against the registries: tasks (built-in names, task files,
``task_defs``), methods (built-in names, ``method_defs``) and stages (``run.ray_resources``).

:mod:`loralens.core.config` checks each value's type and range and the config's own
consistency; it knows no registry. Every command that builds a config from a user's input
or a run directory passes it through :func:`check_config` once, which also registers the
tasks it defines (registration is explicit, never a side effect of building a config).
"""

from __future__ import annotations

from pathlib import Path

from loralens.core import config_load
from loralens.core.config import StudyConfig
from loralens.core.errors import ConfigError
from loralens.models.methods import validate_methods
from loralens.study.stages import STAGE_NAMES
from loralens.tasks.registry import resolve_config_tasks


def check_config(cfg: StudyConfig) -> StudyConfig:
    """Resolve and check ``cfg`` against the task, method and stage registries (in place);
    return it. Raises :class:`ConfigError` naming the key."""
    resolve_config_tasks(cfg)
    validate_methods(cfg)
    for stage in cfg.run.ray_resources:
        if stage != "default" and stage not in STAGE_NAMES:
            raise ConfigError(f"run.ray_resources: unknown stage {stage!r}; known: default, "
                              f"{', '.join(STAGE_NAMES)}", f"run.ray_resources.{stage}")
    return cfg


def load_config(preset: str | None = None, file: str | Path | None = None,
                overrides: list[str] | dict | None = None) -> StudyConfig:
    """:func:`loralens.core.config_load.load_config`, checked (:func:`check_config`)."""
    return check_config(config_load.load_config(preset, file, overrides))


def merge_overrides(cfg: StudyConfig, overrides: list[str]) -> StudyConfig:
    """:func:`loralens.core.config_load.merge_overrides`, checked (:func:`check_config`)."""
    return check_config(config_load.merge_overrides(cfg, overrides))


def config_from_dict(data: dict) -> StudyConfig:
    """:func:`loralens.core.config_load.config_from_dict`, checked (:func:`check_config`)."""
    return check_config(config_load.config_from_dict(data))
