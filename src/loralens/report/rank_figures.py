"""The rank sweep's figures (``--preset ranks``): accuracy vs trainable parameters (Figure
R1) and drift vs LoRA rank (Figure R2).

Both are drawn only for a run with at least two LoRA ranks on the same target modules
(:func:`has_rank_sweep`); otherwise each returns a string saying why, as every figure
function of :mod:`.figures` does, and the report leaves them out. What a method is (its
family, LoRA rank and target modules) and how many parameters it trained come from each
job's ``metrics.json`` (``hyperparameters.method`` or ``hyperparameters.lora``, and
``parameters.trainable``, counted by :func:`loralens.training.job.count_parameters`); drift from
``drift/layers.json`` through :func:`.drift_figures.model_drift`.

"Plain" LoRA (no DoRA, rsLoRA, PiSSA/OLoRA initialisation or LoRA+) is what a rank series
holds, and rsLoRA (``use_rslora``: scale alpha / sqrt(r), otherwise plain) a series of its
own on the same targets; methods of other kinds appear in Figure R1 as single points and
are left out of R2.

Why both: with alpha / r fixed and B starting at 0, the first update's size still grows
with r (each B row moves by about the learning rate under Adam, whatever the scale, and
``B A``'s size grows like sqrt(r) with A's r random rows), so "rank is the only thing that
changes" does not hold for plain LoRA; rsLoRA's alpha / sqrt(r) at fixed alpha keeps that
size the same at every rank (Kalajdzievski, 2023). Table R (:func:`table_rank_trend`) tests
a trend over ranks per series and measure across seeds (:func:`loralens.analysis.stats.rank_trend`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure

from loralens.analysis.stats import CORRECTIONS, adjust_p, rank_trend
from loralens.models.methods import lora_type, recorded_method
from loralens.report.colors import method_color, method_label
from loralens.report.drift_figures import model_drift
from loralens.report.formatting import DASH, Table, finite, g
from loralens.report.run_data import RunData

REFERENCES = ("head", "full")  # families drawn as references, not as a series
# a marker per reference family, then per series: plain LoRA, LoRA on all linear layers, other
MARKERS = {"head": "v", "full": "D", "plain": "o", "all-linear": "s", "rslora": "^",
           "other": "P"}
RSLORA = " (rsLoRA)"  # a series key's suffix: the rsLoRA ranks on those targets
WHY_NOT = ("needs at least two LoRA ranks on the same target modules (the rank sweep: "
           "--preset ranks)")
ZERO = 1e-9  # |drift| below this is rounding (the head's is 0 by construction)


@dataclass
class Entry:
    """One method of one task: what it is, what it trained and what it scored, per seed."""

    method: str
    family: str                       # full, head, peft ("" when the record is missing)
    rank: int | None = None           # LoRA rank (None: not LoRA)
    targets: str | None = None        # "q_proj, v_proj", "all-linear" (None: not LoRA)
    plain: bool = False               # plain LoRA: a point of a rank series
    rslora: bool = False              # rsLoRA, otherwise plain: a point of its own series
    params: float | None = None       # trainable parameters (the same for every seed)
    scores: dict = field(default_factory=dict)     # seed -> validation score
    drift: dict = field(default_factory=dict)      # seed -> mean drift over drift.layers

    @property
    def label(self) -> str:
        name = method_label(self.method)
        return name if self.rank is None or f"r{self.rank}" in self.method \
            else f"{name} (r={self.rank})"

    @property
    def marker(self) -> str:
        if self.family in REFERENCES:
            return MARKERS[self.family]
        if self.rslora:
            return MARKERS["rslora"]
        if self.plain:
            return MARKERS["all-linear" if self.targets == "all-linear" else "plain"]
        return MARKERS["other"]


def _describe(job: dict, method: str) -> tuple[str, dict]:
    """``(family, peft settings)`` of ``method`` as its metrics.json recorded them."""
    return recorded_method(method, job.get("hyperparameters") or {})


def _targets(value) -> str | None:
    if value == "all-linear":
        return value
    if isinstance(value, (list, tuple)) and value:
        return ", ".join(sorted(map(str, value)))
    return None


def entries(d: RunData, task: str, measure: str | None = None) -> list[Entry]:
    """Every method of ``task`` with a finished job, in the study's method order; drift
    (``measure``: a :func:`.drift_figures.model_drift` key, default :func:`drift_measure`)
    averaged over each model's states of drift.layers."""
    drift = model_drift(d, measure or drift_measure(d))
    out: dict[str, Entry] = {}
    for (t, m, seed), job in sorted(d.jobs.items(), key=lambda kv: str(kv[0])):
        if t != task:
            continue
        if m not in out:
            family, peft = _describe(job, m)
            lora = lora_type(family, peft) and "r" in peft
            simple = lora and not peft.get("use_dora") \
                and peft.get("init_lora_weights", True) in (True, "gaussian") \
                and peft.get("lr_ratio") is None
            rs = bool(simple and peft.get("use_rslora"))
            out[m] = Entry(m, family, int(peft["r"]) if lora else None,
                           _targets(peft.get("target_modules")) if lora else None,
                           simple and not rs, rs)
        e = out[m]
        trainable = (job.get("parameters") or {}).get("trainable")
        if finite(trainable):
            e.params = float(trainable)
        score = job.get("score", (job.get("validation") or {}).get(d.metric(t)))
        if finite(score):
            e.scores[int(seed)] = float(score)
        arr = drift.get((t, m, seed), (None, np.array([])))[1]
        if arr.size and np.isfinite(arr).any():
            e.drift[int(seed)] = float(np.nanmean(arr))
    order = {m: i for i, m in enumerate(d.methods)}
    return sorted(out.values(), key=lambda e: (order.get(e.method, len(order)), e.method))


def series(es: list[Entry]) -> dict[str, list[Entry]]:
    """Plain LoRA entries by target modules (key: the targets), and rsLoRA entries by
    target modules (key: the targets + :data:`RSLORA`), each sorted by rank."""
    out: dict[str, list[Entry]] = {}
    for e in es:
        if (e.plain or e.rslora) and e.targets:
            out.setdefault(e.targets + (RSLORA if e.rslora else ""), []).append(e)
    return {k: sorted(v, key=lambda e: e.rank) for k, v in out.items()}


def _swept(es: list[Entry]) -> bool:
    return any(len({e.rank for e in v}) >= 2 for v in series(es).values())


def sweep_tasks(d: RunData) -> list[str]:
    """Tasks whose finished jobs hold at least two LoRA ranks on the same targets."""
    tasks = d.tasks + sorted({k[0] for k in d.jobs} - set(d.tasks))
    return [t for t in tasks if _swept(entries(d, t))]


def has_rank_sweep(d: RunData) -> bool:
    """The run is a rank sweep: Figures R1 and R2 are drawn (and shown)."""
    if "rank_sweep" not in d.cache:
        d.cache["rank_sweep"] = bool(sweep_tasks(d))
    return d.cache["rank_sweep"]


def drift_measure(d: RunData) -> str:
    """Debiased CKA where the drift stage wrote it (as Figure 1), else the biased form."""
    return "cka_debiased" if any("cka_debiased" in r for r in d.layers or []) else "cka"


def _mean(values: dict) -> float:
    return float(np.mean(list(values.values()))) if values else math.nan


def _panels(d: RunData, tasks: list[str], width: float = 5.0):
    # one panel per task; the legend takes ~2.6 inches on the right
    fig = Figure(figsize=(width * len(tasks) + 2.6, 4.4), layout="constrained")
    return fig, fig.subplots(1, len(tasks), squeeze=False)[0]


def _points(ax, d: RunData, task: str, e: Entry, x: float, values: dict, kind: str) -> None:
    """Per-seed points (small) and their mean (large, black edge) of one method at x."""
    color = method_color(d, e.method)
    seeds = sorted(values)
    ax.scatter([x] * len(seeds), [values[s] for s in seeds], s=22, color=color,
               marker=e.marker, alpha=0.45, linewidth=0, zorder=3,
               gid=f"seeds:{kind}:{task}:{e.method}")
    ax.scatter([x], [_mean(values)], s=72, color=color, marker=e.marker, edgecolor="black",
               linewidth=0.7, zorder=4, gid=f"mean:{kind}:{task}:{e.method}",
               label=e.label)


def _legend(fig: Figure, axes) -> None:
    handles: dict = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper",
                   frameon=False)


def fig_accuracy_vs_params(d: RunData) -> Figure | str:
    """Figure R1: validation score against trainable parameters (log x), per task."""
    tasks = sweep_tasks(d)
    if not tasks:
        return WHY_NOT
    fig, axes = _panels(d, tasks)
    for ax, task in zip(axes, tasks):
        es = [e for e in entries(d, task) if e.params and e.scores]
        for e in es:
            _points(ax, d, task, e, e.params, e.scores, "acc")
        for targets, s in series(es).items():
            if len(s) >= 2:
                ax.plot([e.params for e in s], [_mean(e.scores) for e in s], color="0.45",
                        lw=1.1, zorder=2, gid=f"series:acc:{task}:{targets}")
            for e in s:
                ax.annotate(f"r={e.rank}", (e.params, _mean(e.scores)), fontsize=8,
                            xytext=(4, 4), textcoords="offset points")
        majority = [((j.get("majority_baseline") or {}).get(d.metric(task)))
                    for (t, _, _), j in d.jobs.items() if t == task]
        majority = [v for v in majority if finite(v)]
        if majority:
            ax.axhline(majority[0], color="0.3", ls=":", lw=1, zorder=1, gid=f"majority:{task}",
                       label="majority class")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel(f"validation {d.metric(task)}")
        ax.set_title(task)
    _legend(fig, axes)
    return fig


def fig_drift_vs_rank(d: RunData) -> Figure | str:
    """Figure R2: mean drift per LoRA rank (log2 x), head and full as horizontal lines."""
    tasks = sweep_tasks(d)
    if not tasks:
        return WHY_NOT
    measure = drift_measure(d)
    fig, axes = _panels(d, tasks)
    for ax, task in zip(axes, tasks):
        es = [e for e in entries(d, task, measure) if e.drift]
        lora = series(es)
        values = [v for s in lora.values() for e in s for v in e.drift.values()]
        values += [_mean(e.drift) for e in es if e.method in REFERENCES
                   or e.family in REFERENCES]
        positive = [v for v in values if v > ZERO]
        log = bool(positive) and max(positive) / min(positive) > 30
        for targets, s in lora.items():
            for e in s:
                _points(ax, d, task, e, e.rank, e.drift, "drift")
            if len(s) >= 2:
                ax.plot([e.rank for e in s], [_mean(e.drift) for e in s], color="0.45",
                        lw=1.1, zorder=2, gid=f"series:drift:{task}:{targets}",
                        ls=":" if targets.endswith(RSLORA) else
                        "--" if targets == "all-linear" else "-")
        for e in es:
            if not (e.method in REFERENCES or e.family in REFERENCES):
                continue
            v = _mean(e.drift)
            text = f"{method_label(e.method)}: {0 if abs(v) < ZERO else v:.3g}"
            if log and v <= ZERO:  # no place on a log axis: named in the legend only
                ax.plot([], [], color=method_color(d, e.method), ls="--",
                        label=f"{text} (off the log axis)")
                continue
            ax.axhline(v, color=method_color(d, e.method), lw=1.4,
                       ls="--" if e.family == "head" else "-.", zorder=1,
                       gid=f"ref:drift:{task}:{e.method}", label=text)
        ranks = sorted({e.rank for s in lora.values() for e in s})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("LoRA rank r (log scale)")
        ax.set_ylabel(f"mean drift: 1 − {'debiased' if 'debiased' in measure else 'biased'} "
                      "linear CKA" + (" (log scale)" if log else ""))
        ax.set_title(task)
    _legend(fig, axes)
    return fig


# --------------------------------------------------------------------------- captions

def _seeds(d: RunData) -> str:
    ns = sorted({len(e.scores) for t in sweep_tasks(d) for e in entries(d, t) if e.scores})
    return " or ".join(map(str, ns)) + (" seed" if ns == [1] else " seeds")


def caption_accuracy(d: RunData) -> str:
    return (f"Score on the whole validation split (scored once per model; {_seeds(d)} per "
            "method) against the number of trainable parameters (log scale: adapters and "
            "the head; full fine-tuning every parameter). Small points: one per seed; large: "
            "their mean; grey lines join the plain LoRA ranks on the same target modules "
            "(circles q/v, squares all-linear); head only (triangle) and full fine-tuning "
            "(diamond) are the references at either end; dotted: the majority class. Does "
            "accuracy keep rising with rank toward full fine-tuning?")


def caption_drift(d: RunData) -> str:
    ns = sorted({int(r["n_examples"]) for r in d.layers or [] if finite(r.get("n_examples"))})
    rows = "/".join(map(str, ns)) or "the extracted"
    form = "debiased" if drift_measure(d) == "cka_debiased" else "biased"
    return (f"Drift, 1 − {form} linear CKA to the base model averaged over the hidden states "
            f"of drift.layers on {rows} validation rows, per LoRA rank on q/v ({_seeds(d)} per "
            "method: small points one per seed, large their mean, joined by the solid line); "
            "LoRA on all-linear marked separately (squares); rsLoRA's ranks (scale alpha / "
            "sqrt(r), triangles) joined by a dotted line where the run has them; horizontal "
            "lines: head only (dashed; 0 by construction) and full fine-tuning (dash-dotted), "
            "mean over seeds. Plain LoRA keeps alpha / r fixed, yet its first update grows "
            "with r (B starts at 0), so rank is not the only thing that changes along the "
            "solid line; rsLoRA keeps that size the same at every rank. Does drift grow with "
            "rank toward full fine-tuning, as the intruder-dimension literature suggests? "
            "Table R tests the trend across seeds.")


# --------------------------------------------------------------------------- the trend test

TREND_MEASURES = (("drift", "mean drift"), ("scores", "validation score"))


def trend_rows(d: RunData) -> list[dict]:
    """Per sweep task, rank series (:func:`series`: plain LoRA or rsLoRA on one set of
    targets, two ranks or more) and measure (drift, validation score): the trend over
    ranks across seeds (:func:`loralens.analysis.stats.rank_trend`, two-sided), and the
    p corrected (``stats.correction`` of the run's config, Holm by default) over the tests
    of this table."""
    measure = drift_measure(d)
    rows = []
    for task in sweep_tasks(d):
        for key, s in series(entries(d, task, measure)).items():
            if len({e.rank for e in s}) < 2:
                continue
            for attr, name in TREND_MEASURES:
                values: dict = {}
                for e in s:
                    for seed, v in getattr(e, attr).items():
                        values.setdefault(seed, {})[e.rank] = v
                rows.append({"task": task, "series": key, "measure": name,
                             **rank_trend(values)})
    correction = ((d.config or {}).get("stats") or {}).get("correction", "holm")
    correction = correction if correction in CORRECTIONS else "holm"
    if rows:
        adj = adjust_p([math.nan if r["p"] is None else r["p"] for r in rows], correction,
                       len(rows))
        for r, a in zip(rows, adj):
            r["p_adjusted"] = None if math.isnan(a) else float(a)
            r["correction"] = correction
    return rows


def table_rank_trend(d: RunData) -> Table | None:
    """Table R: the trend over ranks per series and measure, across seeds."""
    if not has_rank_sweep(d):
        return None
    rows_in = trend_rows(d)
    if not rows_in:
        return None
    rows = []
    for r in rows_in:
        per = ", ".join(f"{s}: {g(v)}" if v is not None else f"{s}: {DASH}"
                        for s, v in r["rho_per_seed"].items())
        rows.append([r["task"], _series_label(r["series"]), r["measure"],
                     ", ".join(map(str, r["ranks"])), str(r["n_seeds"]), per or DASH,
                     g(r["rho"]) if r["rho"] is not None else "undefined",
                     g(r["p"]) if r["p"] is not None else DASH,
                     g(r.get("p_adjusted")) if r.get("p_adjusted") is not None else DASH])
    corr = "Holm" if rows_in[0].get("correction") == "holm" else "Bonferroni"
    exact = all(r["exact"] is not False for r in rows_in)
    notes = ["Spearman's rho between LoRA rank and the measure within each seed (average "
             "ranks for ties), averaged over seeds: the seeds are the replicates, the ranks "
             "of one seed are one training run each, not independent draws of the trend. p: "
             "two-sided permutation test, the values permuted over the ranks within each "
             "seed independently, " + ("exact (every ordering)" if exact else
                                       "exact where a seed has at most 8 ranks, else "
                                       "seeded random orderings") + "; with k ranks and n "
             "seeds the smallest p is 2 / (k!)^n (3 ranks, 2 seeds: 0.056), so two seeds of "
             "a short series cannot show a trend however clean it looks.",
             f"p (corrected): {corr} over the {len(rows_in)} tests of this table.",
             "Plain LoRA keeps alpha / r fixed (its first update still grows with r); "
             "rsLoRA scales by alpha / sqrt(r) at one alpha, keeping the first update's "
             "size the same at every rank (Kalajdzievski, 2023): a trend that holds in both "
             "series is about rank, one that holds in plain LoRA only may be the scale."]
    return Table("table-r-rank-trend", "Table R: trend over LoRA rank across seeds",
                 ["Task", "Series", "Measure", "Ranks", "Seeds", "rho per seed", "Mean rho",
                  "p", "p (corrected)"], rows, notes=notes)


def _series_label(key: str) -> str:
    rs = key.endswith(RSLORA)
    targets = key[:-len(RSLORA)] if rs else key
    return ("rsLoRA" if rs else "LoRA") + f" on {targets}"


RANK_FIGURES = (
    ("figr1-accuracy-vs-parameters", "Figure R1: accuracy vs trainable parameters",
     caption_accuracy, fig_accuracy_vs_params),
    ("figr2-drift-vs-rank", "Figure R2: drift vs LoRA rank", caption_drift, fig_drift_vs_rank),
)
