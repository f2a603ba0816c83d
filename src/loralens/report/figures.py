"""The report's figures, drawn with matplotlib's object API (no pyplot, no global backend).

:data:`FIGURES` lists every figure: its id, title, caption and the function that draws
it (:mod:`.drift_figures`, :mod:`.serving_figures`), which takes the loaded run
(:class:`run_data.RunData`) and returns a matplotlib Figure, or a string saying why it
cannot be drawn yet. :func:`draw_all` saves every figure as PNG and SVG under
``report/figures/`` (atomically, through :func:`files.atomic_path`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from loralens.core.files import atomic_path, atomic_write_json
from loralens.report.accuracy_tables import figure_learned_line
from loralens.report.drift_figures import (
    fig_accuracy_vs_drift, fig_drift_reduction, fig_layerwise, fig_outliers,
)
from loralens.report.formatting import finite
from loralens.report.significance import correction_name
from loralens.report.methods_figures import fig_method_drift, legend_labels
from loralens.report.methods_report import is_multi
from loralens.report.rank_figures import RANK_FIGURES
from loralens.report.run_data import RunData
from loralens.report.serving_figures import fig_latency, fig_loadtest, latency_caption
from loralens.report.sweep_report import fig_intruder_sweep
from loralens.report.weight_figures import fig_layerwise_intruders

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
    ("fig2-drift-reduction",
     lambda d: "Figure 2: drift per task and method" if is_multi(d)
     else "Figure 2: drift reduction per task",
     lambda d: METHODS_FIG2 if is_multi(d) else
     "Δ% = 100·(drift full − drift LoRA)/drift full per task and drift measure "
     "(biased CKA, debiased CKA, cosine, as labelled; compare tasks with the "
     "debiased bars); error bars: 95% seed-paired bootstrap CI (absent with fewer "
     "than 2 seeds" + (f"; {_bootstrap_caption(d)}" if _bootstrap_caption(d) else "")
     + "); * significant after the " + correction_name(d) + " correction within each drift "
     "measure's family (the configured tasks; stats.correction).",
     lambda d: fig_method_drift(d) if is_multi(d) else fig_drift_reduction(d)),
    ("fig3-layerwise-drift", "Figure 3: layer-wise drift per method",
     "Drift per hidden state of drift.layers; lines: mean over seeds, bands: min–max over "
     "seeds. Top: 1 − debiased linear CKA, comparable across tasks. Bottom: 1 − linear CKA, "
     "biased: the paper's measure, the published column, compared within each task only "
     "(its bias depends on each task's examples vs dimensions).",
     lambda d: fig_layerwise(d, _fig3_measures(d), "Layer-wise drift: 1 − linear CKA, "
                             "debiased (top) and biased, the published measure (bottom)")),
    ("fig4-latency", "Figure 4: serving latency per strategy", latency_caption, fig_latency),
    ("fig6-loadtest", "Figure 6: throughput and p95 latency under concurrent load",
     "Per client count (columns): requests answered per second (top) and 95th-percentile "
     "latency (bottom) against the number of adapters the requests are spread over, for "
     "merged models, PEFT and our multi-adapter path (loralens loadtest).",
     fig_loadtest),
    # cosine alone: debiased CKA per state is Figure 3's top row, drawn once
    ("fig5-layerwise-cosine", "Figure 5: layer-wise drift, cosine of paired examples",
     "Drift per hidden state of drift.layers as 1 − mean cosine similarity between each "
     "validation example's pooled features in the fine-tuned and the base model (paired by "
     "example, unlike CKA, which compares the whole set's geometry); lines: mean over seeds, "
     "bands: min–max over seeds.",
     lambda d: fig_layerwise(d, ("cosine",), "Layer-wise drift: 1 − mean cosine of paired "
                             "examples")),
    ("fig7-outlier-dimensions", "Figure 7: how much a few dimensions decide",
     "Top: share of the pooled features' variance held by the 1 (solid) and 5 (dotted) "
     "dimensions of largest variance, per hidden state of drift.layers, for the base model "
     "and each method (mean over seeds). Bottom: drift, 1 − debiased linear CKA, with plain "
     "(solid) and per-dimension standardised (dashed) features, mean over seeds: where they "
     "part, a few high-variance dimensions decide the plain value.",
     fig_outliers),
    ("fig8-layerwise-intruders", "Figure 8: per-layer weight change beside activation drift",
     "Per transformer block (layer i's matrices at block i, the state it writes), mean over "
     "seeds: intruder dimensions at ε = 0.5 summed over the compared matrices (left), their "
     "mean relative change ‖W − W0‖F / ‖W0‖F (middle), and drift, 1 − debiased linear CKA "
     "of block i's output (right). ρ: Spearman correlation over blocks between the mean "
     "relative change and the mean drift, per method.",
     fig_layerwise_intruders),
    ("fig9-intruder-sweep", "Figure 9: the intervention sweep, rescaling LoRA's intruder "
     "directions (solid) and a matched control (dashed)",
     "Per task, mean over the LoRA seeds swept: validation score (left), drift, 1 − debiased "
     "linear CKA averaged over drift.layers (middle), and forgetting (right) after each "
     "adapted matrix's intruder directions (solid, PEFT's reduce_intruder_dimension) or as "
     "many of its largest non-intruder directions (dashed, the control) are rescaled by λ and "
     "the update rebuilt at rank r (λ = 1: the trained model; λ = 0: directions removed). "
     "Tables 7c and 7d give the numbers and the intruder-minus-control test.",
     fig_intruder_sweep),
    *RANK_FIGURES,  # drawn for a rank sweep only (rank_figures.has_rank_sweep)
)


# ids of figures an earlier version drew: removed from report/figures/ so none lingers
RETIRED = ("fig5-layerwise-debiased-cosine",)  # now fig5-layerwise-cosine, cosine alone

# figures that compare models: their captions name the models not above the majority class
LEARNED_FIGURES = ("fig1-accuracy-vs-drift", "fig2-drift-reduction", "fig3-layerwise-drift",
                   "fig5-layerwise-cosine", "fig7-outlier-dimensions",
                   "fig8-layerwise-intruders")


def _fig3_measures(d: RunData) -> tuple[str, ...]:
    """Debiased CKA first, biased second; biased alone for layers.json from an older drift
    stage that stored no debiased form."""
    if any("cka_debiased" in r for r in d.layers or []):
        return ("cka_debiased", "cka")
    return ("cka",)


METHODS_FIG2 = ("Drift, 1 − debiased linear CKA averaged over the hidden states of "
                "drift.layers, per task and method (mean over seeds; error bars: min–max "
                "over seeds); * significant against the reference method after Bonferroni "
                "(Table 4); a head-only method's drift is 0 by construction, its test "
                "undefined.")


def _save(fig: Figure, path: Path, fmt: str) -> None:
    meta = {"Date": None} if fmt == "svg" else {"Software": None}  # same bytes every time
    with atomic_path(path, suffix=f".{fmt}") as tmp:
        fig.savefig(tmp, format=fmt, dpi=DPI, metadata=meta)


def draw_all(d: RunData) -> tuple[list[FigureFile], dict[str, str]]:
    """Draw every figure that the run's results allow into ``report/figures/``;
    ``(files, {id: why not drawn})``.

    A figure that cannot be drawn now has its old files removed, so the report folder
    never shows a figure from an earlier state of the run.
    """
    d.run.report_figures_dir.mkdir(parents=True, exist_ok=True)
    for fid in RETIRED:  # an earlier version's figure, drawn no more
        for fmt in ("png", "svg"):
            d.run.report_figure_path(fid, fmt).unlink(missing_ok=True)
    files, missing, legends = [], {}, {}
    with matplotlib.rc_context(RC):
        for fid, title, caption, fn in FIGURES:
            title = title if isinstance(title, str) else title(d)
            png, svg = d.run.report_figure_path(fid, "png"), d.run.report_figure_path(fid, "svg")
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
            legends[fid] = legend_labels(fig)
            caption = caption if isinstance(caption, str) else caption(d)
            if fid in LEARNED_FIGURES:
                caption += figure_learned_line(d)
            files.append(FigureFile(fid, title, caption, png, svg))
    # what each drawn figure's legends name (a reader or a test checks the methods there)
    atomic_write_json(d.run.report_legends_json, {"methods": d.methods, "figures": legends})
    return files, missing
