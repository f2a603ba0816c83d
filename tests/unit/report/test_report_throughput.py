"""The report's training throughput table: numbers checked against hand computation.

Jobs are metrics.json dicts built here (only their "fit" matters); the report-level tests
use ``tests.helpers.report_run.synthetic_run``, whose jobs record throughput unless told
otherwise.
"""

from __future__ import annotations

import pytest

from loralens.report.formatting import DASH, pct, rate
from loralens.report.run_data import RunData
from loralens.report.timing_tables import table_throughput
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json, read_json
from tests.helpers.report_run import synthetic_run, write_metrics

COLUMNS = ["Task", "Method", "Precision", "Jobs (seeds)", "Real tokens/s", "Achieved GFLOP/s",
           "MFU (square-GEMM peak)", "MFU (model-shape peak)", "Peak GFLOP/s (square GEMM)",
           "Peak GFLOP/s (model shapes)", "Fit time outside steps"]


def job(fit: dict | None) -> dict:
    return {"task": "sst2", "fit": fit}


def full_fit(tokens: int, outside: float, stored: bool = True) -> dict:
    """A full fine-tuning job: 10 s of steps, 6e9 FLOPs per real token, peaks of 4 and
    2.4 TFLOP/s; ``stored=False`` leaves the rates for the report to derive."""
    step, flops = 10.0, 6e9 * tokens
    fit = {"precision": "fp32", "precision_note": "auto: fp32 faster here",
           "train_flops": flops, "step_seconds": step, "train_seconds": step / (1 - outside),
           "eval_seconds": 1.0, "real_tokens": tokens,
           "peak_flops_per_s": 4e12, "peak_model_flops_per_s": 2.4e12}
    if stored:
        fit |= {"achieved_flops_per_s": flops / step, "mfu": flops / step / 4e12,
                "mfu_model_shapes": flops / step / 2.4e12}
    return fit


def run_data(tmp_path, jobs: dict) -> RunData:
    return RunData(run=RunDir(tmp_path), config={"tasks": ["sst2", "rte"],
                                                 "methods": ["lora", "full"]}, jobs=jobs)


def rows_by(t) -> dict:
    return {(r[0], r[1]): dict(zip(t.columns, r)) for r in t.rows}


def test_formatting_of_rates_and_percents():
    assert pct(0.25) == "25.0%" and pct(0.128) == "12.8%" and pct(0.0004) == "0.04%"
    assert pct(0) == "0.0%" and pct(None) == DASH and pct(float("nan")) == DASH
    assert rate(37.5) == "37.5" and rate(200.0) == "200" and rate(12345.6) == "12,346"
    assert rate(186.3e9, 1e9) == "186" and rate(7.25) == "7.25" and rate("x") == DASH


def test_medians_match_hand_computation(tmp_path):
    # tokens/s 100, 200, 400 -> 200; achieved 0.6, 1.2, 2.4 TFLOP/s -> 1,200 GFLOP/s;
    # MFU 15%, 30%, 60% of 4 TFLOP/s -> 30.0%; of 2.4 TFLOP/s 25%, 50%, 100% -> 50.0%;
    # outside steps 20%, 10%, 5% -> 10.0%. Seed 2 stores no rates: derived the same way.
    d = run_data(tmp_path, {("sst2", "full", 3): job(full_fit(4000, 0.05)),
                            ("sst2", "full", 1): job(full_fit(1000, 0.2)),
                            ("sst2", "full", 2): job(full_fit(2000, 0.1, stored=False)),
                            ("sst2", "lora", 1): job({"precision": "bf16"})})
    t = table_throughput(d)
    assert t.id == "table-throughput" and t.columns == COLUMNS
    assert [r[:2] for r in t.rows] == [["sst2", "LoRA"], ["sst2", "full FT"]]  # config order
    assert t.rows[1] == ["sst2", "full FT", "fp32", "3 (1, 2, 3)", "200", "1,200", "30.0%",
                         "50.0%", "4,000", "2,400", "10.0%"]
    # a job that records only its precision: dashes, never a crash
    assert t.rows[0] == ["sst2", "LoRA", "bf16", "1 (1)"] + [DASH] * 7
    notes = " ".join(t.notes)
    assert "Medians over the seeds of each row (Jobs: 1 to 3)" in notes
    assert "6N for full fine-tuning, 4N + 2n for LoRA" in notes and "padding" in notes
    assert "measured in the training process, on the machine that trained" in notes
    assert "Why this precision, sst2 full FT: auto: fp32 faster here." in notes
    assert "k of n" not in notes and "predate" not in notes


def test_one_seed_per_row_is_not_called_a_median(tmp_path):
    t = table_throughput(run_data(tmp_path, {("rte", "full", 7): job(full_fit(500, 0.5))}))
    assert t.rows == [["rte", "full FT", "fp32", "1 (7)", "50", "300", "7.5%", "12.5%",
                       "4,000", "2,400", "50.0%"]]
    assert t.notes[0].startswith("One seed per row (Jobs): its values, not medians.")
    assert "Why this precision: auto: fp32 faster here." in t.notes  # one note, every row


def test_run_before_throughput_recording(tmp_path):
    """No job has the keys: no table, one note line in the report, nothing crashes."""
    from loralens.report.compose import compose
    from loralens.report.render import to_html, to_markdown
    from loralens.report.run_data import load_run

    old = {"history": [], "steps": 4, "train_seconds": 30.0, "real_tokens": 900}
    assert table_throughput(run_data(tmp_path, {("sst2", "full", 1): job(old),
                                                ("sst2", "lora", 1): job(None)})) is None
    assert table_throughput(run_data(tmp_path, {})) is None

    run = synthetic_run(tmp_path / "run", stages=("train",), throughput=False)
    blocks = compose(load_run(run), [], {})
    md, html = to_markdown(blocks), to_html(blocks)
    assert md.count("predates throughput recording") == 1
    assert "Training throughput and FLOPs utilisation**" not in md
    assert 'id="table-throughput"' not in html and "could not be built" not in md
    # no job at all: neither the table nor the note
    empty = compose(load_run(synthetic_run(tmp_path / "empty", stages=())), [], {})
    text = to_markdown(empty)
    assert "predates throughput" not in text and "FLOPs utilisation" not in text


def test_mixed_run(tmp_path):
    """Older and newer jobs in one run directory (a resumed run): the table rests on the
    newer ones, names the others, and marks a value only some jobs recorded."""
    from loralens.report.compose import compose
    from loralens.report.render import to_markdown
    from loralens.report.run_data import load_run

    run = synthetic_run(tmp_path / "run", stages=("train",))
    write_metrics(run, "sst2", "lora", 42, 0.81, throughput=False)
    path = run.metrics_path("rte", "full", 1337)
    m = read_json(path)
    m["fit"].pop("step_seconds")
    m["fit"].pop("achieved_flops_per_s")  # and MFU stays as stored
    m["fit"]["precision"] = "bf16"
    m["fit"]["precision_note"] = "forced: train.precision=bf16"
    atomic_write_json(path, m)

    md = to_markdown(compose(load_run(run), [], {}))
    # sst2 LoRA: seeds 1337 and 2024, 900 tokens in 24 and 25 s -> 37.5 and 36 tokens/s
    assert "| sst2 | LoRA | fp32 | 2 (1337, 2024) | 36.8 |" in md
    # rte full FT: seed 1337 has no step seconds: medians of 42 and 2024 (20 and 25 s of
    # 30): 45 and 36 tokens/s, 6N x 900 / 20 and / 25 s = 28.6 and 22.9 GFLOP/s, 33% and
    # 17% outside steps; MFU is stored for all three (12.3%, 12.8%, 15.4%)
    assert ("| rte | full FT | fp32 (2), bf16 (1) | 3 (42, 1337, 2024) | 40.5 (2 of 3) "
            "| 25.8 (2 of 3) | 12.8% | 15.9% | 186 | 150 | 25.0% (2 of 3) |") in md
    assert "Medians over the seeds of each row (Jobs: 2 to 3)." in md
    assert "\"k of n\": only k of a row's n jobs recorded that value." in md
    assert ("1 of 12 finished jobs predate throughput recording and are not in these "
            "medians: sst2 LoRA seed 42.") in md
    assert "Why this precision, sst2 LoRA, sst2 full FT, rte LoRA, rte full FT: auto:" in md
    assert "Why this precision, rte full FT: forced: train.precision=bf16." in md
    assert "predates throughput recording" not in md


@pytest.mark.parametrize("fit", [None, "broken", {"step_seconds": 0, "real_tokens": 10},
                                 {"step_seconds": "3", "train_flops": True, "mfu": None,
                                  "peak_flops_per_s": float("nan"), "train_seconds": 0}])
def test_malformed_values_give_dashes(tmp_path, fit):
    jobs = {("sst2", "full", 1): job(fit), ("sst2", "full", 2): job({"precision": "fp32"})}
    t = table_throughput(run_data(tmp_path, jobs))
    assert t.rows[0][4:] == [DASH] * 7


def contended(tokens: int, load: float | None = 1.9) -> dict:
    """full_fit whose model-shape peak (2.4 TFLOP/s) was measured under ``load`` on 2
    cores; 4,600 tokens achieve 2.76 TFLOP/s: 115% of that peak, 69% of the square one."""
    return full_fit(tokens, 0.1) | {"peak_load": 0.3, "peak_model_load": load,
                                    "peak_cpus": 2}


def test_utilisation_above_100_percent_is_a_failed_measurement(tmp_path):
    t = table_throughput(run_data(tmp_path, {("sst2", "full", 1): job(contended(4600))}))
    row = rows_by(t)[("sst2", "full FT")]
    assert row["MFU (model-shape peak)"] == ("failed measurement: utilisation 115% > 100%: "
                                             "peak measured under load 1.9 on 2 cores")
    assert row["MFU (square-GEMM peak)"] == "69.0%"  # at or below 100%: a utilisation
    assert ("sst2 full FT seed 1, MFU (model-shape peak): failed measurement: utilisation "
            "115% > 100%: peak measured under load 1.9 on 2 cores.") in t.notes[-1]
    # a run before the load was recorded: still no utilisation above 100%
    old = table_throughput(run_data(tmp_path, {("sst2", "full", 1): job(full_fit(4600, 0.1))}))
    assert rows_by(old)[("sst2", "full FT")]["MFU (model-shape peak)"] == (
        "failed measurement: utilisation 115% > 100%: peak measured under an unrecorded load")


def test_failed_measurements_leave_the_median_of_the_rest(tmp_path):
    # model-shape utilisations 25%, 50% and 115% (failed): the median of 25% and 50%
    jobs = {("sst2", "full", s): job(contended(tokens))
            for s, tokens in ((1, 1000), (2, 2000), (3, 4600))}
    row = rows_by(table_throughput(run_data(tmp_path, jobs)))[("sst2", "full FT")]
    assert row["MFU (model-shape peak)"] == "37.5% (2 of 3; 1 failed measurement)"
    assert row["MFU (square-GEMM peak)"] == "30.0%"  # 15%, 30%, 69%
