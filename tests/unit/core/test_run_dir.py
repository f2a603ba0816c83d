"""The run directory's layout and format version, and the one atomic-write and CSV
helpers."""

import os

import pytest
import yaml

from loralens import cli
from dataclasses import replace

from loralens.core.config import StudyConfig
from loralens.study.config import load_config
from loralens.core.errors import RunDirError
from loralens.core.run_dir import FORMAT_VERSION, RunDir
from loralens.core.files import atomic_dir, atomic_path, atomic_write_text, csv_text


# --------------------------------------------------------------------------- run directory

def test_run_dir_layout_is_one_table(tmp_path):
    run = RunDir(tmp_path)
    assert run.metrics_path("rte", "lora", 42) == tmp_path / "models/rte/lora/seed42/metrics.json"
    assert run.weights_dir("rte", "lora", 1) == tmp_path / "models/rte/lora/seed1/adapter"
    assert run.weights_dir("rte", "full", 1, adapter=False) == \
        tmp_path / "models/rte/full/seed1/model"
    assert run.weights_dir("rte", "dora", 1, adapter=True).name == "adapter"
    assert run.search_path("sst2", "full") == tmp_path / "search/sst2-full.json"
    assert run.extract_manifest("rte") == tmp_path / "extract/rte/manifest.json"
    assert run.serving_path == tmp_path / "bench/serving.json"
    assert run.sqlite_url("jobs") == f"sqlite:///{(tmp_path / 'jobs.db').resolve()}"
    for t, m, s in [("rte", "lora", 1), ("sst2", "full", 2)]:
        atomic_write_text(run.metrics_path(t, m, s), "{}")
        run.weights_dir(t, m, s, adapter=m == "lora").mkdir()
    run.job_dir("rte", "lora", 3).mkdir(parents=True)  # unfinished: no metrics.json
    assert run.finished_jobs() == [("rte", "lora", 1), ("sst2", "full", 2)]
    assert run.weights_dir("sst2", "full", 2).name == "model"  # the folder the job holds
    assert run.adapters("lora") == [("rte", 1, run.weights_dir("rte", "lora", 1))]


def test_new_run_dir_records_its_format(tmp_path):
    run = RunDir(tmp_path / "r")
    run.bind_config(StudyConfig())
    assert run.format_version() == FORMAT_VERSION
    run.bind_config(StudyConfig())  # same settings: fine


def test_older_run_dir_opens_with_new_keys_at_their_defaults(tmp_path):
    """A directory written before versioning, whose config lacks keys added since."""
    cfg = StudyConfig().to_dict()
    del cfg["train"]["patience"], cfg["bench"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    run = RunDir(tmp_path)
    assert run.format_version() == 0
    assert run.load_config().train.patience == StudyConfig().train.patience
    run.bind_config(StudyConfig())  # no "written with other settings"
    assert run.format_version() == FORMAT_VERSION


def test_run_dir_with_a_removed_key_names_the_upgrade_command(tmp_path):
    cfg = StudyConfig().to_dict()
    cfg["train"]["old_knob"] = 3
    cfg["gone_section"] = {"a": 1}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    run = RunDir(tmp_path)
    with pytest.raises(RunDirError, match=rf"`loralens upgrade {tmp_path}` rewrites it"):
        run.load_config()
    assert cli.main(["upgrade", str(tmp_path)]) == 0
    assert run.load_config() == StudyConfig()
    assert "old_knob" in (tmp_path / "config.yaml.bak").read_text()
    assert run.format_version() == FORMAT_VERSION


def test_run_dir_from_a_newer_version_is_refused(tmp_path):
    run = RunDir(tmp_path)
    run.bind_config(StudyConfig())
    atomic_write_text(run.format_path, '{"format": %d}' % (FORMAT_VERSION + 1))
    with pytest.raises(RunDirError, match="written by a newer loralens"):
        run.load_config()


# --------------------------------------------------------------------------- atomic writes, CSV

def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
    with atomic_path(path, suffix=".npy") as tmp:
        assert tmp.suffix == ".npy" and tmp.parent == tmp_path
        tmp.write_text("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["a.txt"]


def test_atomic_dir_replaces_whole_directories_or_nothing(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as d:
        (d / "w").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "w").write_text("2")
            raise RuntimeError("killed")
    assert (target / "w").read_text() == "1" and os.listdir(tmp_path) == ["adapter"]
    with atomic_dir(target) as d:
        (d / "v").write_text("3")
    assert os.listdir(target) == ["v"] and os.listdir(tmp_path) == ["adapter"]


def test_csv_text_by_hand():
    import numpy as np

    rows = [{"a": 1, "b": 0.1, "c": None}, {"a": np.int64(2), "b": float("nan"),
                                             "c": [1.5, 2], "d": "x,y"}]
    assert csv_text(rows) == 'a,b,c,d\n1,0.1,,\n2,,1.5;2,"x,y"\n'
    assert csv_text(rows, ["b", "a"]) == "b,a\n0.1,1\n,2\n"
    assert csv_text([]) == ""


def old_config(**search) -> dict:
    """A config.yaml as loralens wrote it before held-out selection (no data.selection,
    evaluation once per epoch, trials trained with seed 42)."""
    cfg = StudyConfig().to_dict()
    del cfg["data"]["selection"], cfg["data"]["selection_fraction"], cfg["data"]["selection_min"]
    del cfg["train"]["evals_per_epoch"], cfg["search"]["sampler_seed"]
    cfg["search"].update({"seed": 42, **search})
    return cfg


def test_a_run_dir_from_before_held_out_selection_reads_as_what_it_did(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old_config(seed=7)))
    run = RunDir(tmp_path)
    cfg = run.load_config()
    assert cfg.data.selection == "validation" and cfg.train.evals_per_epoch == 1
    # continuing it with today's defaults would mix two protocols in one directory
    with pytest.raises(RunDirError, match=r"data\.selection: 'validation' -> 'train_slice'"):
        run.bind_config(StudyConfig())


def test_a_run_dir_whose_trials_trained_with_a_training_seed_is_reported_not_continued(
        tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old_config()))
    run = RunDir(tmp_path)
    with pytest.raises(RunDirError) as e:
        run.load_config()
    assert str(e.value) == (
        f"{tmp_path / 'config.yaml'} was written before held-out selection: its search trials "
        "trained with seed 42, also a training seed, and selected on the validation split. "
        f"Report it as it is (`loralens report --run-dir {tmp_path}`); to continue the study, "
        "start a new --run-dir")
    assert cli.main(["train", "--run-dir", str(tmp_path), "--no-progress"]) == 2
    assert "was written before held-out selection" in capsys.readouterr().err
    assert cli.main(["report", "--run-dir", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "report" / "report.md").is_file()


def test_glue_dir_and_storage_alone_keep_the_stored_config(tmp_path, glue_dir):
    """`loralens train --run-dir R --glue-dir D` on a run directory made with a preset
    used the defaults (a settings-differ error on every key): --glue-dir and --storage
    say where this machine finds things, not what the study is."""
    from loralens.cli import build_parser, resolve

    stored = load_config(preset="smoke")
    RunDir(tmp_path).bind_config(stored)
    args = build_parser().parse_args(["train", "--run-dir", str(tmp_path), "--glue-dir",
                                      str(glue_dir), "--storage", "sqlite:///x.db"])
    cfg, _ = resolve(args)
    # the absolute path as given (a symlinked ../shared stays as the user wrote it)
    assert cfg.data.glue_dir == os.path.abspath(glue_dir) and cfg.search.storage == "sqlite:///x.db"
    assert replace(cfg, data=replace(cfg.data, glue_dir=stored.data.glue_dir),
                   search=replace(cfg.search, storage=None)) == stored
    RunDir(tmp_path).bind_config(cfg)  # no "written with other settings"
