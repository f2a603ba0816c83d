"""One colour per method, the same in every figure of a report.

A method's colour is keyed by its position in the study's method list
(:attr:`run_data.RunData.methods`: the config's ``methods``, then any method present
in the run directory beyond them), taken from matplotlib's ``tab10`` qualitative palette
(``tab20`` beyond ten methods), so a study's figures never disagree about which colour
is which method and adding a method never repaints the others.
"""

from __future__ import annotations

from typing import Sequence

from matplotlib import colormaps
from matplotlib.colors import to_hex

from loralens.report.formatting import METHODS


def method_colors(methods: Sequence[str]) -> dict[str, str]:
    """``{method: "#rrggbb"}`` by position in ``methods`` (tab10; tab20 past ten)."""
    methods = list(dict.fromkeys(methods))
    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: to_hex(cmap(i % cmap.N)) for i, m in enumerate(methods)}


def method_color(d, method: str) -> str:
    """The colour of ``method`` in run ``d`` (a :class:`run_data.RunData`)."""
    return method_colors(d.methods + [method]).get(method, "#808080")


def method_label(method: str) -> str:
    """A method's display name in tables and legends (its key when it has none)."""
    return METHODS.get(method, method)
