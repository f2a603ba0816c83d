"""Figure 8: per-layer intruder dimensions and weight change beside per-layer activation drift.

Takes the loaded run (:class:`run_data.RunData`); returns a matplotlib Figure, or a string
saying why it cannot be drawn yet. Transformer layer ``i`` (0-based, its q/v matrices)
is drawn at block ``i + 1``, the hidden state it writes.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from loralens.report.colors import method_color
from loralens.report.drift_figures import drawn_methods, model_drift
from loralens.report.formatting import METHODS
from loralens.report.run_data import RunData
from loralens.report.weight_tables import weight_data

EPSILON = "0.5"


def per_layer(d: RunData) -> dict[tuple[str, str, int], dict[str, dict[int, float]]]:
    """Per model: {"intruders": {block: count summed over the compared matrices},
    "rel_change": {block: mean ||dW||/||W0||}, "drift": {block: 1 - debiased CKA}}."""
    out: dict = {}
    for r in weight_data(d)["layers"] or []:
        if r.get("group") != "common":
            continue
        m = out.setdefault((r["task"], r["method"], int(r["seed"])),
                           {"intruders": {}, "rel": {}, "drift": {}})
        b = int(r["layer"]) + 1
        m["intruders"][b] = m["intruders"].get(b, 0) + r[f"intruders_{EPSILON}"]
        m["rel"].setdefault(b, []).append(r["rel_change"])
    for m in out.values():
        m["rel_change"] = {b: float(np.mean(v)) for b, v in m.pop("rel").items()}
    for key, (states, values) in model_drift(d, "cka_debiased").items():
        if key in out:
            out[key]["drift"] = {int(s): float(v) for s, v in zip(states, values)}
    return out


def _mean_curve(models: list[dict], what: str) -> tuple[np.ndarray, np.ndarray]:
    blocks = sorted(set.intersection(*(set(m[what]) for m in models))) if models else []
    return (np.array(blocks),
            np.array([np.mean([m[what][b] for m in models]) for b in blocks]))


def spearman(models: list[dict]) -> float | None:
    """Spearman correlation, over blocks, of the mean weight change and the mean drift."""
    from scipy.stats import spearmanr

    xb, x = _mean_curve(models, "rel_change")
    yb, y = _mean_curve(models, "drift")
    common = sorted(set(xb) & set(yb))
    if len(common) < 3:
        return None
    xs = [x[list(xb).index(b)] for b in common]
    ys = [y[list(yb).index(b)] for b in common]
    if np.ptp(xs) == 0 or np.ptp(ys) == 0:  # constant (a head-only method): undefined
        return None
    rho = spearmanr(xs, ys).statistic
    return float(rho) if np.isfinite(rho) else None


PANELS = (("intruders", f"intruders (ε = {EPSILON})"), ("rel_change", "‖W − W0‖ / ‖W0‖"),
          ("drift", "drift (1 − debiased CKA)"))


def fig_layerwise_intruders(d: RunData) -> Figure | str:
    data = per_layer(d)
    if not data:
        return "needs weightspace/layers.json (the weights stage)"
    tasks = [t for t in d.tasks if any(k[0] == t for k in data)]
    fig = Figure(figsize=(11, 2.6 * len(tasks) + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(tasks), 3, squeeze=False))
    for row, task in zip(axes, tasks):
        for method in drawn_methods(d, data):
            models = [v for k, v in data.items() if k[0] == task and k[1] == method]
            if not models:
                continue
            rho = spearman(models)
            label = METHODS.get(method, method) + (f" (ρ = {rho:+.2f})" if rho is not None
                                                   else "")
            for ax, (what, _) in zip(row, PANELS):
                x, y = _mean_curve(models, what)
                if x.size:
                    ax.plot(x, y, marker="o", ms=2.5, lw=1.2, color=method_color(d, method),
                            label=label if what == "drift" else METHODS.get(method, method))
        for ax, (_, title) in zip(row, PANELS):
            ax.set_title(f"{task}: {title}")
            ax.set_xlabel("transformer block")
        row[0].set_ylim(0, max(1.0, row[0].get_ylim()[1]))  # counts: never below 0
        row[0].yaxis.set_major_locator(MaxNLocator(integer=True))
        row[2].legend(loc="best", title="ρ: Spearman, change vs drift", title_fontsize=8)
    return fig
