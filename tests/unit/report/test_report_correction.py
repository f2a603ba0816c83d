"""The family-wise correction comes from the run's config wherever a table is computed, and
every part of the report reads the same resolved value; Figure 5 no longer repeats Figure 3.
Model-free: tests/helpers/report_run.py's synthetic run directories."""

from __future__ import annotations

import re

import yaml

from tests.helpers.report_run import synthetic_run

# tests/helpers/report_run.py ACCURACY, by hand: sst2 LoRA - full = [-0.03, -0.04, -0.02]:
# mean -0.03, sd 0.01, t = -5.196 (2 df), p = 1 - 5.196 / sqrt(29) = 0.0351; rte [0.02,
# 0.01, 0.03]: t = 3.464, p = 1 - 3.464 / sqrt(14) = 0.0742. A family of the 2 tasks:
# Holm: the smaller p x 2 = 0.070, the larger x 1 = 0.074; Bonferroni: 0.070 and 0.148.
HOLM = ("| -0.0300 | 0.035 | 0.070 (Holm) | -3.00 | no |",
        "| +0.0200 | 0.074 | 0.074 (Holm) | 2.00 | no |")
BONFERRONI = ("| -0.0300 | 0.035 | 0.070 | -3.00 | no |",
              "| +0.0200 | 0.074 | 0.148 | 2.00 | no |")


def _md_rows(table) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in table.rows)


def _config(run) -> dict:
    return yaml.safe_load(run.config_path.read_text())


def _write_config(run, data: dict) -> None:
    run.config_path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_table3_before_drift_uses_the_configs_correction(tmp_path):
    """Table 3 computed by the report (no drift/table3.json yet) is corrected with the
    config's stats.correction, as the drift stage will: Holm by default (an earlier version
    fell back to Bonferroni here), Bonferroni where the config asks for it."""
    from loralens.report.accuracy_tables import table3
    from loralens.report.run_data import load_run

    run = synthetic_run(tmp_path / "run", stages=("train",))
    assert _config(run)["stats"]["correction"] == "holm"
    t3 = table3(load_run(run))
    rows = _md_rows(t3)
    for want in HOLM:
        assert want in rows
    assert any(n.startswith("Holm family (declared from the config before any number is "
                            "computed): 2 tests") for n in t3.notes)
    assert not any(n.startswith("Bonferroni family") for n in t3.notes)

    data = _config(run)
    data["stats"]["correction"] = "bonferroni"
    _write_config(run, data)
    t3 = table3(load_run(run))
    rows = _md_rows(t3)
    for want in BONFERRONI:
        assert want in rows
    assert any(n.startswith("Bonferroni family: 2 tests") and "min(1, p × 2)" in n
               for n in t3.notes)


def test_a_config_from_before_stats_correction_reads_one_value_everywhere(tmp_path):
    """config.yaml without stats.correction (written before the key existed). Tables 3 and
    4, the captions and the differences table read one value: the correction the stored
    tests were made with (a drift stage run since then: today's default, Holm; one run
    before the choice existed: Bonferroni), and with no stored test today's default, which
    the stages apply to such a config. An earlier version rebuilt the differences table
    with today's default (a Holm row) whatever the tables said."""
    from loralens.core.files import atomic_write_json, read_json
    from loralens.report.accuracy_tables import table3
    from loralens.report.drift_tables import table4
    from loralens.report.provenance_tables import table_differences
    from loralens.report.run_data import load_run
    from loralens.report.significance import correction_name

    def differences(d) -> list[str]:
        return [r[0] for r in table_differences(d).rows]

    run = synthetic_run(tmp_path / "run", stages=("train", "extract", "drift"))
    data = _config(run)
    del data["stats"]["correction"]
    _write_config(run, data)
    # 1. a drift stage run by today's code (families corrected with Holm, as stored)
    d = load_run(run)
    assert correction_name(d) == "Holm" and "Holm correction" in differences(d)
    for want in HOLM:
        assert want in _md_rows(table3(d))

    # 2. drift files from before the choice: families without "correction" (Bonferroni)
    for name in ("table3.json", "table4.json"):
        stored = read_json(run.drift_path(name))
        for fam in stored["families"].values():
            fam.pop("correction", None)
        atomic_write_json(run.drift_path(name), stored)
    d = load_run(run)
    assert correction_name(d) == "Bonferroni"  # Figure 2's caption
    assert "Holm correction" not in differences(d)
    assert not any("Holm" in cell for r in table_differences(d).rows for cell in r)
    assert any(n.startswith("Bonferroni family: 2 tests") for n in table3(d).notes)
    assert any(n.startswith("Bonferroni family: one family per measure")
               for n in table4(d).notes)

    # 3. no stored test yet: Table 3 computed by the report with today's default, Holm,
    # which the drift stage will apply to this config too; the differences table agrees
    for name in ("table3.json", "table4.json"):
        run.drift_path(name).unlink()
    d = load_run(run)
    assert correction_name(d) == "Holm" and "Holm correction" in differences(d)
    for want in HOLM:
        assert want in _md_rows(table3(d))

    # an explicit stats.correction: bonferroni wins over today's default everywhere
    data["stats"]["correction"] = "bonferroni"
    _write_config(run, data)
    d = load_run(run)
    assert correction_name(d) == "Bonferroni" and "Holm correction" not in differences(d)
    for want in BONFERRONI:
        assert want in _md_rows(table3(d))


def test_figure_numbers_unique_and_captions_distinct(tmp_path):
    """Figure 5 draws the cosine alone: debiased CKA per state is Figure 3's top row, drawn
    and captioned once. Every figure number is used once, the drift section shows its
    figures in increasing order, and no two captions are the same text."""
    from loralens.report import build_report
    from loralens.report.figures import FIGURES
    from loralens.report.run_data import load_run

    run = synthetic_run(tmp_path / "run", stages=("train", "extract", "drift"))
    d = load_run(run)
    titles = {fid: (t if isinstance(t, str) else t(d)) for fid, t, _, _ in FIGURES}
    numbers = [m.group(1) for t in titles.values() if (m := re.match(r"Figure (\w+):", t))]
    assert len(numbers) == len(titles) and len(set(numbers)) == len(numbers)
    fig5 = next(fn for fid, _, _, fn in FIGURES if fid == "fig5-layerwise-cosine")(d)
    # one row of panels, one per task (rte's models sit near chance on 24 rows: marked)
    assert [ax.get_title() for ax in fig5.axes] == ["sst2", "rte ‡"]
    assert fig5.axes[0].get_ylabel() == "drift, 1 − mean cosine"
    fig3 = next(fn for fid, _, _, fn in FIGURES if fid == "fig3-layerwise-drift")(d)
    assert [ax.get_ylabel() for ax in fig3.axes if ax.get_ylabel()] == [
        "drift, 1 − linear CKA (debiased)", "drift, 1 − linear CKA (biased)"]

    md = (build_report(run).with_suffix(".md")).read_text()
    shown = re.findall(r"^\*\*Figure (\w+): (.*?)\.\*\* (.*?) \(Vector version", md, re.M)
    assert [n for n, _, _ in shown] == ["1", "2", "3", "5", "7"]
    captions = [c for _, _, c in shown]
    assert len(set(captions)) == len(captions)
    fig5_caption = next(c for n, _, c in shown if n == "5")
    assert "debiased" not in fig5_caption and "As Figure 3" not in fig5_caption
    assert "Figure 5: layer-wise drift, cosine of paired examples" in md
    assert not (run.report_dir / "figures" / "fig5-layerwise-debiased-cosine.png").exists()
