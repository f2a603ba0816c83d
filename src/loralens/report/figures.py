"""The report's figures, drawn with matplotlib's object API (no pyplot, no global backend).

Each ``fig_*`` function takes the loaded run (:class:`run_data.RunData`) and returns a
matplotlib Figure, or a string saying why it cannot be drawn yet. :func:`draw_all`
saves every figure as PNG and SVG under ``report/figures/`` (atomically, through
:func:`store.atomic_path`). Colours are fixed per method and serving strategy across
figures: LoRA blue, full fine-tuning vermillion (Okabe-Ito, colour-blind safe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..store import atomic_path
from .formatting import KINDS, MEASURES, METHODS, finite
from .run_data import RunData

COLORS = {"lora": "#0072B2", "full": "#D55E00"}
KIND_COLORS = {"full": "#D55E00", "lora_merged": "#009E73", "lora_separate": "#56B4E9",
               "lora_runtime": "#CC79A7"}
MEASURE_STYLE = {"cka": ("#404040", ""), "cka_debiased": ("#8c8c8c", "//"),
                 "cosine": ("#c8c8c8", "..")}
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
RC = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
      "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.spines.top": False,
      "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
      "svg.hashsalt": "loralens-report", "svg.fonttype": "path"}
DPI = 150


@dataclass
class FigureFile:
    id: str
    title: str
    caption: str
    png: Path
    svg: Path


def _method(m: str) -> str:
    return METHODS.get(m, m)


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
    for ti, task in enumerate(tasks):
        for m in ("lora", "full"):
            xs, ys = [], []
            for (t, mm, s), (_, arr) in sorted(drift.items()):
                job = d.jobs.get((t, mm, s))
                if t != task or mm != m or not job:
                    continue
                score = job.get("score", (job.get("validation") or {}).get(d.metric(t)))
                x = float(np.nanmean(arr)) if arr.size else math.nan
                if finite(score) and math.isfinite(x):
                    xs.append(x)
                    ys.append(score)
            all_x += xs
            if xs:
                ax.scatter(xs, ys, s=46, color=COLORS.get(m, "gray"),
                           marker=MARKERS[ti % len(MARKERS)], edgecolor="black", linewidth=0.5,
                           alpha=0.9, zorder=3)
                plotted += len(xs)
    if not plotted:
        return "no trained model has both a drift value and a validation score"
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=COLORS[m], markeredgecolor="black",
                      label=_method(m)) for m in ("lora", "full")]
    handles += [Line2D([], [], ls="", marker=MARKERS[i % len(MARKERS)], color="white",
                       markeredgecolor="black",
                       label=f"{t} ({d.metric(t)})") for i, t in enumerate(tasks)]
    ax.legend(handles=handles, loc="best", frameon=True, ncols=2)
    # LoRA can drift orders of magnitude less than full fine-tuning: a linear axis would
    # squash its points onto x = 0.
    log = min(all_x) > 0 and max(all_x) / min(all_x) > 30
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
    ax.set_xticks(x, tasks)
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
        labels.append("significant (Bonferroni)")
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
            for m in ("lora", "full"):
                curves = [c for (t, mm, _), c in sorted(per[measure].items())
                          if t == task and mm == m]
                if not curves:
                    continue
                layers = shown = curves[0][0]
                curves = [arr for st, arr in curves if np.array_equal(st, layers)]
                stack = np.vstack(curves)
                if log:  # zero (or rounding-negative) drift has no place on a log axis
                    stack = np.where(stack > 0, stack, np.nan)
                mean = np.nanmean(stack, axis=0)
                (line,) = ax.plot(layers, mean, color=COLORS[m], linewidth=1.8)
                handle: object = line
                if len(curves) > 1:
                    multi_seed = True
                    band = ax.fill_between(layers, np.nanmin(stack, axis=0),
                                           np.nanmax(stack, axis=0), color=COLORS[m],
                                           alpha=0.22, linewidth=0)
                    handle = (band, line)
                legend.setdefault(f"{_method(m)}: mean of {len(curves)} seeds, band = min–max"
                                  if len(curves) > 1 else f"{_method(m)}: one seed", handle)
            ax.set_title(f"{task}" if len(measures) == 1 else f"{task}: {MEASURES[measure]}")
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
                   ncols=min(len(legend), 4), frameon=False)
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
            for m in ("lora", "full"):
                x, y = curve(task, m, f"var_top{k}")
                (h,) = top.plot(x, y, color=COLORS[m], ls=ls, lw=1.2, alpha=0.9)
                legend.setdefault(f"{_method(m)}, top {k} (mean over seeds)", h)
        top.set_ylim(0, 1.02)
        top.set_title(task)
        top.set_xlabel(state_axis(d, x))
        drifts = {(task, m, key): curve(task, m, key) for m in ("lora", "full")
                  for key in ("cka_debiased", "cka_std_debiased")}
        log = _needs_log({(t, m, 0): 1.0 - y for (t, m, k), (_, y) in drifts.items()
                          if k == "cka_debiased"})
        for (_, m, key), (x, y) in drifts.items():
            ls, what = ("-", "plain") if key == "cka_debiased" else ("--", "standardised")
            y = 1.0 - y
            (h,) = bottom.plot(x, np.where(y > 0, y, np.nan) if log else y, color=COLORS[m],
                               ls=ls, lw=1.6)
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
        if finite.size:
            top[m] = max(top.get(m, 0.0), float(finite.max()))
    if len(top) < 2 or min(top.values()) <= 0:
        return False
    return max(top.values()) / min(top.values()) > ratio


def latencies(serving: dict | None, task: str, batch: int, kind: str) -> np.ndarray:
    """Every timed request's latency (ms) of one strategy, seeds pooled (serving.json)."""
    out: list[float] = []
    for seed in (((serving or {}).get("tasks") or {}).get(task) or {}).get("seeds", {}).values():
        k = (((seed.get("batch") or {}).get(str(batch)) or {}).get("kinds") or {}).get(kind) or {}
        out += [1e3 * v for v in k.get("latency_s") or [] if finite(v)]
    return np.asarray(out, dtype=np.float64)


def mean_ci_ms(x: np.ndarray, n_resamples: int = 2000, seed: int = 0
               ) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of the mean; latencies are right-skewed, so the
    interval is asymmetric and never below 0 (mean ± sd often is)."""
    if x.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def fig_latency(d: RunData) -> Figure | str:
    comp = (d.serving or {}).get("comparison") or []
    if not comp:
        return "needs bench/serving.json (the serving benchmark)"
    tasks = list(dict.fromkeys(r["task"] for r in comp))
    batches = sorted({r["batch_size"] for r in comp})
    fig = Figure(figsize=(max(4.6 * len(tasks), 6.0), 3.8 * len(batches) + 0.4),
                 layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(batches), len(tasks), squeeze=False))
    for i, b in enumerate(batches):
        for j, task in enumerate(tasks):
            ax = axes[i, j]
            rows = {r["kind"]: r for r in comp if r["task"] == task and r["batch_size"] == b}
            kinds = [k for k in KINDS if k in rows]
            x = np.arange(len(kinds))
            means = [rows[k].get("mean_ms", np.nan) for k in kinds]
            p95 = [rows[k].get("p95_ms", np.nan) for k in kinds]
            lo, hi, how = [], [], set()
            for k, mean in zip(kinds, means):
                ci = mean_ci_ms(latencies(d.serving, task, b, k))
                if ci is None:  # no raw latencies stored: fall back to the sd
                    sd = rows[k].get("sd_ms") or 0.0
                    ci, _ = (max(mean - sd, 0.0), mean + sd), how.add("mean ± sd")
                else:
                    how.add("95% CI of the mean (bootstrap)")
                lo.append(max(mean - ci[0], 0.0))
                hi.append(max(ci[1] - mean, 0.0))
            ax.bar(x, means, 0.62, color=[KIND_COLORS.get(k, "gray") for k in kinds],
                   edgecolor="black", linewidth=0.6, zorder=2)
            ax.errorbar(x, means, yerr=[lo, hi], fmt="none", ecolor="black", capsize=4,
                        zorder=3, label="mean, " + " / ".join(sorted(how)))
            ax.scatter(x, p95, marker="D", s=22, color="black", zorder=4, label="p95")
            for xi, k, mean, up, q in zip(x, kinds, means, hi, p95):
                ov = rows[k].get("overhead_vs_full_pct")
                if finite(ov):
                    top = max(v for v in (mean + up, q) if finite(v))
                    text = "±0.0%" if abs(ov) < 0.05 else f"{ov:+.1f}%"
                    ax.annotate(text, (xi, top), xytext=(0, 5), textcoords="offset points",
                                ha="center", va="bottom", fontsize=8.5, fontweight="bold")
            ax.set_xticks(x, [KINDS[k].replace(" (", "\n(").replace(", ", ",\n") for k in kinds])
            ax.set_ylabel("latency per request (ms)")
            ax.set_title(f"{task}, batch {b}")
            tops = [v for m_, up, q in zip(means, hi, p95) for v in (m_ + up, q)
                    if finite(v)]
            ax.set_ylim(0, 1.16 * max(tops) if tops else None)  # room for the labels
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)
    fig.suptitle("Serving latency per strategy (labels: mean overhead vs full fine-tuning)")
    return fig


LOADTEST_COLORS = {"merged": "#4c72b0", "peft": "#dd8452", "ours": "#55a868"}


def fig_loadtest(d: RunData) -> Figure | str:
    cells = (d.loadtest or {}).get("cells") or []
    if not cells:
        return "needs loadtest/loadtest.json (loralens loadtest RUN_DIR)"
    clients = sorted({c["clients"] for c in cells})
    backends = [b for b in ("merged", "peft", "ours") if any(c["backend"] == b for c in cells)]
    fig = Figure(figsize=(max(4.2 * len(clients), 6.0), 6.8), layout="constrained")
    axes = fig.subplots(2, len(clients), squeeze=False)
    for j, n in enumerate(clients):
        for b in backends:
            rows = sorted((c for c in cells if c["clients"] == n and c["backend"] == b),
                          key=lambda c: c["adapters"])
            x = [c["adapters"] for c in rows]
            kw = dict(color=LOADTEST_COLORS.get(b), marker="o", label=b)
            axes[0, j].plot(x, [c.get("throughput_rps") or np.nan for c in rows], **kw)
            axes[1, j].plot(x, [c.get("p95_ms") or np.nan for c in rows], **kw)
        for i in range(2):
            ax = axes[i, j]
            ax.set_xscale("log", base=2)
            xs = sorted({c["adapters"] for c in cells})
            ax.set_xticks(xs, [str(v) for v in xs])
            ax.minorticks_off()
            ax.set_xlabel("adapters the requests are spread over")
        axes[0, j].set_title(f"{n} concurrent client{'s' if n != 1 else ''}")
        axes[0, j].set_ylabel("throughput (requests/s)")
        axes[1, j].set_ylabel("p95 latency (ms)")
        axes[0, j].set_ylim(bottom=0)
        axes[1, j].set_ylim(bottom=0)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(backends), frameon=False)
    fig.suptitle("Serving under concurrent load: merged models vs PEFT vs our multi-adapter path")
    return fig


# --------------------------------------------------------------------------- saving

def _bootstrap_caption(d: RunData) -> str:
    """How many distinct resamples Figure 2's intervals rest on, from the number of seeds."""
    from math import comb

    ns = sorted({int(c.get("n_seeds")) for e in (d.table4 or {}).get("tasks") or []
                 for c in (e.get("measures") or {}).values()
                 if finite(c.get("n_seeds")) and c.get("n_seeds") >= 2})
    return "; ".join(f"{n} seeds allow only {comb(2 * n - 1, n)} distinct resamples"
                     for n in ns)


FIGURES = (
    ("fig1-accuracy-vs-drift", "Figure 1: accuracy vs mean drift",
     "Validation score against drift (1 − debiased linear CKA to the base model, averaged "
     "over the hidden states of drift.layers) for every trained model; colour = method, "
     "marker = task. Debiased, because tasks share the axis and the biased form's bias "
     "depends on each task's number of examples.",
     fig_accuracy_vs_drift),
    ("fig2-drift-reduction", "Figure 2: drift reduction per task",
     lambda d: "Δ% = 100·(drift full − drift LoRA)/drift full per task and drift measure "
               "(biased CKA, debiased CKA, cosine, as labelled; compare tasks with the "
               "debiased bars); error bars: 95% seed-paired bootstrap CI (absent with fewer "
               "than 2 seeds" + (f"; {_bootstrap_caption(d)}" if _bootstrap_caption(d) else "")
               + "); * significant after Bonferroni over drift measures × tasks.",
     fig_drift_reduction),
    ("fig3-layerwise-drift", "Figure 3: layer-wise drift, LoRA vs full fine-tuning",
     "Drift (1 − linear CKA, biased: the paper's measure, compared within each task) per "
     "hidden state of drift.layers; lines: mean over seeds, bands: min–max over seeds.",
     lambda d: fig_layerwise(d, ("cka",), "Layer-wise drift (1 − linear CKA, biased)")),
    ("fig4-latency", "Figure 4: serving latency per strategy",
     "Mean latency per request, seeds pooled, with the 95% bootstrap CI of the mean as error "
     "bars and the 95th percentile (diamonds); labels: overhead of the mean vs full "
     "fine-tuning.",
     fig_latency),
    ("fig6-loadtest", "Figure 6: throughput and p95 latency under concurrent load",
     "Per client count (columns): requests answered per second (top) and 95th-percentile "
     "latency (bottom) against the number of adapters the requests are spread over, for "
     "merged models, PEFT and our multi-adapter path (loralens loadtest).",
     fig_loadtest),
    ("fig5-layerwise-debiased-cosine", "Figure 5: layer-wise drift, debiased CKA and cosine",
     "As Figure 3 for 1 − debiased linear CKA (top) and 1 − mean cosine of paired examples "
     "(bottom).",
     lambda d: fig_layerwise(d, ("cka_debiased", "cosine"),
                             "Layer-wise drift: debiased CKA and cosine")),
    ("fig7-outlier-dimensions", "Figure 7: how much a few dimensions decide",
     "Top: share of the pooled features' variance held by the 1 (solid) and 5 (dotted) "
     "dimensions of largest variance, per hidden state of drift.layers, for the base model "
     "and each method (mean over seeds). Bottom: drift, 1 − debiased linear CKA, with plain "
     "(solid) and per-dimension standardised (dashed) features, mean over seeds: where they "
     "part, a few high-variance dimensions decide the plain value.",
     fig_outliers),
)


def _save(fig: Figure, path: Path, fmt: str) -> None:
    meta = {"Date": None} if fmt == "svg" else {"Software": None}  # same bytes every time
    with atomic_path(path, suffix=f".{fmt}") as tmp:
        fig.savefig(tmp, format=fmt, dpi=DPI, metadata=meta)


def draw_all(d: RunData, out_dir: Path) -> tuple[list[FigureFile], dict[str, str]]:
    """Draw every figure that the run's results allow; ``(files, {id: why not drawn})``.

    A figure that cannot be drawn now has its old files removed, so the report folder
    never shows a figure from an earlier state of the run.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files, missing = [], {}
    with matplotlib.rc_context(RC):
        for fid, title, caption, fn in FIGURES:
            png, svg = out_dir / f"{fid}.png", out_dir / f"{fid}.svg"
            try:
                fig = fn(d)
            except Exception as e:  # noqa: BLE001 - one bad figure must not sink the report
                fig = f"could not be drawn ({type(e).__name__}: {e})"
            if isinstance(fig, str):
                missing[fid] = f"{title}: {fig}"
                png.unlink(missing_ok=True)
                svg.unlink(missing_ok=True)
                continue
            _save(fig, png, "png")
            _save(fig, svg, "svg")
            files.append(FigureFile(fid, title, caption if isinstance(caption, str)
                                    else caption(d), png, svg))
    return files, missing
