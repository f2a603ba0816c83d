"""Issue 26 (points 1, 3, 4a): models not above the majority class are marked wherever they
are compared; a scale banner; the seed floor is a reference, not noise; debiased CKA leads.

RunData is built by hand (no model, no stage): literal expected values and counter-examples.
"""

from __future__ import annotations

import numpy as np

from loralens.core.run_dir import RunDir
from loralens.report.run_data import RunData

SEEDS = (42, 1337)


def _job(acc: float, n: int, majority: float, steps: int = 4, rows: int = 64,
         device: str = "cpu") -> dict:
    return {"validation": {"accuracy": acc, "f1": acc, "n": n},
            "majority_baseline": {"label": 1, "accuracy": majority, "f1": majority},
            "model": "smollm2-135m", "device": device,
            "fit": {"steps": steps, "epochs": 1, "precision": "fp32"},
            "data": {"train": {"rows": rows}}}


def _cmp(lo: float, fu: float, **kw) -> dict:
    return {"lora": {"mean": lo, "sd": 0.001}, "full": {"mean": fu, "sd": 0.001}, **kw}


def _run(tmp_path, rte_acc: float = 0.80) -> RunData:
    """sst2: 0.80 of 100 against majority 0.70 (Wilson lower bound 0.7112: above);
    rte: ``rte_acc`` of 100 against majority 0.72 (0.80: lower bound 0.7112, not above)."""
    d = RunData(RunDir(tmp_path / "run"))
    d.config = {"tasks": ["sst2", "rte"], "methods": ["lora", "full"], "seeds": list(SEEDS),
                "search": {"enabled": False}}
    for s in SEEDS:
        for m in ("lora", "full"):
            d.jobs[("sst2", m, s)] = _job(0.80, 100, 0.70)
            d.jobs[("rte", m, s)] = _job(rte_acc if m == "lora" and s == 42 else 0.90, 100, 0.72)
    d.table3 = {"tasks": [
        {"task": t, "selection_metric": "accuracy", "n_validation": [100],
         "majority_baseline": {"accuracy": maj},
         "metrics": {"accuracy": _cmp(0.8, 0.8, p=0.0123, p_bonferroni=0.0246, n_tests=2,
                                      cohens_d=1.0, significant=True, difference=0.0,
                                      all_seeds={"lora": {}, "full": {}})}}
        for t, maj in (("sst2", 0.70), ("rte", 0.72))]}
    floor = {"lora": {"mean": 0.5}, "full": {"mean": 0.5}}
    d.table4 = {"tasks": [
        {"task": t, "n_examples": 100, "requested": 100, "layers": [1, 2],
         "measures": {  # stored biased first, as the drift stage writes them
             "cka": _cmp(0.001, 0.002, delta_percent=50.0, p=0.001, p_bonferroni=0.006,
                         significant=True, seed_floor=floor),
             "cka_debiased": _cmp(0.01, 0.02, delta_percent=50.0, p=0.001,
                                  p_bonferroni=0.006, significant=True, seed_floor=floor)}}
        for t in ("sst2", "rte")]}
    return d


def _text(table) -> str:
    return "\n".join([table.title, *(" | ".join(r) for r in table.rows), *table.notes])


# --------------------------------------------------------------------------- point 1

def test_table3d_gives_wilson_intervals_and_marks_rte(tmp_path):
    from loralens.report.accuracy_tables import table3_learned

    t = table3_learned(_run(tmp_path))
    rows = {(r[0], r[1], r[2]): r for r in t.rows}
    # Wilson for 80 of 100 at 95%: [0.7112, 0.8666] (by hand: test_learned.py)
    assert rows[("sst2", "LoRA", "42")][4:] == ["0.8000", "[0.7112, 0.8666]", "0.7000",
                                               "above"]
    assert rows[("rte", "LoRA", "42")][4:] == ["0.8000", "[0.7112, 0.8666]", "0.7200",
                                              "not above the majority class ‡"]
    assert rows[("rte", "full FT", "42")][-1] == "above"


def test_a_model_below_the_majority_is_marked_too(tmp_path):
    from loralens.report.accuracy_tables import not_learned

    assert not_learned(_run(tmp_path, rte_acc=0.62)) == [("rte", "lora", 42)]


def test_f1_without_predictions_says_so_in_the_cell(tmp_path):
    from loralens.report.accuracy_tables import table3_learned

    d = RunData(RunDir(tmp_path / "run"))
    d.config = {"tasks": ["mrpc"], "seeds": [42]}
    d.jobs[("mrpc", "lora", 42)] = _job(0.80, 408, 0.81)
    row = table3_learned(d).rows[0]
    assert row[3] == "f1" and "no per-example predictions (val_logits.npy)" in row[5]
    assert row[-1] == "not checked"


def test_table3_has_the_mark_column(tmp_path):
    from loralens.report.accuracy_tables import table3

    t = table3(_run(tmp_path))
    assert t.columns[3:5] == ["Majority", "Not above the majority class"]
    assert [r[4] for r in t.rows] == ["none", "LoRA seed 42 ‡"]


# --------------------------------------------------------------------------- point 2

def test_glance_leads_with_the_sentence_and_labels_p(tmp_path):
    from loralens.report.compose import glance

    lines = glance(_run(tmp_path))
    sst2, rte = lines
    assert rte.startswith("**rte**: LoRA seed 42 is not above the majority class (95% "
                          "interval of accuracy reaching down to the majority class's 0.7200")
    assert "not above" not in sst2
    assert "(p = 0.012 uncorrected; Bonferroni over 2 tasks: 0.025)" in sst2
    assert ("(significant after Bonferroni) ‡ (compares models not above the majority "
            "class: not evidence about the methods)") in rte
    # the accuracy comparison carries the mark too; sst2's none
    assert "(p = 0.012 uncorrected; Bonferroni over 2 tasks: 0.025) ‡; drift" in rte
    assert "‡" not in sst2


def test_glance_names_the_stored_correction(tmp_path):
    from loralens.report.compose import glance

    d = _run(tmp_path)
    c = d.table3["tasks"][0]["metrics"]["accuracy"]
    del c["p_bonferroni"]
    c.update(p_adjusted=0.0246, correction="holm")
    d.table4["tasks"][0]["measures"]["cka_debiased"]["correction"] = "holm"
    sst2 = glance(d)[0]
    assert "(p = 0.012 uncorrected; Holm over 2 tasks: 0.025)" in sst2
    assert "(significant after Holm)" in sst2


def test_drift_weight_and_figure_texts_name_the_marked_models(tmp_path):
    from loralens.report.accuracy_tables import figure_learned_line
    from loralens.report.drift_tables import table4

    d = _run(tmp_path)
    t = table4(d)
    assert [r[0] for r in t.rows] == ["sst2", "sst2", "rte ‡", "rte ‡"]
    assert any(n.startswith("‡ not above the majority class") and "rte: LoRA seed 42." in n
               for n in t.notes)
    assert figure_learned_line(d) == (
        " Not above the majority class (‡, Table 3d; not shown to have learned the task, so "
        "their drift compares models that may not have learned it): rte: LoRA seed 42.")


def test_table3c_and_table4b_mark_the_task(tmp_path):
    """Table 3c (per seed, LoRA vs full on the same examples) and Table 4b (variance shares
    and drift per model) compare rte's models, one of which (LoRA seed 42) is not above the
    majority class: rte's rows carry the mark and the tables Table 3's footnote."""
    from loralens.report.accuracy_tables import table3_examples
    from loralens.report.drift_tables import table4_outliers

    d = _run(tmp_path)
    for e in d.table3["tasks"]:
        e["example_level"] = [
            {"seed": s, "n": 100, "lora": {"accuracy": 0.8, "ci": [0.71, 0.87]},
             "full": {"accuracy": 0.9, "ci": [0.83, 0.94]}, "lora_right_full_wrong": 2,
             "lora_wrong_full_right": 12, "p": 0.0129, "p_bonferroni": 0.0516,
             "significant": False} for s in SEEDS]
    share = {"top1": {"mean": 0.5, "max": 0.9, "max_state": 2},
             "top5": {"mean": 0.8, "max": 0.95, "max_state": 2}}
    for e in d.table4["tasks"]:
        e["outliers"] = {"base": share, "lora": share, "full": share}
    footnote = ("‡ not above the majority class: a row of a task where some model's 95% "
                "validation interval reaches down to the majority-class score (Table 3d), so "
                "it compares models not shown to have learned the task: rte: LoRA seed 42.")
    t3c = table3_examples(d)
    assert [r[:2] for r in t3c.rows] == [["sst2", "42"], ["sst2", "1337"], ["rte ‡", "42"],
                                         ["rte ‡", "1337"]]
    assert footnote in t3c.notes
    t4b = table4_outliers(d)
    assert [r[:2] for r in t4b.rows] == [
        ["sst2", "base model"], ["sst2", "LoRA"], ["sst2", "full FT"],
        ["rte ‡", "base model"], ["rte ‡", "LoRA"], ["rte ‡", "full FT"]]
    assert footnote in t4b.notes
    # every model above the majority: no mark, no footnote
    d = _run(tmp_path, rte_acc=0.90)
    d.table4["tasks"][0]["outliers"] = {"lora": share}
    t4b = table4_outliers(d)
    assert [r[0] for r in t4b.rows] == ["sst2"] and not any("‡" in n for n in t4b.notes)


# --------------------------------------------------------------------------- point 3: floor

def test_seed_floor_is_a_reference_never_noise(tmp_path):
    """Counter-example: the seeds sit far apart (floor 0.5), each at the same small distance
    from the base, and LoRA vs full is a real, significant difference: no word of noise."""
    from loralens.report.drift_tables import table4

    text = _text(table4(_run(tmp_path)))
    assert "noise" not in text.lower()
    assert "a reference for the size of drift" in text
    assert "never by this column" in text


# --------------------------------------------------------------------------- point 4a

def test_table4_leads_with_debiased_cka(tmp_path):
    from loralens.report.drift_tables import table4

    rows = table4(_run(tmp_path)).rows
    assert rows[0][1] == "1 − linear CKA (debiased)"
    assert rows[1][1] == "1 − linear CKA (biased), the published column"


def test_drift_summary_line_leads_with_debiased():
    from loralens.analysis.drift.stage import summary_lines

    e = {"task": "mrpc", "layers": [1, 2, 3], "n_examples": 408, "requested": 750,
         "measures": {"cka": {"lora": {"mean": 0.000156, "sd": None},
                              "full": {"mean": 0.000614, "sd": None},
                              "delta_percent": 74.5, "p": None},
                      "cka_debiased": {"lora": {"mean": 0.0123, "sd": None},
                                       "full": {"mean": 0.0456, "sd": None},
                                       "delta_percent": 73.0, "p": None}}}
    (line,) = summary_lines({"table4": [e], "notes": []})
    assert line == ("drift mrpc (1 - debiased CKA over states 1–3, 408 examples of 750 "
                    "requested): LoRA 0.0123, full 0.0456, Delta +73.0%; biased CKA, the "
                    "published column: LoRA 0.0002, full 0.0006")


def test_figure3_draws_debiased_first(tmp_path):
    from loralens.report.figures import FIGURES, _fig3_measures

    d = _run(tmp_path)
    d.layers = [{"cka": 0.9, "cka_debiased": 0.8}]
    assert _fig3_measures(d) == ("cka_debiased", "cka")
    caption = next(c for fid, _, c, _ in FIGURES if fid == "fig3-layerwise-drift")
    assert caption.index("debiased") < caption.index("biased: the paper's measure")


# --------------------------------------------------------------------------- scale banner

def test_scale_banner_follows_the_data(tmp_path):
    from loralens.report.compose import scale_banner

    small = _run(tmp_path / "a")
    small.env = {"run": {"hardware": {"processor": "AMD EPYC 7B13", "cpu_count": 2}}}
    big = RunData(RunDir(tmp_path / "b"))
    big.config = {"tasks": ["sst2"], "methods": ["lora", "full"], "seeds": [42, 1337, 2024],
                  "search": {"enabled": True, "trials": 15}}
    big.env = {"run": {"hardware": {"processor": "x86_64", "cpu_count": 16, "cuda": True,
                                    "gpu": "NVIDIA H100"}}}
    for s in (42, 1337, 2024):
        for m in ("lora", "full"):
            big.jobs[("sst2", m, s)] = _job(0.92, 872, 0.51, steps=4000, rows=60000,
                                            device="cuda:0")
    big.extract = {"sst2": {"n_examples": 750}}
    a, b = scale_banner(small), scale_banner(big)
    assert a != b
    for frag in ("model smollm2-135m", "cpu, CPU AMD EPYC 7B13 with 2 cores", "dtype fp32",
                 "training rows sst2 64, rte 64", "optimizer steps per job 4", "search off",
                 "2 seeds (42, 1337)", "extraction rows None requested, none extracted yet",
                 "it cannot show whether the methods differ in accuracy or drift, because at "
                 "most 4 optimizer steps per job may not teach a model its task",
                 "2 seeds per method give an unreliable seed-to-seed spread",
                 "1 of 8 models are not above the majority class (Table 3d)"):
        assert frag in a, frag
    for frag in ("cuda:0 (NVIDIA H100), CPU x86_64 with 16 cores",
                 "training rows sst2 60000", "optimizer steps per job 4000",
                 "search on (15 trials per task and method)", "3 seeds (42, 1337, 2024)",
                 "extraction rows sst2 750",
                 "can compare the methods on these tasks for smollm2-135m within the spread "
                 "of its seeds; it cannot show that the result holds for other models"):
        assert frag in b, frag
    assert "cannot show whether" not in b
