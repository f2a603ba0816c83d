"""How many examples a property test (Hypothesis) draws.

The unit tier must stay fast on two cores, so it draws a quarter of a test's full number
(at least 10), always the same ones (``derandomize=True`` in the tests). Set
``LORALENS_PROPERTY_EXAMPLES=full`` to draw them all, e.g. before a release or after changing
what a property test covers."""

from __future__ import annotations

import os


def examples(full: int) -> int:
    """``full`` with LORALENS_PROPERTY_EXAMPLES=full, else a quarter of it (at least 10)."""
    if os.environ.get("LORALENS_PROPERTY_EXAMPLES", "").lower() == "full":
        return full
    return max(10, full // 4)
