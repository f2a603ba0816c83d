"""The errors loralens raises for bad input and bad state, each with a message that names the
file, line or key to blame. They live here, at the bottom, so every part can raise them.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration key, type or value is wrong; the message names it (``key``: the
    dotted key, where one is to blame)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class RunDirError(RuntimeError):
    """The run directory conflicts with what was asked (e.g. a different config)."""


class DiskFullError(OSError):
    """A write ran out of space (ENOSPC/EDQUOT); names the file and the space left. The
    temporary file is removed and the target keeps its old content, so freeing space and
    rerunning resumes."""
