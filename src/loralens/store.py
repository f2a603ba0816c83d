"""The run directory: layout, atomic writes, provenance, and the "already done" rule.

Layout (every stage reads what the earlier ones wrote)::

    RUN_DIR/
      config.yaml            resolved config of the run (written once; later stages read it)
      env.json               package versions, git commit, hardware, per invocation
      data.json              row counts per task and split actually used
      models/<task>/<method>/seed<seed>/
          adapter/           LoRA: PEFT format (adapter_model.safetensors, head included)
          model/             full fine-tuning: model.safetensors + config.json
          metrics.json       written last: its presence marks the job as finished

Every file is written to a temporary name and renamed into place, so a killed
process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

_UMASK = os.umask(0)
os.umask(_UMASK)

PACKAGES = ("loralens", "torch", "transformers", "peft", "datasets", "accelerate", "optuna",
            "numpy", "scipy", "safetensors", "gguf", "tokenizers", "matplotlib")


# Keys that may differ between the machines that share one run directory.
MACHINE_LOCAL = {"data.glue_dir", "search.storage"}


class RunDirError(RuntimeError):
    """The run directory conflicts with what was asked (e.g. a different config)."""


def _clean(obj: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


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


def environment() -> dict:
    """Versions, commit and hardware, recorded in each run directory."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    hw = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
    return {"python": platform.python_version(), "packages": versions, "git_commit": git_commit(),
            "hardware": hw}


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- config
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    def bind_config(self, cfg) -> None:
        """Store the resolved config, or check it equals the stored one.

        A run directory holds one study; running it again with different settings
        would mix results, so a difference is an error naming the keys.
        """
        new = cfg.to_dict()
        if self.config_path.is_file():
            with open(self.config_path) as f:
                old = yaml.safe_load(f) or {}
            diffs = [d for d in _diff(old, new) if d[0] not in MACHINE_LOCAL]
            if diffs:
                shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:8])
                raise RunDirError(f"{self.config_path} was written with other settings ({shown}); "
                                  "use another --run-dir, or the stored settings")
            return
        atomic_write_text(self.config_path, yaml.safe_dump(new, sort_keys=False))

    def load_config(self):
        from .config import config_from_dict

        if not self.config_path.is_file():
            raise RunDirError(f"{self.root} is not a run directory (no config.yaml)")
        with open(self.config_path) as f:
            return config_from_dict(yaml.safe_load(f) or {})

    def record_environment(self, stage: str) -> None:
        env = environment()
        path = self.root / "env.json"
        data = read_json(path) if path.is_file() else {}
        data[stage] = env
        atomic_write_json(path, data)

    def record_data(self, task: str, stats: dict) -> None:
        path = self.root / "data.json"
        data = read_json(path) if path.is_file() else {}
        data[task] = stats
        atomic_write_json(path, data)

    # ---- models
    def job_dir(self, task: str, method: str, seed: int) -> Path:
        return self.root / "models" / task / method / f"seed{seed}"

    def job_done(self, task: str, method: str, seed: int) -> bool:
        return (self.job_dir(task, method, seed) / "metrics.json").is_file()

    def finished_jobs(self) -> list[tuple[str, str, int]]:
        out = []
        for m in sorted((self.root / "models").glob("*/*/seed*/metrics.json")):
            seed_dir = m.parent
            out.append((seed_dir.parent.parent.name, seed_dir.parent.name,
                        int(seed_dir.name[4:])))
        return out


def _diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def asdict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
