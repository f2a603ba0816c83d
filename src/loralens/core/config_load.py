"""Reading configs: defaults -> preset -> YAML file -> ``key=value`` overrides, each layer
merged into the validated dataclasses of :mod:`loralens.core.config` (unknown keys and bad
values are a :class:`~loralens.core.config.ConfigError` naming the key)."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from loralens.core.errors import ConfigError

from loralens.core.config import StudyConfig, merge

def parse_override(item: str) -> dict:
    """``a.b=value`` -> {"a": {"b": value}}; the value is parsed as YAML (1e-4, [1, 2], null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    value = _numbers(value)
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _numbers(value: Any) -> Any:
    """YAML 1.1 reads "1e-4" (no dot) as a string, also inside lists and mappings: take
    such strings as numbers."""
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, str) and any(c in value for c in ".eE"):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _load_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("loralens.presets").iterdir()
                  if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    path = Path(str(resources.files("loralens.presets").joinpath(f"{name}.yaml")))
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    return path


def load_config(preset: str | None = None, file: str | Path | None = None,
                overrides: list[str] | dict | None = None) -> StudyConfig:
    """Layer defaults -> preset -> file -> overrides and validate every key."""
    cfg = StudyConfig()
    if preset:
        path = preset_path(preset)
        cfg = _merge_from(cfg, _load_yaml(path), str(path))
        cfg = dataclasses.replace(cfg, preset=preset)
    if file:
        cfg = _merge_from(cfg, _load_yaml(Path(file)), str(file))
    if isinstance(overrides, dict):
        cfg = merge(StudyConfig, cfg, overrides)
    elif overrides:
        cfg = merge_overrides(cfg, overrides)
    return cfg


def merge_overrides(cfg: StudyConfig, overrides: list[str]) -> StudyConfig:
    """``cfg`` with ``key=value`` items layered on, validated together (so that
    ``methods=[.., mine]`` may come before the ``method_defs`` that defines ``mine``)."""
    combined: dict = {}
    for item in overrides:
        _deep_update(combined, parse_override(item))
    return merge(StudyConfig, cfg, combined) if combined else cfg


def _deep_update(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_update(into[k], v)
        else:
            into[k] = v


def _merge_from(cfg: StudyConfig, data: dict, source: str) -> StudyConfig:
    try:
        return merge(StudyConfig, cfg, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def config_from_dict(data: dict) -> StudyConfig:
    """Rebuild a resolved config (as stored in a run directory)."""
    return merge(StudyConfig, StudyConfig(), data)
