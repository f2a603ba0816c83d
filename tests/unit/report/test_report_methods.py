"""The report of a four-method study (full, head, LoRA, DoRA): every table has a row per
method, every figure's legend names every method in the method's one colour, and the
head-only method's drift and weight tests are undefined. Model-free: the stages' own
writers on synthetic numbers (tests/helpers/report_run.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.colors import to_hex
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy import stats as sps

from loralens.study.config import load_config
from loralens.core.run_dir import RunDir
from tests.helpers.report_run import (SEEDS, TASKS, data_stats, write_extract, write_metrics,
                                    write_weights)

METHODS = ("full", "head", "lora", "dora")
LABELS = {"full": "full FT", "head": "head only", "lora": "LoRA", "dora": "DoRA"}
# validation accuracy per (task, method), one value per seed in SEEDS order
ACC = {("sst2", "full"): [0.84, 0.86, 0.85], ("sst2", "head"): [0.55, 0.60, 0.50],
       ("sst2", "lora"): [0.81, 0.82, 0.83], ("sst2", "dora"): [0.80, 0.83, 0.83],
       ("rte", "full"): [0.58, 0.61, 0.61], ("rte", "head"): [0.50, 0.54, 0.52],
       ("rte", "lora"): [0.60, 0.62, 0.64], ("rte", "dora"): [0.62, 0.61, 0.66]}
N_VAL = {"sst2": 40, "rte": 24}
FIGS = ("fig1-accuracy-vs-drift", "fig2-drift-reduction", "fig3-layerwise-drift",
        "fig5-layerwise-cosine", "fig7-outlier-dimensions", "fig8-layerwise-intruders")


def four_method_run(root) -> RunDir:
    from loralens.analysis.drift.stage import method_drift, run_drift
    from loralens.analysis.weights.analyzer import method_summary

    cfg = load_config(overrides={"preset": "smoke", "tasks": list(TASKS), "seeds": list(SEEDS),
                                 "methods": list(METHODS), "data": {"max_length": 128}})
    run = RunDir(root)
    run.bind_config(cfg)
    rng = np.random.default_rng(0)
    for t in TASKS:
        run.record_data(t, data_stats(t))
        for m in METHODS:
            for s, acc in zip(SEEDS, ACC[(t, m)]):
                write_metrics(run, t, m, s, acc)
        write_extract(run, t, rng, N_VAL[t], methods=METHODS)
    run_drift(cfg, run, n_resamples=200)
    method_drift(cfg, run, n_resamples=200)
    method_summary(cfg, run, write_weights(run, rng, methods=METHODS))
    return run


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from loralens.report import build_report
    from loralens.report.run_data import load_run

    run = four_method_run(tmp_path_factory.mktemp("methods") / "run")
    html = build_report(run)
    return run, html, load_run(run)


def _tables(html_path) -> dict[str, list[list[str]]]:
    """{table id: rows of cell texts (header first)} from the HTML report."""
    import html as H
    import re

    text = html_path.read_text()
    out = {}
    for tid, body in re.findall(r'<table id="([^"]+)".*?>(.*?)</table>', text, re.S):
        rows = re.findall(r"<tr>(.*?)</tr>", body, re.S)
        out[tid] = [[H.unescape(re.sub(r"<[^>]+>", "", c)).strip()
                     for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", r, re.S)] for r in rows]
    return out


PER_METHOD_TABLES = ("table-3-accuracy", "table-3b-fit", "table-4-drift", "table-4b-outliers",
                     "table-7-weights", "table-7b-intruders", "table-8-forgetting",
                     "table-throughput")


def test_every_per_method_table_has_every_method(report):
    run, html, _ = report
    tables = _tables(html)
    for tid in PER_METHOD_TABLES:
        assert tid in tables, tid
        head, *rows = tables[tid]
        col = head.index("Method") if "Method" in head else head.index("Model")
        seen = {r[col] for r in rows}
        assert set(LABELS.values()) <= seen, (tid, seen)
        for task in TASKS:  # every task has a row per method
            assert {r[col] for r in rows if r[0].removesuffix(" ‡") == task} >= set(
                LABELS.values()), (tid, task)
    assert "table-3c-examples" not in tables  # LoRA vs full only: not shown for N methods


# Which models are not above the majority class (accuracy 0.5), by hand: Wilson 95% lower
# bounds on n = 40 (sst2) and n = 24 (rte). sst2 head 0.55, 0.60, 0.50: lower bounds 0.398,
# 0.446, 0.352 -> all three; sst2 full/lora/dora (0.80-0.86, lower >= 0.65): none. rte
# (n = 24): head 0.50-0.54 (lower <= 0.351), full 0.58/0.61 (14 and 15 right: lower 0.388,
# 0.427), lora 0.60-0.64 (0.388-0.427), dora 0.61-0.66 (0.427-0.467): every model.
TASK_MARKS = {"sst2": "sst2 ‡", "rte": "rte ‡"}
ROW_LEARNED = {("sst2", "full FT"): "none", ("sst2", "LoRA"): "none",
               ("sst2", "DoRA"): "none", ("sst2", "head only"): "head only seeds 42, 1337, 2024 ‡"}


def test_n_method_tables_mark_models_not_above_the_majority(report):
    """Every N-method comparison table carries the mark (‡) and Table 3's footnote: Table 3
    names, per row, the not-learned models of the method and the reference it compares;
    Tables 4, 4b, 7 and 8 mark the task; the glance line's drift part says so."""
    run, html, _ = report
    tables = _tables(html)
    head, *rows = tables["table-3-accuracy"]
    cell = {(r[0], r[1]): dict(zip(head, r)) for r in rows}
    for key, want in ROW_LEARNED.items():
        assert cell[key]["Not above the majority class"] == want, key
    for m in ("full FT", "LoRA", "DoRA", "head only"):  # rte: every model of every method
        got = cell[("rte", m)]["Not above the majority class"]
        assert got.endswith(" ‡") and "full FT seeds 42, 1337, 2024" in got, (m, got)
    for tid in ("table-4-drift", "table-4b-outliers", "table-7-weights", "table-8-forgetting"):
        head, *rows = tables[tid]
        assert {r[0] for r in rows} == set(TASK_MARKS.values()), tid
    text = html.read_text()
    footnote = ("‡ not above the majority class: a row of a task where some model's 95% "
                "validation interval reaches down to the majority-class score (Table 3d)")
    # Table 3, 4, 4b, 7 and 8 each carry the footnote (Table 3d's own note is another text)
    assert text.count(footnote) == 5
    from loralens.report.compose import glance
    from loralens.report.run_data import load_run

    lines = glance(load_run(run))
    sst2 = next(x for x in lines if x.startswith("**sst2**"))
    assert "head only seeds 42, 1337, 2024 are not above the majority class" in sst2
    assert "‡ (compares models not above the majority class" in sst2
    assert sst2.count(" ‡") == 2  # the accuracy and the drift comparison


def test_table3_tests_each_method_against_the_reference(report):
    _, html, _ = report
    head, *rows = _tables(html)["table-3-accuracy"]
    cell = {(r[0], r[1]): dict(zip(head, r)) for r in rows}
    n_tests = 3 * len(TASKS)  # head, lora, dora against full, per task
    for t in TASKS:
        assert cell[(t, "full FT")]["p"] == "reference"
        for m in ("head", "lora", "dora"):
            want = sps.ttest_rel(ACC[(t, m)], ACC[(t, "full")]).pvalue
            c = cell[(t, LABELS[m])]
            assert float(c["p"]) == pytest.approx(want, rel=2e-3, abs=5e-4), (t, m)
            adj = min(1.0, want * n_tests)
            assert float(c["p (Bonf.)"]) == pytest.approx(adj, rel=2e-3, abs=5e-4)
            diff = np.mean(ACC[(t, m)]) - np.mean(ACC[(t, "full")])
            assert c["Method − full FT"] == f"{diff:+.4f}"


def test_head_drift_and_weight_tests_are_undefined(report):
    run, html, _ = report
    tables = _tables(html)
    for tid, col in (("table-4-drift", "Method"), ("table-7-weights", "Method"),
                     ("table-8-forgetting", "Method")):
        head, *rows = tables[tid]
        for r in rows:
            c = dict(zip(head, r))
            if c[col] == "head only":
                assert c["p"] == "undefined (head only: 0 by construction)", (tid, c)
                assert c["Significant"] == "no (undefined)" and c["p (Bonf.)"] == "–"
            elif c[col] == "full FT":
                assert c["p"] == "reference"
    # the drift family: the tests made (lora, dora x tasks x 3 measures; head in none)
    res = json.loads((run.drift_dir / "methods.json").read_text())
    assert res["n_tests"] == 2 * len(TASKS) * 3
    text = html.read_text()
    assert f"the {2 * len(TASKS) * 3} tests made" in text
    lora = next(r for r in res["rows"] if r["method"] == "lora" and r["measure"] == "cka"
                and r["task"] == "rte")
    seeds = sorted(lora["per_seed"])
    ref = next(r for r in res["rows"] if r["method"] == "full" and r["measure"] == "cka"
               and r["task"] == "rte")
    want = sps.ttest_rel([ref["per_seed"][s] for s in seeds],
                         [lora["per_seed"][s] for s in seeds]).pvalue
    assert lora["p"] == pytest.approx(want) and lora["p_bonferroni"] == pytest.approx(
        min(1.0, want * res["n_tests"]))


def _legend_colors(fig) -> dict[str, str]:
    """{legend label: colour of its handle} over every legend of ``fig``."""
    out = {}
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    for lg in legends:
        for h, t in zip(lg.legend_handles, lg.get_texts()):
            if isinstance(h, Line2D):
                c = h.get_markerfacecolor() if h.get_linestyle() in ("", "None") \
                    else h.get_color()
            elif isinstance(h, Patch):
                c = h.get_facecolor()
            elif isinstance(h, PathCollection):
                c = h.get_facecolor()[0]
            else:
                continue
            out[t.get_text()] = to_hex(c)
    return out


def test_one_colour_per_method_across_every_figure(report):
    import matplotlib

    from loralens.report.colors import method_colors
    from loralens.report.figures import FIGURES, RC

    _, _, d = report
    palette = method_colors(METHODS)
    assert len(set(palette.values())) == len(METHODS)  # distinct
    assert palette == method_colors(d.methods)          # keyed by the study's method list
    seen: dict[str, set] = {m: set() for m in METHODS}
    drawn = 0
    with matplotlib.rc_context(RC):
        for fid, _, _, fn in FIGURES:
            if fid not in FIGS:
                continue
            fig = fn(d)
            assert not isinstance(fig, str), (fid, fig)
            drawn += 1
            colours = _legend_colors(fig)
            for m in METHODS:
                mine = {c for label, c in colours.items() if label.startswith(LABELS[m])}
                assert mine, (fid, m, list(colours))  # the legend names the method
                seen[m] |= mine
            # and the data drawn (lines, markers, bars) carries every method's colour
            plotted = {to_hex(a.get_color()) for ax in fig.axes for a in ax.get_lines()}
            plotted |= {to_hex(c) for ax in fig.axes for a in ax.collections
                        for c in a.get_facecolor()}
            plotted |= {to_hex(a.get_facecolor()) for ax in fig.axes for a in ax.patches}
            assert set(palette.values()) <= plotted, (fid, plotted)
    assert drawn == len(FIGS)
    for m in METHODS:
        assert seen[m] == {palette[m]}, (m, seen[m])


def test_legend_sidecar_names_every_method(report):
    run, _, _ = report
    side = json.loads((run.report_dir / "figures" / "legends.json").read_text())
    assert side["methods"] == list(METHODS)
    for fid in FIGS:
        labels = side["figures"][fid]
        for m in METHODS:
            assert any(lab.startswith(LABELS[m]) for lab in labels), (fid, m, labels)


def test_serving_figure_colours_bars_by_method_and_hatches_by_path():
    """Figure 4 of a four-method bench (kinds as bench names them): one bar per served
    kind in its method's colour, hatched by the serving path, every method in the legend."""
    from types import SimpleNamespace

    from loralens.report.colors import method_colors
    from loralens.report.methods_figures import legend_labels
    from loralens.report.serving_figures import fig_latency

    kinds = {"full": ("full", "whole model"), "head": ("head", "whole model"),
             "lora_merged": ("lora", "merged"), "lora_runtime": ("lora", "runtime"),
             "dora_merged": ("dora", "merged"), "dora_separate": ("dora", "PEFT")}
    comp = [{"task": "rte", "batch_size": 1, "kind": k, "method": m, "served_by": p,
             "mean_ms": 10.0 + i, "p95_ms": 12.0 + i, "sd_ms": 1.0}
            for i, (k, (m, p)) in enumerate(kinds.items())]
    d = SimpleNamespace(serving={"comparison": comp}, methods=list(METHODS))
    fig = fig_latency(d)
    (ax,) = fig.axes
    bars = [p for p in ax.patches if p.get_height() > 0]
    assert [round(b.get_height(), 6) for b in bars] == [10.0, 11.0, 12.0, 13.0, 14.0, 15.0]
    palette = method_colors(METHODS)
    assert [to_hex(b.get_facecolor()) for b in bars] == [
        palette[m] for m in ("full", "head", "lora", "lora", "dora", "dora")]
    assert [b.get_hatch() or "" for b in bars] == ["", "", "", "xx", "", "//"]
    labels = legend_labels(fig)
    for m in METHODS:
        assert LABELS[m] in labels, (m, labels)
    assert {"separate (PEFT)", "our runtime"} <= set(labels)
