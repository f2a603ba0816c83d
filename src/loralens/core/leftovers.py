"""Temporary files of atomic writes, named after their writer, and the removal of those a
killed writer left behind.

:func:`loralens.core.files.atomic_path` and :func:`~loralens.core.files.atomic_dir` write beside
the target under a temporary name and rename it at the end. A SIGKILL (or a power cut)
skips their cleanup, so the temporary file stays: never in the target's place, but
litter in a run directory that is copied and published. Each temporary name carries the
writer's host and process id (``.<name>.tmp-<host>-<pid>-<random>``), so a later command
can tell a dead writer's leftover from a live worker's file in progress: it removes
those of processes of this host that no longer run, and leaves every other one alone
(another machine's worker may still be writing).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

_TEMP = re.compile(r"^\..+\.tmp-(?P<host>.+)-(?P<pid>\d+)-\w+(\.\w+)?$")


def temp_prefix(name: str) -> str:
    """The prefix of a temporary name for a file or directory called ``name``."""
    return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (the job table, the search's trials and
    atomic writes tell a dead worker's leftovers by it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def stale_temporaries(root: str | Path) -> list[Path]:
    """Temporary files and directories under ``root`` whose writer, a process of this
    host, no longer runs."""
    host = socket.gethostname()
    out = []
    for p in Path(root).rglob(".*.tmp-*"):
        m = _TEMP.match(p.name)
        if m and m["host"] == host and not pid_alive(int(m["pid"])):
            out.append(p)
    return sorted(out)


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Remove :func:`stale_temporaries` (a killed writer's leftovers); returns them."""
    gone = stale_temporaries(root)
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone
