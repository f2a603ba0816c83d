"""Figure 2 of a study with more than two methods: each method's drift beside the
reference method's, from ``drift/methods.json``
(:func:`loralens.analysis.drift.stage.method_drift`).

Also :func:`legend_labels`, the text of every legend of a drawn figure, which
:func:`figures.draw_all` stores beside the figures (``figures/legends.json``) so that a
reader, or a test, can check which methods a figure names without reading pixels.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from loralens.report.colors import method_color, method_label
from loralens.report.formatting import MEASURES, finite
from loralens.report.run_data import RunData

MEASURE = "cka_debiased"  # tasks share the axis: the form whose bias does not depend on n


def fig_method_drift(d: RunData) -> Figure | str:
    """Per task, one bar per method: mean drift (1 − debiased linear CKA, averaged over
    drift.layers) with the seeds' min–max as error bars; * significant against the
    reference after Bonferroni; a head-only method's bar is 0 by construction."""
    from loralens.report.accuracy_tables import mark_task
    from loralens.report.methods_report import method_results

    res = method_results(d)["drift"] or {}
    rows = [r for r in res.get("rows") or [] if r.get("measure") == MEASURE
            and finite(r.get("mean"))]
    if not rows:
        return "needs drift/methods.json (the drift stage, with more than two methods)"
    tasks = [t for t in d.tasks if any(r["task"] == t for r in rows)]
    methods = [m for m in d.methods if any(r["method"] == m for r in rows)]
    ref = res.get("reference_method", "full")
    fig = Figure(figsize=(max(6.4, 1.1 * len(tasks) * len(methods) + 3.0), 4.2),
                 layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(methods)
    by = {(r["task"], r["method"]): r for r in rows}
    for j, m in enumerate(methods):
        pos = np.arange(len(tasks)) - 0.4 + width * (j + 0.5)
        vals, lo, hi = [], [], []
        for t in tasks:
            r = by.get((t, m)) or {}
            v = r.get("mean") if finite(r.get("mean")) else np.nan
            seeds = [x for x in (r.get("per_seed") or {}).values() if finite(x)]
            vals.append(v)
            lo.append(v - min(seeds) if len(seeds) > 1 else 0.0)
            hi.append(max(seeds) - v if len(seeds) > 1 else 0.0)
        name = method_label(m) + (" (reference)" if m == ref else "")
        ax.bar(pos, vals, width, color=method_color(d, m), edgecolor="black", linewidth=0.6,
               label=name, zorder=2)
        ax.errorbar(pos, vals, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], fmt="none",
                    ecolor="black", capsize=3, linewidth=1, zorder=3)
        for p, t, v, h in zip(pos, tasks, vals, hi):
            r = by.get((t, m)) or {}
            if r.get("significant") and np.isfinite(v):
                ax.annotate("*", (p, v + h), ha="center", va="bottom", fontsize=13,
                            xytext=(0, 1), textcoords="offset points")
            elif r.get("family") == "head":
                ax.annotate("0 by\nconstruction", (p, 0), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
    # ‡: a task where some model is not above the majority class (caption, Table 3d)
    ax.set_xticks(np.arange(len(tasks)), [mark_task(d, t) for t in tasks])
    ax.set_xlabel("task")
    ax.set_ylabel(f"drift, {MEASURES[MEASURE]}\n(mean over the states of drift.layers)")
    ax.set_title(f"Drift per method; * differs from {method_label(ref)} (Bonferroni)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method (error bars: "
              "min–max over seeds)", title_fontsize=8, frameon=False)
    ax.margins(y=0.15)
    return fig


def legend_labels(fig: Figure) -> list[str]:
    """Every legend entry of ``fig`` (figure legends and each axes' legend), in order,
    without repeats."""
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    seen: dict[str, None] = {}
    for lg in legends:
        for text in lg.get_texts():
            seen.setdefault(text.get_text(), None)
    return list(seen)
