"""The time budget (issue 27 point 2): a plan for another machine (``--peak-gflops``), the
early-stopping range of an estimate, the plan stored in the run directory (the first one
kept), and the report's estimate-vs-actual columns; literal seconds worked out by hand."""

import json

import numpy as np
import pytest

from loralens import cli
from loralens.core.config import TrainConfig
from loralens.core.errors import ConfigError
from loralens.core.run_dir import RunDir
from loralens.report.run_data import RunData
from loralens.report.timing_tables import table_timings
from loralens.study.config import load_config
from loralens.study.plan import dry_run as plan
from loralens.study.plan import work as plan_work
from loralens.study.plan.measure import Throughput

from tests.helpers.plan import PLAN


def fake_throughput(**kw) -> Throughput:
    """Measured "here": LoRA trains at 100 GFLOP/s (1e6 FLOPs a token: 1e-5 s), an optimizer
    step takes 0.5 s, forward passes run at 200 GFLOP/s (5e5 FLOPs a token: 2.5e-6 s), a
    model loads in
    2 s; the float32 model-shape peak here is 200 GFLOP/s."""
    return Throughput("m", "cpu", 2, "rte", {"train": 1, "batched": 1, "batch1": 1},
                      train_flops_s={"lora": 100e9}, train_fpt={"lora": 1_000_000},
                      step_s={"lora": 0.5}, forward_flops_s={"batched": 200e9},
                      forward_fpt=500_000, load_s=2.0, **kw)


def fake_work() -> plan_work.StageWork:
    # 1e8 training tokens (1000 s here), 10 steps (5 s), 2e8 forward tokens (500 s), 3 loads (6 s)
    return plan_work.StageWork("train", jobs=1, train_tokens={"lora": 100_000_000},
                               steps={"lora": 10}, forward_tokens={"batched": 200_000_000},
                               loads=3)


def test_for_machine_scales_compute_and_not_model_loads():
    tp = fake_throughput(peak_here=200e9)
    (here,) = plan.estimate([fake_work()], tp)
    assert here.seconds == pytest.approx(1000 + 5 + 500 + 6)
    slow = plan.for_machine(tp, 100e9)      # half the peak: ratio 0.5
    (there,) = plan.estimate([fake_work()], slow)
    # compute twice as long (training 2000 s, steps 10 s, forward 1000 s), loads as here (6 s)
    assert there.seconds == pytest.approx(2000 + 10 + 1000 + 6)
    assert slow.peak_target == 100e9 and slow.peak_here == 200e9
    assert tp.train_flops_s == {"lora": 100e9}      # the measurement itself is unchanged


def test_for_machine_needs_the_peak_measured_here():
    with pytest.raises(ValueError, match="peak"):
        plan.for_machine(fake_throughput(), 100e9)


def test_plan_header_names_both_peaks_the_ratio_and_what_is_not_scaled():
    cfg = load_config(overrides=PLAN)
    tp = plan.for_machine(fake_throughput(peak_here=182e9), 91e9)
    text = plan.format_plan(cfg, plan.estimate([fake_work()], tp), tp)
    header = text.splitlines()[2]
    assert header.startswith("planned for ANOTHER machine")
    assert "91.0 GFLOP/s there vs 182.0 GFLOP/s measured here (ratio 0.50)" in header
    assert "model loads (disk) not scaled" in header and "tokenization not counted" in header


def test_fit_work_gives_the_work_early_stopping_may_skip():
    w = plan_work.StageWork("train")
    # 10 rows of 7 tokens, batches of 2: 5 steps an epoch, an evaluation (4 rows of 3
    # tokens) after every step, 2 epochs: 10 steps, 10 evaluations; patience 1: the run
    # can end at the 2nd evaluation, after 2 steps (4 rows, 28 tokens, 2 evaluations)
    tc = TrainConfig(epochs=2, batch_size=2, evals_per_epoch=5, patience=1)
    assert plan_work.fit_work(w, "lora", np.full(10, 7), tc, np.full(4, 3)) == 10
    assert w.steps == {"lora": 10} and w.train_tokens == {"lora": 140}
    assert w.forward_tokens == {"batched": 120}
    assert w.saved.steps == {"lora": 8} and w.saved.train_tokens == {"lora": 112}
    assert w.saved.forward_tokens == {"batched": 96}
    assert w.saved.rows == 16 + 8 * 4
    # seconds at the fake throughput: training 1e-5 s a token, steps 0.5 s, forward
    # 2.5e-6 s a token, no loads
    (e,) = plan.estimate([w], fake_throughput())
    assert e.seconds == pytest.approx(140e-5 + 5.0 + 120 * 2.5e-6)
    assert e.low_seconds == pytest.approx(28e-5 + 1.0 + 24 * 2.5e-6)
    # scaled by 3 seeds: the skippable part too
    assert w.scaled(3).saved.steps == {"lora": 24}


def test_no_range_when_patience_cannot_act():
    w = plan_work.StageWork("train")
    # 2 evaluations an epoch, 1 epoch, patience 3: it never stops early (the quick preset)
    tc = TrainConfig(epochs=1, batch_size=2, evals_per_epoch=2, patience=3)
    plan_work.fit_work(w, "lora", np.full(10, 7), tc, np.full(4, 3))
    assert w.saved is None
    assert plan.estimate([w], fake_throughput())[0].low_seconds is None


def test_duration_range():
    assert plan.duration_range(None, 1800) == "30 min"
    assert plan.duration_range(1200, 1800) == "20-30 min"
    assert plan.duration_range(1790, 1800) == "30 min"
    assert plan.duration_range(30, 60) == "30 s - 60 s"


def _record(path, total: float) -> None:
    path.write_text(json.dumps({"version": 1, "stages": {"train": {"seconds": total}},
                                "total_seconds": total}))


def test_adopt_plan_keeps_the_first(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    _record(tmp_path / "a.json", 100.0)
    _record(tmp_path / "b.json", 200.0)
    assert plan.adopt_plan(run, tmp_path / "a.json") is True
    assert plan.adopt_plan(run, tmp_path / "b.json") is False
    assert json.loads(run.plan_path.read_text())["total_seconds"] == 100.0
    with pytest.raises(ConfigError, match="does not exist"):
        plan.adopt_plan(RunDir(tmp_path / "other"), tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a plan"):
        plan.adopt_plan(RunDir(tmp_path / "other"), tmp_path / "bad.json")


def test_plan_record_holds_the_estimates_and_both_peaks():
    tp = plan.for_machine(fake_throughput(peak_here=200e9), 100e9)
    works = plan.estimate([fake_work(), plan_work.StageWork("search", off="search.enabled=false"),
                           plan_work.StageWork("drift", cheap="arithmetic")], tp)
    rec = plan.plan_record(works, tp)
    assert rec["stages"]["train"]["seconds"] == pytest.approx(3016)
    assert rec["stages"]["train"]["low_seconds"] is None
    assert rec["stages"]["search"]["off"] == "search.enabled=false"
    assert rec["stages"]["drift"]["seconds"] is None and rec["stages"]["drift"]["cheap"]
    assert rec["total_seconds"] == pytest.approx(3016) and rec["total_low_seconds"] is None
    assert (rec["peak_here"], rec["peak_target"]) == (200e9, 100e9)


def test_wall_time_table_shows_estimate_beside_actual(tmp_path):
    run = RunDir(tmp_path)
    run.plan_path.write_text(json.dumps({
        "version": 1, "created": "2026-12-06T16:00:00Z", "cpu": "AMD EPYC",
        "peak_here": 167e9, "peak_target": 91e9, "contention": 0.0,
        "stages": {"sanity": {"seconds": 50.0, "low_seconds": None, "off": "", "cheap": ""},
                   "search": {"seconds": None, "low_seconds": None,
                              "off": "search.enabled=false", "cheap": ""},
                   "train": {"seconds": 1800.0, "low_seconds": 1200.0, "off": "", "cheap": ""},
                   "drift": {"seconds": None, "low_seconds": None, "off": "",
                             "cheap": "arithmetic on pooled arrays"}},
        "total_seconds": 1850.0, "total_low_seconds": 1250.0}))
    d = RunData(run)
    d.timings = {"drift": 5.0, "train": 1500.0, "sanity": 60.0, "search": 0.1}
    table = table_timings(d)
    assert table.columns == ["Stage", "Wall time", "Estimate", "Actual / estimate"]
    assert table.rows == [
        ["sanity", "60.0 s", "50.0 s", "1.20"],
        ["search", "100 ms", "off", "–"],
        ["train", "25.0 min", "20.0 min – 30.0 min", "0.83 – 1.25"],
        ["drift", "5.0 s", "not estimated (seconds)", "–"],
        # 1565.1 s over 1850 and 1250
        ["total (stages)", "26.1 min", "20.8 min – 30.8 min", "0.85 – 1.25"]]
    assert any("planned for another machine (float32 model-shape peak 91 GFLOP/s vs 167"
               in n for n in table.notes)


def test_wall_time_table_without_a_plan_says_how_to_get_one(tmp_path):
    d = RunData(RunDir(tmp_path))
    d.timings = {"train": 10.0}
    table = table_timings(d)
    assert table.columns == ["Stage", "Wall time"]
    assert table.rows == [["train", "10.0 s"], ["total (stages)", "10.0 s"]]
    assert any("no plan.json" in n for n in table.notes)


def test_peak_gflops_needs_dry_run_and_a_positive_value(tmp_path, capsys):
    assert cli.main(["run", "--preset", "micro", "--run-dir", str(tmp_path / "r"),
                     "--peak-gflops", "91"]) == 2
    assert "--peak-gflops" in capsys.readouterr().err
    assert cli.main(["run", "--preset", "micro", "--dry-run", "--run-dir", str(tmp_path / "r"),
                     "--peak-gflops", "0"]) == 2
    assert not (tmp_path / "r").exists()


def test_cli_dry_run_for_another_machine_writes_the_plan_file(tmp_path, glue_dir, tiny_base,
                                                              capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out_file = tmp_path / "plan.json"
    assert cli.main(["run", "--dry-run", "--run-dir", str(tmp_path / "run"), "--glue-dir",
                     str(glue_dir), "--stages", "train", "--no-progress", "--peak-gflops",
                     "0.5", "--plan", str(out_file), *PLAN]) == 0
    out = capsys.readouterr().out
    assert "planned for ANOTHER machine: float32 peak at the model's shapes 0.5 GFLOP/s" in out
    rec = json.loads(out_file.read_text())
    assert rec["peak_target"] == 0.5e9 and rec["peak_here"] > 0
    assert rec["stages"]["train"]["seconds"] > 0
    assert not (tmp_path / "run").exists()


def test_sanity_range_runs_from_one_epoch_to_all(glue_dir, tiny_tokenizer):
    from loralens.training.job import prepare_task
    from loralens.study.stages import get_stage

    cfg = load_config(overrides=PLAN + [f"data.glue_dir={glue_dir}", "tasks=[rte]",
                                        "methods=[lora]"])
    p = prepare_task(cfg, "rte", tiny_tokenizer)
    (w,) = plan_work.count_work(cfg, [get_stage("sanity")], tiny_tokenizer, {"rte": p})
    # 4 rows in batches of 2, 3 epochs: 6 steps; it can stop after the first epoch (2
    # steps): 4 steps and 2 epochs of its tokens may be skipped
    assert w.steps == {"lora": 6} and w.saved.steps == {"lora": 4}
    assert w.saved.train_tokens["lora"] * 3 == w.train_tokens["lora"] * 2
