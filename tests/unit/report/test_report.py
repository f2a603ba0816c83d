"""The report: a synthetic run directory written with the stages' own writers, no model.

The run directory comes from ``synthetic_run`` (tests/helpers/report_run.py), which
tests/integration/test_report_browser.py uses too.
"""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from loralens.study.config import load_config
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json

from tests.helpers.report_run import N_VAL, SEEDS, TASKS, synthetic_run, write_metrics

@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    from loralens.report import build_report

    run = synthetic_run(tmp_path_factory.mktemp("report") / "run")
    before = _snapshot(run)
    path = build_report(run)
    return run, path, before


def _snapshot(run: RunDir) -> dict:
    return {str(p.relative_to(run.root)): p.stat().st_mtime_ns for p in run.root.rglob("*")
            if p.is_file() and not p.is_relative_to(run.report_dir)}


def _drift_json(run: RunDir, name: str) -> dict:
    from loralens.core.files import read_json

    return read_json(run.drift_path(name))


# --------------------------------------------------------------------------- tests

def test_report_files_and_return_value(full_report):
    run, path, before = full_report
    assert path == run.report_dir / "report.html" and path.is_file()
    assert (run.report_dir / "report.md").is_file()
    assert _snapshot(run) == before  # nothing outside report/ touched
    assert not list(run.report_dir.rglob(".*"))  # no temporary file left behind


def test_markdown_has_every_table_and_number(full_report):
    from loralens.core.files import read_json

    run, _, _ = full_report
    md = (run.report_dir / "report.md").read_text()
    for title in ("Table 1:", "Table 2a:", "Table 2b:", "Table 3:", "Table 4:", "Table 5:",
                  "Table 5b:", "Table 6:", "Table 7:", "Table 7b:", "Table 8:", "Provenance",
                  "Wall time per stage", "Sanity check",
                  "Stages of this run"):
        assert f"**{title}" in md, title
    # Table 3: mean ± sd over seeds, each seed's value, baseline
    assert "0.8200 ± 0.0100" in md and "0.8500 ± 0.0100" in md and "0.6200 ± 0.0200" in md
    assert "42: 0.8100, 1337: 0.8200, 2024: 0.8300" in md
    t3 = _drift_json(run, "table3.json")
    c = t3["tasks"][0]["metrics"]["accuracy"]
    from loralens.report.formatting import d_, pval
    assert pval(c["p"]) in md and d_(c["cohens_d"]) in md
    # Table 1: rows actually used and the drift sample (fewer than requested)
    assert "| sst2 | 640 |" in md and "24 of 40 requested (whole split)" in md
    # Table 2: chosen hyperparameters with their validation score
    s = read_json(run.search_path("sst2", "lora"))
    assert f"{s['best']['value']:.4f}" in md and "loguniform [5e-05, 0.005]" in md
    # Table 4: drift means, Delta% with CI, p, all three measures
    t4 = _drift_json(run, "table4.json")
    m = t4["tasks"][0]["measures"]["cka"]
    assert f"{m['lora']['mean']:.3g} ± {m['lora']['sd']:.3g}" in md
    assert f"{m['delta_percent']:+.1f}%" in md
    lo, hi = m["delta_percent_ci"]
    assert f"[{lo:.1f}, {hi:.1f}]" in md
    for label in ("1 − linear CKA (biased)", "1 − linear CKA (debiased)", "1 − mean cosine"):
        assert label in md
    # Table 5: mean latency, overhead vs full, p-value; multi-adapter rows
    serving = read_json(run.serving_path)
    row = next(r for r in serving["comparison"] if r["kind"] == "lora_separate")
    assert f"{row['mean_ms']:.1f} ± {row['seed_means_sd_ms']:.1f}" in md  # sd across seeds
    assert f"{row['overhead_vs_full_pct']:+.1f}%" in md and pval(row["p_vs_full"]) in md
    assert "mixed batches of 8" in md and "round-robin stream" in md
    # Table 6: every cell, the best server per cell, the crossovers
    assert md.count("| merged (one model per adapter)") == 9
    # (3 repeats at 0.98, 1 and 1.02 x the mean: mean ± 4.303 x 0.02 x mean / sqrt(3))
    assert "| 16 | 32 | our multi-adapter path (best) | 27.00 [25.66, 28.34] |" in md
    assert "| 4 | 8 | PEFT (separate adapters) | 18.00 [17.11, 18.89] |" in md
    assert "ours vs merged at 1 client: faster from 4 adapters on; slower at 1 adapter." in md
    assert "peft vs merged over 1 adapter: slower at 1, 8, 32 clients." in md
    assert "peft vs merged over 4 adapters: no difference detected." in md  # 18 vs 18.75
    assert "ours vs merged over 4 adapters: faster from 1 client on." in md
    # provenance: the packaged model said plainly; commit, versions, timings
    assert "not the study's TinyLlama-1.1B" in md and "Q4_1" in md
    assert "0123abcd" in md and "torch 2.13.0" in md and "smoke" in md
    assert "| drift | 14.0 s |" in md
    # throughput: median over seeds of 900 tokens / (20, 24, 25) s; 6N per token (full)
    assert "**Training throughput and FLOPs utilisation**" in md
    assert ("| sst2 | full FT | fp32 | 3 (42, 1337, 2024) | 37.5 | 23.9 | 12.8% | 15.9% "
            "| 186 | 150 | 20.0% |") in md
    assert md.index("**Wall time per stage**") < md.index("**Training throughput") \
        < md.index("## Sanity checks")
    assert "Every stage has run." in md and "not computed yet" not in md


def test_the_intervention_sweep_tables(full_report):
    """write_sweep's numbers: intruder arm score 0.6 + 0.1 λ, control 0.7 - 0.01 (i + 1)(1 - λ)
    for seed i, unchanged model 0.7; drift and forgetting change in the intruder arm only."""
    run, _, _ = full_report
    md = (run.report_dir / "report.md").read_text()
    assert ("Table 7c: the intervention sweep, rescaling intruder directions and a matched "
            "control") in md
    task = next(iter(TASKS))
    # λ = 0.5, intruder arm: score 0.65 on every seed (Δ -0.05), drift 0.005, forgetting 0.01
    assert (f"| {task} | intruder | 0.5 | 3 | accuracy | 0.6500 ± 0.0000 | -0.05 | 0.005 ± 0 "
            "| -0.005 | 0.01 ± 0 | -0.01 | 4 | 20 | 0.1 | 4 |") in md
    # control: 0.695, 0.69, 0.685 (mean 0.69, sd 0.005); drift and forgetting unchanged
    assert (f"| {task} | control | 0.5 | 3 | accuracy | 0.6900 ± 0.0050 | -0.01 | 0.01 ± 0 "
            "| +0 | 0.02 ± 0 | +0 | 4 | 10 | 0.1 | 4 |") in md
    assert "Table 7d: intruder directions minus the matched control" in md
    # differences -0.045, -0.04, -0.035: mean -0.04, sd 0.005, t = -8 sqrt(3), 2 df:
    # p = 1 - |t| / sqrt(t^2 + 2) = 0.00517; Bonferroni over 2 tasks x 2 λ: 0.0207; d = -8
    assert (f"| {task} | 0.5 | score | 3 | -0.05, -0.05, -0.05 | -0.005, -0.01, -0.015 "
            "| -0.04 | 0.005 | 0.021 | -8.00 | yes |") in md
    # the drift change is the same on every seed: zero spread, never significant
    assert (f"| {task} | 0.5 | drift | 3 | -0.005, -0.005, -0.005 | +0, +0, +0 | -0.005 "
            "| undefined (zero spread) | – | – | no (p undefined) |") in md
    assert f"| {task} | 1 | score | 3 | +0, +0, +0 | +0, +0, +0 | +0 | not tested" in md
    assert "Bonferroni family of 4 tests" in md and "with 3 seeds the test has 80% power" in md
    assert "![Figure 9: the intervention sweep" in md


def test_figures_are_valid_png_and_svg(full_report):
    from PIL import Image

    run, _, _ = full_report
    figs = run.report_dir / "figures"
    names = sorted(p.stem for p in figs.glob("*.png"))
    assert names == sorted(p.stem for p in figs.glob("*.svg"))
    assert names == ["fig1-accuracy-vs-drift", "fig2-drift-reduction", "fig3-layerwise-drift",
                     "fig4-latency", "fig5-layerwise-cosine", "fig6-loadtest",
                     "fig7-outlier-dimensions", "fig8-layerwise-intruders",
                     "fig9-intruder-sweep"]
    for name in names:
        png = figs / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.size[0] > 600 and im.size[1] > 300
        tree = ET.parse(figs / f"{name}.svg")
        assert tree.getroot().tag.endswith("svg")
    md = (run.report_dir / "report.md").read_text()
    assert "![Figure 1: accuracy vs mean drift](figures/fig1-accuracy-vs-drift.png)" in md


def test_html_is_self_contained(full_report):
    _, path, _ = full_report
    html = path.read_text()
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs)
    assert "<script" not in html and "<link" not in html and "@import" not in html
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 9
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    for tid in ("table-status", "table-provenance", "table-timings", "table-throughput",
                "table-sanity", "table-1-data", "table-2-spaces", "table-2-search",
                "table-3-accuracy", "table-4-drift", "table-4b-outliers", "table-5-serving",
                "table-5-multi"):
        assert f'<table id="{tid}">' in html
    assert "0.8200 ± 0.0100" in html


def test_partial_run_lists_what_is_missing(tmp_path):
    """config.yaml and one finished job: a report that says what is missing, no figure."""
    from loralens.report import build_report

    cfg = load_config(overrides={"tasks": list(TASKS), "seeds": list(SEEDS)})
    run = RunDir(tmp_path / "run")
    run.bind_config(cfg)
    write_metrics(run, "sst2", "lora", 42, 0.8125)
    path = build_report(tmp_path / "run")
    md = (run.report_dir / "report.md").read_text()
    html = path.read_text()
    assert "1 of 12 jobs finished" in md
    assert "Drift: not computed yet" in md and "`loralens run --stages drift`" in md
    assert "Serving benchmark: not computed yet" in md
    assert "Load test: no loadtest/loadtest.json" in md and "`loralens loadtest " in md
    assert "Sanity checks: not computed yet" in md
    assert "Hyperparameter search: not computed yet" in md
    assert "Figures 1, 2, 3, 5 and 7 (accuracy vs drift" in md and "appear once the drift" in md
    # what exists is shown: the one accuracy, the rows used, the model
    assert "0.8125" in md and "| sst2 | 640 |" in md and "not the study's TinyLlama" in md
    assert not list((run.report_dir / "figures").glob("*.png"))
    assert "<img" not in html and '<table id="table-3-accuracy">' in html


def test_report_of_empty_or_broken_directory(tmp_path):
    from loralens.report import build_report

    (tmp_path / "empty").mkdir()
    md = Path(build_report(tmp_path / "empty")).with_suffix(".md").read_text()
    assert "No config.yaml" in md and "not computed yet" in md
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "nope")
    # an unreadable file is reported, not fatal
    run = synthetic_run(tmp_path / "run", stages=("train",))
    run.drift_dir.mkdir()
    run.drift_path("table4.json").write_text("{not json")
    md = Path(build_report(run)).with_suffix(".md").read_text()
    assert "Unreadable file" in md and "table4.json" in md
    # a metrics.json without validation results (a placeholder): Table 3 says which
    atomic_write_json(run.metrics_path("rte", "lora", 42),
                      {"task": "rte", "method": "lora", "seed": 42, "note": "untrained"})
    md = Path(build_report(run)).with_suffix(".md").read_text()
    assert "Accuracy: 1 metrics.json without validation results " \
           "(models/rte/lora/seed42/metrics.json)" in md


def test_figures_removed_when_results_go_away(tmp_path):
    """A figure that cannot be drawn now must not linger from an earlier report."""
    import shutil

    from loralens.report import build_report

    run = synthetic_run(tmp_path / "run", stages=("train", "extract", "drift"))
    build_report(run)
    figs = run.report_dir / "figures"
    assert (figs / "fig3-layerwise-drift.png").is_file()
    assert not (figs / "fig4-latency.png").exists()
    shutil.rmtree(run.drift_dir)
    build_report(run)
    assert not (figs / "fig3-layerwise-drift.png").exists()
    md = (run.report_dir / "report.md").read_text()
    assert "Drift: not computed yet" in md


def test_one_seed_without_search(tmp_path):
    """The smoke preset's shape: one seed (no paired test), search disabled."""
    from loralens.report import build_report

    run = synthetic_run(tmp_path / "run", seeds=(42,), search=False)
    build_report(run)
    md = (run.report_dir / "report.md").read_text()
    assert "Search disabled" in md and "(used in training)" in md and "search disabled" in md
    assert "| search | disabled |" in md
    assert "0.8100" in md and "42: 0.8100" in md
    assert "at least 2 paired seeds" in md  # why p, d and the CIs are empty
    figs = sorted(p.stem for p in (run.report_dir / "figures").glob("*.png"))
    assert len(figs) == 9  # Figures 1-5, load test's 6, outliers' 7, weight space's 8, 9
    assert "not computed yet" not in md


def test_formatting_helpers():
    from loralens.report.formatting import ci, d_, f, g, pm, pval, seconds, signed_pct

    assert f(None) == "–" and f(float("nan")) == "–" and f(0.81234) == "0.8123"
    assert pm(0.82, 0.01) == "0.8200 ± 0.0100" and pm(0.82, None) == "0.8200"
    assert g(0.0012345) == "0.00123" and ci([1.0, 2.0]) == "[1, 2]" and ci(None) == ""
    assert pval(0.0) == "0" and pval(0.04) == "0.040" and pval(1e-7) == "1.0e-07"
    assert signed_pct(16.63) == "+16.6%" and signed_pct(-0.01) == "±0.0%"
    assert seconds(90) == "90.0 s" and seconds(600) == "10.0 min" and seconds(0.04) == "40 ms"
    assert d_(-3.0) == "-3.00" and d_(None) == "–"


def test_log_axes_when_lora_drifts_far_less():
    from loralens.report.drift_figures import _needs_log

    lo, fu = np.array([0.0, 1e-4, 1e-3]), np.array([0.01, 0.1, 0.3])
    assert _needs_log({("sst2", "lora", 42): lo, ("sst2", "full", 42): fu})
    assert not _needs_log({("sst2", "lora", 42): lo * 100, ("sst2", "full", 42): fu})
    assert not _needs_log({("sst2", "lora", 42): lo})  # one method: nothing to compare


def _section(md: str, start: str, end: str) -> str:
    return md[md.index(start):md.index(end, md.index(start))]


def test_table3_and_4_state_families_signs_and_resamples(full_report):
    run, _, _ = full_report
    md = (run.report_dir / "report.md").read_text()
    t3 = _section(md, "**Table 3:", "**Table 3b")
    # Hand values: sst2 LoRA - full = [-0.03, -0.04, -0.02], mean -0.03, sd 0.01:
    # d = -3, t = -0.03 / (0.01 / sqrt 3) = -5.196, two-sided p (2 df) = 1 - 5.196 / sqrt(29)
    # = 0.0351, x 2 tests = 0.070. rte: [0.02, 0.01, 0.03]: d = 2, t = 3.464,
    # p = 1 - 3.464 / sqrt(14) = 0.0742. Holm (the default): the smaller x 2 = 0.070, the
    # larger x 1 = 0.074 (Bonferroni would give 0.148).
    assert "| -0.0300 | 0.035 | 0.070 (Holm) | -3.00 | no |" in t3
    assert "| +0.0200 | 0.074 | 0.074 (Holm) | 2.00 | no |" in t3
    assert "| f1" not in t3  # F1 is not SST-2's or RTE's study metric
    assert "Holm family (declared from the config before any number is computed): 2 tests, " \
           "the study metric of each configured task (sst2 accuracy, rte accuracy)" in t3
    assert "Cohen's d = mean(LoRA − full) / sd(LoRA − full, ddof 1)" in t3
    assert "positive when LoRA scores higher" in t3
    t4 = _section(md, "**Table 4:", "**Table 4b")
    # one family per drift measure (as per state), each the 2 configured tasks
    assert "one family per measure, each of 2 tests: the configured tasks" in t4
    assert "the m = 2 p-values" in t4
    assert "positive when full fine-tuning drifts more (the paper's sign)" in t4
    assert "3 seeds allow only 10 distinct resamples" in t4
    assert "averaged over hidden states 1–4 (drift.layers = blocks)" in t4
    assert "4 = block 4 after the final norm" in t4
    assert "Per-state tests" in t4 and "one Holm family per measure of 8 tests" in t4
    assert "Seed floor (LoRA / full FT)" in t4 and "compare tasks with the debiased rows" in t4
    assert "1 − linear CKA, standardised (debiased)" in t4 and "not tested" in t4
    assert "**Table 4b: how much a few dimensions decide**" in md
    # each figure says which CKA form it draws
    assert "1 − debiased linear CKA to the base model" in md          # Figure 1
    assert "1 − linear CKA, biased: the paper's measure" in md        # Figure 3
    assert "Figure 2: drift reduction per task.** Δ%" in md and \
           "3 seeds allow only 10 distinct resamples); * significant after the Holm " \
           "correction within each drift measure's family" in md


def test_zero_spread_is_undefined_and_example_level_table(tmp_path, monkeypatch):
    """Scores on a 1/n grid, LoRA one example ahead at every seed: zero spread, never
    significant; Table 3c tests each seed over the validation examples."""
    import scipy.stats

    from loralens.report import build_report

    monkeypatch.delenv("LORALENS_GLUE_DIR", raising=False)
    run = synthetic_run(tmp_path / "run", stages=("train",))
    rng = np.random.default_rng(1)
    ks = {}
    for t in TASKS:
        n = N_VAL[t]
        labels = rng.integers(0, 2, n)
        for i, s in enumerate(SEEDS):
            for m, k in (("lora", n // 2 + i + 1), ("full", n // 2 + i)):
                pred = labels.copy()
                pred[k:] = 1 - pred[k:]            # right on the first k examples
                np.save(run.val_logits_path(t, m, s), np.eye(2, dtype=np.float32)[pred])
                write_metrics(run, t, m, s, k / n)
                ks[(t, m, s)] = k
    build_report(run)
    md = (run.report_dir / "report.md").read_text()
    t3 = _section(md, "**Table 3:", "**Table 3b")
    row = next(line for line in t3.splitlines() if line.startswith("| sst2 | accuracy *"))
    assert row.endswith("| undefined (zero spread) | – | – | no (p undefined) |")
    assert "| yes |" not in t3 and "Zero spread:" in t3
    # Table 3c: b = 1 (LoRA right, full wrong), c = 0 at every seed -> exact p = 1
    assert "**Table 3c: LoRA vs full fine-tuning per seed, paired by validation example**" in md
    t3c = _section(md, "**Table 3c", "**Table 3b")
    for s in SEEDS:
        k = ks[("sst2", "lora", s)]
        ci = scipy.stats.binomtest(k, 40).proportion_ci(0.95, "wilson")
        # every model sits at 0.5-0.55 of a balanced task: the task carries the mark
        assert f"| sst2 ‡ | {s} | 40 | {k / 40:.4f} [{ci.low:.4f}, {ci.high:.4f}] |" in t3c
    # computed by the report before the drift stage ran: corrected with the config's
    # stats.correction (the smoke preset's default, Holm), as the drift stage will
    assert t3c.count("| 1 | 0 | 1.000 | 1.000 (Holm) | no |") == 6
    assert "Holm family (declared from the config before any number is computed): 6 tests, " \
           "configured tasks × seeds" in t3c
    assert "‡ not above the majority class: a row of a task" in t3c
    assert "the discordant counts are derived" in t3c  # no GLUE files in this run


def test_report_of_an_older_drift_stage(tmp_path):
    """table4.json as the drift stage wrote it before families and drift.layers."""
    from loralens.report import build_report
    from loralens.core.files import read_json

    run = synthetic_run(tmp_path / "run", stages=("train", "extract", "drift"))
    t4 = read_json(run.drift_path("table4.json"))
    for key in ("families", "drift_layers", "cohens_d"):
        t4.pop(key)
    for e in t4["tasks"]:
        e["layers_averaged"] = [0, e.pop("layers")[-1]]
    atomic_write_json(run.drift_path("table4.json"), t4)
    build_report(run)
    md = (run.report_dir / "report.md").read_text()
    t4md = _section(md, "**Table 4:", "**Table 4b")
    assert "an older drift stage averaged every state" in t4md and "| 0–4 |" in t4md
    assert "Family not recorded" in t4md and "an older drift stage: negative when" in t4md
