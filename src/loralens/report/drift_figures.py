"""The drift figures: accuracy vs drift (Figure 1), drift reduction (Figure 2), layer-wise
drift (Figures 3 and 5) and outlier dimensions (Figure 7).

Each ``fig_*`` function takes the loaded run (:class:`run_data.RunData`) and returns a
matplotlib Figure, or a string saying why it cannot be drawn yet. Every method of the
study is drawn, in its colour (:func:`colors.method_color`: one per method, the same in
every figure).
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from loralens.report.accuracy_tables import mark_task, not_learned
from loralens.report.colors import method_color
from loralens.report.formatting import MEASURES, METHODS, finite
from loralens.report.run_data import RunData

MEASURE_STYLE = {"cka": ("#404040", ""), "cka_debiased": ("#8c8c8c", "//"),
                 "cosine": ("#c8c8c8", "..")}
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _method(m: str) -> str:
    return METHODS.get(m, m)


def drawn_methods(d: RunData, keys) -> list[str]:
    """The study's methods that have data among ``keys`` ((task, method, ...) tuples), in
    the study's order."""
    have = {k[1] for k in keys}
    return [m for m in d.methods if m in have]


# --------------------------------------------------------------------------- data helpers

def model_drift(d: RunData, measure: str = "drift",
                all_states: bool = False) -> dict[tuple[str, str, int], tuple[np.ndarray,
                                                                            np.ndarray]]:
    """Per model (task, method, seed): ``(states, values)`` of ``measure`` from layers.json,
    over the hidden states of drift.layers (every figure uses the same set; rows of an
    older drift stage carry no ``in_drift`` and count as selected). Similarities
    (``cka``, ``cka_debiased``, ``cosine``, ...) are turned into drift, 1 - value."""
    out: dict[tuple[str, str, int], dict[int, float]] = {}
    for r in d.layers or []:
        v = r.get(measure)
        if measure in SIMILARITIES and finite(v):
            v = 1.0 - v
        if r.get("method") is None or r.get("seed") is None:
            continue
        if not all_states and r.get("in_drift") is False:
            continue
        out.setdefault((r["task"], r["method"], int(r["seed"])), {})[int(r["layer"])] = (
            float(v) if finite(v) else math.nan)
    return {k: (np.array(sorted(v)), np.array([v[i] for i in sorted(v)]))
            for k, v in out.items()}


ZERO = 1e-9  # drift at rounding level (a head-only method's backbone is the base model's)
SIMILARITIES = ("cka", "cka_debiased", "cka_std", "cka_std_debiased", "cosine")


def n_states(d: RunData) -> int | None:
    """Hidden states of the model (embedding output + blocks), from layers.json."""
    layers = [int(r["layer"]) for r in d.layers or [] if finite(r.get("layer"))]
    return max(layers) + 1 if layers else None


def state_axis(d: RunData, states: np.ndarray) -> str:
    """The x-axis label of per-state figures: what the states are."""
    last = (n_states(d) or 0) - 1
    text = "transformer block" if states.size and states.min() > 0 else \
        "hidden state (0 = embedding output, i = block i)"
    return text + (f"; {last} = after the final norm" if last > 0 and last in states else "")


# --------------------------------------------------------------------------- figures

def fig_accuracy_vs_drift(d: RunData) -> Figure | str:
    # tasks share the axis: the debiased form, whose bias does not depend on each task's n
    form = "debiased" if any("cka_debiased" in r for r in d.layers or []) else "biased"
    drift = model_drift(d, "cka_debiased" if form == "debiased" else "cka")
    if not drift:
        return "needs drift/layers.json (the drift stage)"
    tasks = sorted({k[0] for k in drift}, key=lambda t: d.tasks.index(t) if t in d.tasks else 99)
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    plotted, all_x = 0, []
    methods = drawn_methods(d, drift)
    marked = set(not_learned(d))
    for ti, task in enumerate(tasks):
        for m in methods:
            xs, ys, seeds_drawn = [], [], []
            for (t, mm, s), (_, arr) in sorted(drift.items()):
                job = d.jobs.get((t, mm, s))
                if t != task or mm != m or not job:
                    continue
                score = job.get("score", (job.get("validation") or {}).get(d.metric(t)))
                x = float(np.nanmean(arr)) if arr.size else math.nan
                if finite(score) and math.isfinite(x):
                    xs.append(x)
                    ys.append(score)
                    seeds_drawn.append(s)
            all_x += xs
            if xs:
                ax.scatter(xs, ys, s=46, color=method_color(d, m),
                           marker=MARKERS[ti % len(MARKERS)], edgecolor="black", linewidth=0.5,
                           alpha=0.9, zorder=3)
                plotted += len(xs)
            bad = [(x, y) for x, y, s in zip(xs, ys, seeds_drawn) if (task, m, s) in marked]
            if bad:  # a model not above the majority class: crossed out
                ax.scatter(*zip(*bad), s=110, marker="x", color="black", linewidth=1.2, zorder=4)
    if not plotted:
        return "no trained model has both a drift value and a validation score"
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=method_color(d, m),
                      markeredgecolor="black", label=_method(m)) for m in methods]
    handles += [Line2D([], [], ls="", marker=MARKERS[i % len(MARKERS)], color="white",
                       markeredgecolor="black",
                       label=f"{t} ({d.metric(t)})") for i, t in enumerate(tasks)]
    if marked:
        handles.append(Line2D([], [], ls="", marker="x", color="black",
                              label="not above the majority class"))
    ax.legend(handles=handles, loc="best", frameon=True, ncols=2)
    # LoRA can drift orders of magnitude less than full fine-tuning: a linear axis would
    # squash its points onto x = 0.
    log = min(all_x) > ZERO and max(all_x) / min(all_x) > 30
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(f"mean drift over the states of drift.layers:\n1 − {form} linear CKA to "
                  "the base model" + (" (log scale)" if log else ""))
    f1_tasks = [t for t in tasks if d.metric(t) == "f1"]
    ax.set_ylabel("validation score (accuracy" + (f"; F1 for {', '.join(f1_tasks)}"
                                                   if f1_tasks else "") + ")")
    ax.set_title("Accuracy vs representation drift, one point per trained model")
    return fig


def fig_drift_reduction(d: RunData) -> Figure | str:
    entries = (d.table4 or {}).get("tasks") or []
    if not entries:
        return "needs drift/table4.json (the drift stage)"
    tasks = [e.get("task") for e in entries]
    measures = [m for m in MEASURES if any(m in (e.get("measures") or {}) for e in entries)]
    fig = Figure(figsize=(max(7.0, 1.9 * len(tasks) + 4.4), 4.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(measures), 1)
    x = np.arange(len(tasks))
    drew_ci = drew_any = False
    has_ci = any(isinstance(((e.get("measures") or {}).get(m) or {}).get("delta_percent_ci"),
                            list) for e in entries for m in measures)
    for j, m in enumerate(measures):
        vals, err_lo, err_hi, sig = [], [], [], []
        for e in entries:
            c = (e.get("measures") or {}).get(m) or {}
            v = c.get("delta_percent")
            vals.append(v if finite(v) else np.nan)
            interval = c.get("delta_percent_ci")
            if finite(v) and isinstance(interval, list) and all(finite(b) for b in interval):
                err_lo.append(max(v - interval[0], 0.0))
                err_hi.append(max(interval[1] - v, 0.0))
                drew_ci = True
            else:
                err_lo.append(np.nan)
                err_hi.append(np.nan)
            sig.append(bool(c.get("significant")))
        color, hatch = MEASURE_STYLE.get(m, ("gray", ""))
        pos = x - 0.4 + width * (j + 0.5)
        ax.bar(pos, vals, width, color=color, hatch=hatch, edgecolor="black", linewidth=0.6,
               label=MEASURES[m], zorder=2)
        drew_any = drew_any or any(np.isfinite(vals))
        ax.errorbar(pos, vals, yerr=[err_lo, err_hi], fmt="none", ecolor="black", capsize=3,
                    linewidth=1, zorder=3,
                    label="95% bootstrap CI" if j == 0 and has_ci else None)
        for p, v, hi, s in zip(pos, vals, err_hi, sig):
            if s and np.isfinite(v):
                top = v + (hi if np.isfinite(hi) else 0)
                ax.annotate("*", (p, top), ha="center", va="bottom", fontsize=13,
                            xytext=(0, 1), textcoords="offset points")
    if not drew_any:
        return "Δ% is undefined for every task (needs both methods)"
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [mark_task(d, t) for t in tasks])  # ‡: not above the majority class
    ax.set_xlabel("task")
    ax.set_ylabel("drift reduction Δ (%)\n100·(drift full − drift LoRA) / drift full")
    ax.set_title("Drift reduction of LoRA vs full fine-tuning"
                 + ("" if drew_ci else " (no CI: fewer than 2 seeds)"))
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i] == "95% bootstrap CI")
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    from matplotlib.lines import Line2D

    tested = any(((e.get("measures") or {}).get(m) or {}).get("significant") is not None
                 for e in entries for m in measures)
    if tested:
        handles.append(Line2D([], [], ls="", marker="$*$", color="black", markersize=9))
        labels.append("significant (family-corrected)")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              title="drift measure", frameon=False)
    ax.margins(y=0.12)
    return fig


def fig_layerwise(d: RunData, measures: tuple[str, ...], title: str) -> Figure | str:
    per = {m: model_drift(d, m) for m in measures}
    if not any(per.values()):
        return "needs drift/layers.json (the drift stage)"
    tasks = [t for t in d.tasks if any(k[0] == t for v in per.values() for k in v)]
    tasks += sorted({k[0] for v in per.values() for k in v} - set(tasks))
    fig = Figure(figsize=(max(4.2 * len(tasks), 6.0), 3.3 * len(measures) + 0.6),
                 layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(measures), len(tasks), squeeze=False))
    multi_seed = False
    legend: dict[str, object] = {}
    for i, measure in enumerate(measures):
        log = _needs_log(per[measure])
        for j, task in enumerate(tasks):
            ax = axes[i, j]
            shown = np.arange(0)
            for m in drawn_methods(d, per[measure]):
                curves = [c for (t, mm, _), c in sorted(per[measure].items())
                          if t == task and mm == m]
                if not curves:
                    continue
                layers = shown = curves[0][0]
                curves = [arr for st, arr in curves if np.array_equal(st, layers)]
                stack = np.vstack(curves)
                if log:  # zero (or rounding-level) drift has no place on a log axis
                    stack = np.where(stack > ZERO, stack, np.nan)
                mean = np.nanmean(stack, axis=0)
                (line,) = ax.plot(layers, mean, color=method_color(d, m), linewidth=1.8)
                handle: object = line
                if len(curves) > 1:
                    multi_seed = True
                    band = ax.fill_between(layers, np.nanmin(stack, axis=0),
                                           np.nanmax(stack, axis=0), color=method_color(d, m),
                                           alpha=0.22, linewidth=0)
                    handle = (band, line)
                legend.setdefault(f"{_method(m)}: mean of {len(curves)} seeds, band = min–max"
                                  if len(curves) > 1 else f"{_method(m)}: one seed", handle)
            name = mark_task(d, task)  # ‡: some model not above the majority class
            ax.set_title(name if len(measures) == 1 else f"{name}: {MEASURES[measure]}")
            ax.set_xlabel(state_axis(d, shown))
            if j == 0:
                ax.set_ylabel(f"drift, {MEASURES[measure]}" + (" (log scale)" if log else ""))
            if log:
                ax.set_yscale("log")
            else:
                ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title + ("" if multi_seed else "; one seed: no band"))
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside lower center",
                   ncols=min(len(legend), 2 if len(legend) > 3 else 3), frameon=False)
    return fig


def fig_outliers(d: RunData) -> Figure | str:
    """Per task: the top-1 / top-5 variance shares of the base model and of each method
    (top), and drift with plain vs standardised features, debiased CKA (bottom)."""
    rows = [r for r in d.layers or [] if r.get("in_drift") is not False]
    if not rows or not any(finite(r.get("var_top1")) for r in rows):
        return ("needs drift/layers.json with variance shares (a drift stage from before "
                "them did not write them: rerun `loralens drift`)")
    tasks = [t for t in d.tasks if any(r["task"] == t for r in rows)]
    tasks += sorted({r["task"] for r in rows} - set(tasks))
    fig = Figure(figsize=(max(4.4 * len(tasks), 6.0), 7.0), layout="constrained")
    axes = fig.subplots(2, len(tasks), squeeze=False)
    legend: dict[str, object] = {}
    methods = drawn_methods(d, [(r["task"], r.get("method")) for r in rows])

    def curve(task: str, method: str | None, key: str) -> tuple[np.ndarray, np.ndarray]:
        by: dict[int, list[float]] = {}
        for r in rows:
            if r["task"] == task and (method is None or r.get("method") == method):
                v = r.get(key)
                by.setdefault(int(r["layer"]), []).append(float(v) if finite(v) else np.nan)
        x = np.array(sorted(by))
        return x, np.array([np.nanmean(by[i]) if np.isfinite(by[i]).any() else np.nan
                            for i in x])

    for j, task in enumerate(tasks):
        top, bottom = axes[0, j], axes[1, j]
        for k, ls in (("1", "-"), ("5", ":")):
            x, y = curve(task, None, f"var_top{k}_base")
            (h,) = top.plot(x, y, color="black", ls=ls, lw=1.8)
            legend.setdefault(f"base model, top {k}", h)
            for m in methods:
                x, y = curve(task, m, f"var_top{k}")
                (h,) = top.plot(x, y, color=method_color(d, m), ls=ls, lw=1.2, alpha=0.9)
                legend.setdefault(f"{_method(m)}, top {k} (mean over seeds)", h)
        top.set_ylim(0, 1.02)
        top.set_title(task)
        top.set_xlabel(state_axis(d, x))
        drifts = {(task, m, key): curve(task, m, key) for m in methods
                  for key in ("cka_debiased", "cka_std_debiased")}
        log = _needs_log({(t, m, 0): 1.0 - y for (t, m, k), (_, y) in drifts.items()
                          if k == "cka_debiased"})
        for (_, m, key), (x, y) in drifts.items():
            ls, what = ("-", "plain") if key == "cka_debiased" else ("--", "standardised")
            y = 1.0 - y
            (h,) = bottom.plot(x, np.where(y > ZERO, y, np.nan) if log else y,
                               color=method_color(d, m), ls=ls, lw=1.6)
            legend.setdefault(f"{_method(m)}: drift, {what} features", h)
        bottom.set_xlabel(state_axis(d, x))
        if log:
            bottom.set_yscale("log")
        else:
            bottom.set_ylim(bottom=min(0.0, bottom.get_ylim()[0]))
        if j == 0:
            top.set_ylabel("share of the variance\nheld by the top 1 / top 5 dimensions")
            bottom.set_ylabel("drift, 1 − debiased linear CKA\n(mean over seeds"
                              + (", log scale)" if log else ")"))
        for ax in (top, bottom):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=3,
               frameon=False)
    fig.suptitle("Outlier dimensions: variance shares (top); drift, plain vs standardised "
                 "features (bottom)")
    return fig


def _needs_log(curves: dict, ratio: float = 20.0) -> bool:
    """True when one method's largest drift is ``ratio`` times the other's: on a linear
    axis the smaller curve would be a flat line at 0. ``curves``: (task, method, seed) ->
    values, or -> (states, values) as :func:`model_drift` gives them."""
    top = {}
    for (_, m, _), arr in curves.items():
        arr = arr[1] if isinstance(arr, tuple) else arr
        finite = arr[np.isfinite(arr)]
        if finite.size and finite.max() > ZERO:  # a head-only method's drift is 0: no scale
            top[m] = max(top.get(m, 0.0), float(finite.max()))
    if len(top) < 2 or min(top.values()) <= 0:
        return False
    return max(top.values()) / min(top.values()) > ratio
