"""Files written whole or not at all: atomic writes of files and directories (a temporary
name beside the target, fsync, rename), JSON and CSV, and a clear error when the disk fills.

Every file loralens writes goes through :func:`atomic_path` (a directory through
:func:`atomic_dir`), so a killed process leaves either the old file or the new one, never
half of one; a full disk is a :class:`DiskFullError` naming the file and the space left.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from loralens.core.errors import DiskFullError
from loralens.core.leftovers import temp_prefix

_UMASK = os.umask(0)
os.umask(_UMASK)


def _disk_full(e: BaseException, path: Path) -> BaseException:
    """``e`` as a :class:`DiskFullError` naming ``path`` when it is an out-of-space error."""
    if isinstance(e, DiskFullError) or not isinstance(e, Exception):
        return e
    # OSError from Python; a plain Exception "... (os error 28)" from Rust writers
    # (tokenizers, safetensors)
    if not (e.errno in (errno.ENOSPC, errno.EDQUOT) if isinstance(e, OSError)
            else "(os error 28)" in str(e) or "(os error 122)" in str(e)):
        return e
    try:
        free = f"{shutil.disk_usage(path.parent).free} bytes free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(errno.ENOSPC, f"no space left on the device writing {path} ({free}); "
                                  "free some space and rerun: finished work is kept")


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


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Write a file atomically: yields a temporary path beside ``path``; on success the
    file is fsynced and renamed onto ``path``, on any error (or a kill) ``path`` keeps its
    old content and the temporary file is removed. ``suffix`` keeps writers that pick a
    format from the extension (matplotlib, numpy) working.

    The one atomic-write helper: every file loralens writes goes through it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # named after this process: a later command removes it if a kill left it (leftovers.py)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = _disk_full(e, path)
        if full is not e:
            raise full from e
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Write a directory atomically: yields an empty temporary directory beside ``path``;
    on success its files are fsynced and it replaces ``path`` (an old ``path`` is moved
    aside first and removed after). On an error the temporary directory is removed and
    ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~_UMASK)
        old = None
        if path.exists():
            old = path.parent / f"{temp_prefix(path.name)}old"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _disk_full(e, path)
        if full is not e:
            raise full from e
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")


def csv_text(rows: Iterable[dict], columns: Sequence[str] | None = None) -> str:
    """CSV of dict rows. ``columns`` default: every key in first-seen order. ``None`` and
    non-finite floats become empty cells, floats keep ``repr`` precision, lists are joined
    with ``;``."""
    rows = list(rows)
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    if not columns:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_cell(r.get(k)) for k in columns})
    return buf.getvalue()


def _csv_cell(v: Any) -> str:
    v = _clean(v)  # numpy scalars to Python, NaN/inf to None
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        return ";".join(_csv_cell(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


def write_csv(path: str | Path, rows: Iterable[dict], columns: Sequence[str] | None = None) -> None:
    """The one CSV writer: :func:`csv_text`, written atomically."""
    atomic_write_text(path, csv_text(rows, columns))


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)
