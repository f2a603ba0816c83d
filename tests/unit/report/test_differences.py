"""The report's "Deliberate differences from the published study": protocol rows only where
the config switches them on, then the resolved config's diff against the paper preset.

Expected rows are written out by hand from the presets (src/loralens/presets/*.yaml) and
the defaults (core/config.py), never computed by the code under test.
"""

from __future__ import annotations

import pytest

from loralens.core.config_load import load_config
from loralens.core.protocol import config_differences, device_difference, differences
from loralens.core.run_dir import RunDir
from loralens.report.provenance_tables import table_differences
from loralens.report.run_data import RunData

STUDY = " (the study evaluated once per epoch: patience 3 never fired)"
TRAIN_ROWS = ("training rows per task, drawn from the rest of each training split after the "
              "selection slice of max(10%, 256 rows) is held out; null or {} = all of that rest")
SEARCH_ROWS = ["search seed", "sampler seeding", "one persistent study"]


def keys(cfg) -> list[str]:
    return [k for k, _ in differences(cfg)]


def test_quick_lists_no_search_rows_and_its_subsets():
    diffs = differences(load_config("quick"))
    assert [k for k, _ in diffs] == [
        "selection slice", "early-stopping cadence", "Holm correction", "model.name",
        "data.max_length",
        "data.train_size", "data.train_size_per_task", "data.early_stop_size",
        "train.lr_lora", "train.lr_full", "train.lr_head", "train.epochs", "train.grad_accum",
        "train.optimizer_full", "search.enabled", "extract.examples", "bench.warmup",
        "bench.requests", "bench.seeds", "weights.sweep"]
    rows = dict(diffs)
    # quick: 1 epoch x 2 evaluations, patience 3: patience cannot stop anything
    assert rows["early-stopping cadence"] == (
        "evaluated 2 times per epoch with patience 3: 2 evaluations over 1 epoch "
        "(train.epochs), so patience cannot act (stopping early needs at least 5); the best "
        "evaluated state is still restored" + STUDY)
    assert rows["data.train_size"] == f"paper preset: null; this run: 384 ({TRAIN_ROWS})"
    assert rows["data.train_size_per_task"] == (
        f"paper preset: {{}}; this run: {{sst2: 1152}} ({TRAIN_ROWS})")
    assert rows["data.max_length"] == ("paper preset: 384; this run: 128 (truncation length "
                                       "in tokens)")
    assert rows["train.grad_accum"] == ("paper preset: 8; this run: 1 (micro-batches per "
                                        "optimizer step)")
    assert rows["search.enabled"].startswith("paper preset: true; this run: false (")
    # one head rate for both methods (the paper's: each method's own rate)
    assert rows["train.lr_head"].startswith("paper preset: null; this run: 0.001 (")
    assert rows["selection slice"].startswith(
        "model selection reads a stratified max(10%, 256 rows) slice of each training split "
        "(never more than half of it) (seed 0), held out and never trained on")


def test_smoke_lists_the_search_rows_and_its_search_space():
    cfg = load_config("smoke")
    assert keys(cfg) == [
        "selection slice", *SEARCH_ROWS, "early-stopping cadence", "Holm correction",
        "tasks", "seeds",
        "model.name", "data.max_length", "data.train_size", "data.train_size_per_task",
        "data.early_stop_size", "train.grad_accum", "train.optimizer_full",
        "search.trials", "search.startup_trials", "search.train_size", "search.eval_size",
        "search.epochs", "search.batch_full", "search.prune", "extract.examples",
        "bench.warmup", "bench.requests", "bench.identity_examples",
        "weights.forgetting_examples", "weights.sweep"]
    rows = dict(differences(cfg))
    # the search replaces train.lr_lora/lr_full (2e-3/3e-5 in smoke): not rows
    assert "train.lr_lora" not in rows and "train.epochs" not in rows
    assert rows["early-stopping cadence"] == (
        "evaluated 2 times per epoch with patience 3: 2 evaluations over 1 epoch "
        "(search.epochs), so patience cannot act (stopping early needs at least 5); the best "
        "evaluated state is still restored" + STUDY)
    assert rows["search seed"].startswith("search trials train with seed 0, outside")
    assert rows["seeds"] == "paper preset: [42, 1337, 2024]; this run: [42] (training seeds)"


def test_paper_preset_differs_only_in_protocol():
    cfg = load_config("paper")
    assert config_differences(cfg) == []
    assert keys(cfg) == ["selection slice", *SEARCH_ROWS, "early-stopping cadence",
                         "Holm correction"]
    assert dict(differences(cfg))["early-stopping cadence"] == (
        "evaluated 4 times per epoch with patience 3: 8-16 evaluations over 2-4 epochs "
        "(search.epochs), so patience can stop a model early" + STUDY)


def test_paper_without_search_has_no_search_rows():
    cfg = load_config("paper", overrides={"search": {"enabled": False}})
    diffs = differences(cfg)
    assert [k for k, _ in diffs] == ["selection slice", "early-stopping cadence",
                                     "Holm correction", "search.enabled"]
    rows = dict(diffs)
    assert rows["search.enabled"] == ("paper preset: true; this run: false (run the search; "
                                      "false = train with the config's values)")
    assert rows["early-stopping cadence"] == (
        "evaluated 4 times per epoch with patience 3: 12 evaluations over 3 epochs "
        "(train.epochs), so patience can stop a model early" + STUDY)


def test_cadence_only_where_it_differs_and_said_honestly():
    published = load_config("paper", overrides={"data": {"selection": "validation"},
                                                "train": {"evals_per_epoch": 1},
                                                "stats": {"correction": "bonferroni"}})
    # the study's selection, cadence and correction: no protocol rows; Bonferroni is a
    # config row, as the paper preset (the reference of config rows) corrects with Holm
    assert keys(published) == [*SEARCH_ROWS, "stats.correction"]
    some = load_config("paper", overrides={"search": {"epochs": [1, 2]}})
    assert dict(differences(some))["early-stopping cadence"] == (
        "evaluated 4 times per epoch with patience 3: 4-8 evaluations over 1-2 epochs "
        "(search.epochs), so patience can stop a model early only with at least 5 of them"
        + STUDY)
    steps = load_config("paper", overrides={"train": {"eval_every": 50}})
    assert dict(differences(steps))["early-stopping cadence"] == (
        "evaluated every 50 optimizer steps with patience 3 over 2-4 epochs (search.epochs): "
        "whether patience can stop a model early depends on its step count (it needs at "
        "least 5 evaluations; the fit table shows where it fired)" + STUDY)


def test_operational_keys_are_no_difference():
    cfg = load_config("paper", overrides={
        "data": {"glue_dir": "/elsewhere"}, "search": {"storage": "sqlite:///x.db",
                                                        "heartbeat_interval": 5},
        "train": {"threads": 1, "eval_batch_size": 8}, "tracking": {"report_to": ["mlflow"]},
        "extract": {"batch_size": 4}})
    assert config_differences(cfg) == []
    assert config_differences(load_config("paper", overrides={"seeds": [1, 2]})) == [
        ("seeds", "paper preset: [42, 1337, 2024]; this run: [1, 2] (training seeds)")]


def test_device_row_from_the_recorded_hardware():
    cpu = {"cuda": False, "cpu_model": "AMD EPYC 7B13", "processor": "x86_64"}
    assert device_difference(cpu, ["fp32", "fp32"]) == (
        "device and dtype", "paper: a GPU, bf16 autocast, gradient checkpointing, 8-bit paged "
        "AdamW for full fine-tuning, bf16 serving; this run: the CPU (AMD EPYC 7B13), training "
        "in fp32 (train.precision auto), gradient checkpointing off, torch AdamW, float32 "
        "serving")
    assert device_difference(cpu, [], "bf16", "on")[1].endswith(
        "this run: the CPU (AMD EPYC 7B13), training in a dtype not recorded yet "
        "(train.precision bf16), gradient checkpointing on, torch AdamW, bfloat16 serving")
    assert device_difference({"cuda": True, "gpu": "NVIDIA H100"}, ["bf16"]) is None
    assert device_difference(None, []) is None  # no env.json: nothing claimed


@pytest.mark.parametrize("enabled", [True, False])
def test_table_names_the_device_and_what_it_leaves_out(tmp_path, enabled):
    cfg = load_config("quick", overrides={"search": {"enabled": enabled}})
    env = {"run": {"hardware": {"cuda": False, "cpu_model": "AMD EPYC", "cpu_count": 2}}}
    jobs = {("sst2", "lora", 42): {"fit": {"precision": "fp32"}},
            ("sst2", "full", 42): {"fit": {"precision": "bf16"}}}
    d = RunData(run=RunDir(tmp_path), config=cfg.to_dict(), jobs=jobs, env=env)
    t = table_differences(d)
    assert t.rows[-1] == ["device and dtype", (
        "paper: a GPU, bf16 autocast, gradient checkpointing, 8-bit paged AdamW for full "
        "fine-tuning, bf16 serving; this run: the CPU (AMD EPYC), training in fp32, bf16 "
        "(train.precision auto), gradient checkpointing off, torch AdamW, float32 serving")]
    assert ("search.enabled" in [r[0] for r in t.rows]) is not enabled
    assert t.notes[0] == (
        "Rows naming a config key: the run's resolved config against the paper preset "
        "(presets/paper.yaml), leaving out how the run executes (run directory, storage, "
        "tracking, threads, batch sizes of inference)"
        + (", and the training hyperparameters each search's best trial replaces."
           if enabled else ", the search space (no search ran)."))
