"""What a drawn figure plots, read back from its matplotlib artists by their gid."""

from __future__ import annotations

import numpy as np


def plotted(fig) -> dict:
    """{gid: (n, 2) array of x, y} of a one-panel figure's scatter collections and lines,
    and its axes under "_ax"."""
    (ax,) = fig.axes  # one task: one panel
    out = {c.get_gid(): np.asarray(c.get_offsets()) for c in ax.collections if c.get_gid()}
    out.update({ln.get_gid(): np.column_stack([ln.get_xdata(), ln.get_ydata()])
                for ln in ax.lines if ln.get_gid()})
    return out | {"_ax": ax}
