"""Which constraints files the environment was installed from: their sha256, recorded in
each run's environment record (``env.json``), so that a study can be traced to the exact
library versions it ran with (constraints.txt pins them; .ci/freeze_constraints.py writes
it, .ci/check_constraints.py checks an installed environment against it)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

FILES = ("constraints.txt", "constraints-test.txt")
ENV_DIR = "LORALENS_CONSTRAINTS_DIR"
"""Environment variable naming the directory of the constraints files, for an install
that is not a source checkout (the Dockerfile sets it to where it copied them)."""


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def constraints_dir() -> Path | None:
    """``$LORALENS_CONSTRAINTS_DIR``, else the source checkout loralens runs from (an
    editable install: the directory holding pyproject.toml and constraints.txt), else None."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    root = Path(__file__).resolve().parents[3]  # src/loralens/core/constraints.py
    if (root / "pyproject.toml").is_file() and (root / FILES[0]).is_file():
        return root
    return None


def constraints_record(directory: str | Path | None = None) -> dict[str, str]:
    """File name -> sha256 of each constraints file found in ``directory`` (default
    :func:`constraints_dir`); {} where there is none (an install from a wheel)."""
    d = Path(directory) if directory is not None else constraints_dir()
    if d is None:
        return {}
    return {name: sha256_file(d / name) for name in FILES if (d / name).is_file()}
