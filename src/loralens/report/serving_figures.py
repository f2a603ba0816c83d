"""The serving figures: latency per strategy (Figure 4) and throughput and p95 latency
under concurrent load (Figure 6), from ``bench/serving.json`` and
``loadtest/loadtest.json``.

Each ``fig_*`` function takes the loaded run (:class:`run_data.RunData`) and returns a
matplotlib Figure, or a string saying why it cannot be drawn yet. Figure 4 colours a bar
by its method (the report's one colour per method, :mod:`colors`) and hatches it by the
path that served it (whole model, merged, separate through PEFT, our runtime); Figure 6
colours by serving backend.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from matplotlib.patches import Patch

from loralens.models.serving_paths import SUFFIX, split_kind
from loralens.report.colors import method_color, method_label
from loralens.report.formatting import KINDS, finite
from loralens.report.run_data import RunData

# the path a kind was served by (its name's suffix; whole models have none) -> bar hatch
PATH_HATCHES = {"whole": "", "merged": "", "separate": "//", "runtime": "xx"}
PATH_LABELS = {"whole": "whole model", "merged": "merged", "separate": "separate (PEFT)",
               "runtime": "our runtime"}


def kind_parts(kind: str, row: dict) -> tuple[str, str]:
    """(method, path key of :data:`PATH_HATCHES`) of a served kind (:func:`split_kind`):
    ``lora_runtime`` -> (lora, runtime), ``full`` -> (full, whole)."""
    method, path = split_kind(kind, row.get("method"))
    return method, SUFFIX.get(path, "whole")


def kind_order(d: RunData, rows: dict[str, dict]) -> list[str]:
    """The kinds of one panel: by the study's method order, then path order."""
    methods = list(d.methods)
    paths = list(PATH_HATCHES)

    def key(k):
        m, p = kind_parts(k, rows[k])
        return (methods.index(m) if m in methods else len(methods), m, paths.index(p))
    return sorted(rows, key=key)


def kind_label(kind: str, row: dict) -> str:
    if kind in KINDS:
        return KINDS[kind]
    m, p = kind_parts(kind, row)  # named as KINDS names LoRA's: "DoRA separate (PEFT)"
    return method_label(m) + {"whole": "", "runtime": ", our runtime"}.get(p, f" {PATH_LABELS[p]}")


def seed_means_ms(serving: dict | None, task: str, batch: int, kind: str) -> list[float]:
    """Each benchmarked seed's mean latency (ms) of one strategy (serving.json)."""
    out: list[float] = []
    for seed in (((serving or {}).get("tasks") or {}).get(task) or {}).get("seeds", {}).values():
        k = (((seed.get("batch") or {}).get(str(batch)) or {}).get("kinds") or {}).get(kind) or {}
        lat = [1e3 * v for v in k.get("latency_s") or [] if finite(v)]
        if lat:
            out.append(float(np.mean(lat)))
    return out


def latency_error(serving: dict | None, row: dict) -> float | None:
    """Figure 4's error bar of one comparison row: the sd (ddof 1) across seeds of the seeds'
    mean latencies, as Table 5 shows it (``seed_means_sd_ms``; recomputed from serving.json
    where the row predates the key); None with fewer than 2 seeds, where there is no spread
    across seeds to show (the requests' spread within one seed is not that)."""
    if row.get("seeds") is not None and row["seeds"] < 2:
        return None
    sd = row.get("seed_means_sd_ms")
    if finite(sd):
        return float(sd)
    means = seed_means_ms(serving, row.get("task"), row.get("batch_size"), row.get("kind"))
    return float(np.std(means, ddof=1)) if len(means) >= 2 else None


def latency_caption(d: RunData) -> str:
    """Figure 4's caption: what the bars and error bars are, and why a bar has none."""
    comp = (d.serving or {}).get("comparison") or []
    one = sorted({r.get("task") for r in comp if latency_error(d.serving, r) is None},
                 key=str)
    seeds = (d.cfg("bench", "seeds") or [])
    text = ("Mean latency per request (the mean of each benchmarked seed's mean), with the sd "
            "across seeds of the seeds' mean latencies as error bars (as Table 5), and the "
            "95th percentile of the requests, seeds pooled (diamonds); labels: overhead of the "
            "mean vs full fine-tuning.")
    if one:
        why = (f"the benchmark covers one seed (bench.seeds {seeds})" if len(seeds) == 1
               else "fewer than 2 seeds were benchmarked")
        text += (f" No error bar for {', '.join(map(str, one))}: {why}, so there is no spread "
                 "across seeds to show (the spread of one seed's requests is not that).")
    return text


def fig_latency(d: RunData) -> Figure | str:
    comp = (d.serving or {}).get("comparison") or []
    if not comp:
        return "needs bench/serving.json (the serving benchmark)"
    tasks = list(dict.fromkeys(r["task"] for r in comp))
    batches = sorted({r["batch_size"] for r in comp})
    fig = Figure(figsize=(max(4.6 * len(tasks), 6.0), 3.8 * len(batches) + 0.4),
                 layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(batches), len(tasks), squeeze=False))
    shown: set[tuple[str, str]] = set()  # (method, path) pairs drawn: the legend's entries
    for i, b in enumerate(batches):
        for j, task in enumerate(tasks):
            ax = axes[i, j]
            rows = {r["kind"]: r for r in comp if r["task"] == task and r["batch_size"] == b}
            kinds = kind_order(d, rows)
            x = np.arange(len(kinds))
            means = [rows[k].get("mean_ms", np.nan) for k in kinds]
            p95 = [rows[k].get("p95_ms", np.nan) for k in kinds]
            errs = [latency_error(d.serving, rows[k]) for k in kinds]
            err = [e if e is not None else 0.0 for e in errs]
            lo = [min(e, m) if finite(m) else 0.0 for e, m in zip(err, means)]  # never below 0
            hi = err
            parts = [kind_parts(k, rows[k]) for k in kinds]
            bars = ax.bar(x, means, 0.62, color=[method_color(d, m) for m, _ in parts],
                          edgecolor="black", linewidth=0.6, zorder=2)
            for bar, (_, path) in zip(bars, parts):
                bar.set_hatch(PATH_HATCHES[path])
            shown.update(parts)
            shown_err = [i for i, e in enumerate(errs) if e is not None]
            if shown_err:
                ax.errorbar(x[shown_err], [means[i] for i in shown_err],
                            yerr=[[lo[i] for i in shown_err], [hi[i] for i in shown_err]],
                            fmt="none", ecolor="black", capsize=4, zorder=3,
                            label="mean ± sd across seeds")
            ax.scatter(x, p95, marker="D", s=22, color="black", zorder=4, label="p95")
            for xi, k, mean, up, q in zip(x, kinds, means, hi, p95):
                ov = rows[k].get("overhead_vs_full_pct")
                if finite(ov):
                    top = max(v for v in (mean + up, q) if finite(v))
                    text = "±0.0%" if abs(ov) < 0.05 else f"{ov:+.1f}%"
                    ax.annotate(text, (xi, top), xytext=(0, 5), textcoords="offset points",
                                ha="center", va="bottom", fontsize=8.5, fontweight="bold")
            labels = [kind_label(k, rows[k]) for k in kinds]
            if len(kinds) <= 4:  # the study's four strategies: wrapped, upright
                ax.set_xticks(x, [t.replace(" (", "\n(").replace(", ", ",\n") for t in labels])
            else:  # more methods: slanted, so neighbours never overlap
                ax.set_xticks(x, labels, rotation=30, ha="right", rotation_mode="anchor")
            ax.set_ylabel("latency per request (ms)")
            ax.set_title(f"{task}, batch {b}")
            tops = [v for m_, up, q in zip(means, hi, p95) for v in (m_ + up, q)
                    if finite(v)]
            ax.set_ylim(0, 1.16 * max(tops) if tops else None)  # room for the labels
    handles, labels = axes[0, 0].get_legend_handles_labels()
    methods = [m for m in dict.fromkeys([*d.methods, *(m for m, _ in sorted(shown))])
               if any(m == mm for mm, _ in shown)]
    handles += [Patch(facecolor=method_color(d, m), edgecolor="black", label=method_label(m))
                for m in methods]
    handles += [Patch(facecolor="white", edgecolor="black", hatch=PATH_HATCHES[p],
                      label=PATH_LABELS[p])
                for p in PATH_HATCHES if PATH_HATCHES[p] and any(p == pp for _, pp in shown)]
    labels = [h.get_label() for h in handles]
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 6),
               frameon=False)
    fig.suptitle("Serving latency per method and path (labels: mean overhead vs full "
                 "fine-tuning)")
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
