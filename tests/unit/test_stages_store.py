"""The stage table, the CLI generated from it, the run directory's layout and format
version, the one atomic-write and CSV helpers, and config validation where it is built."""

import dataclasses
import os

import pytest
import yaml

from loralens import cli
from loralens.config import ConfigError, StudyConfig, TrainConfig, load_config
from loralens.stages import STAGE_NAMES, STAGES, Context, get_stage
from loralens.store import (FORMAT_VERSION, RunDir, RunDirError, atomic_dir, atomic_path,
                            atomic_write_text, csv_text)
from loralens.work import JobQueue


# --------------------------------------------------------------------------- the stage table

def test_stage_table_is_the_study_in_order():
    assert STAGE_NAMES == ("sanity", "search", "train", "extract", "drift", "bench", "report")
    assert get_stage("hpo") is get_stage("search")


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_stage_names_real_run_dir_artifacts_and_config_sections(stage, tmp_path):
    run = RunDir(tmp_path)
    for attr in stage.reads + stage.writes:
        assert hasattr(run, attr), f"{stage.name}: RunDir has no {attr}"
    if stage.section:
        assert hasattr(StudyConfig(), stage.section)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_stage_is_a_subcommand_with_its_selectors_and_flags(stage):
    parser = cli.build_parser()
    argv = [stage.name]
    for sel, value in (("task", "rte"), ("method", "lora"), ("seed", "7")):
        if sel in stage.selects:
            argv += [f"--{sel}", value]
    for f in stage.flags:
        argv += [f.name] + (["3"] if f.type is int else [])
    args = parser.parse_args(argv)
    assert args.stage == stage.name
    for sel in ("task", "method", "seed"):
        assert hasattr(args, sel) == (sel in stage.selects)
    ctx = cli.context(args, StudyConfig(), RunDir("unused"))
    if "task" in stage.selects:
        assert ctx.tasks == ["rte"]
    if "seed" in stage.selects:
        assert ctx.seeds == [7]
    for f in stage.flags:
        if f.context_field:
            assert getattr(ctx, f.context_field) == f.value
        else:  # a config key: it becomes a key=value override
            assert f"{f.config_key}=3" in cli._flag_overrides(args)


def test_train_selection_and_flags_reach_the_context():
    args = cli.build_parser().parse_args(["train", "--task", "sst2", "--method", "full",
                                          "--seed", "1", "--seed", "2", "--no-search"])
    ctx = cli.context(args, StudyConfig(), RunDir("unused"))
    assert ctx.train_keys() == [("sst2", "full", 1), ("sst2", "full", 2)]
    assert ctx.use_search is False and ctx.overwrite is False


def test_a_code_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """A KeyError inside a stage is a bug, not a user error: it is not turned into a line."""
    def broken(ctx):
        return {}["missing"]

    stage = dataclasses.replace(get_stage("drift"), run=broken)
    monkeypatch.setattr(cli, "get_stage", lambda name: stage)
    with pytest.raises(KeyError):
        cli.main(["drift", "--run-dir", str(tmp_path / "r"), "--no-progress"])


def test_unknown_stage_and_unknown_task_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["run", "--run-dir", str(tmp_path / "r"), "--stages", "train,nope"]) == 2
    assert "unknown stage(s) ['nope']" in capsys.readouterr().err
    assert cli.main(["train", "--run-dir", str(tmp_path / "r2"), "tasks=[cola]"]) == 2
    assert "tasks: unknown task 'cola'" in capsys.readouterr().err


# --------------------------------------------------------------------------- job queue

def test_queue_reopens_a_done_job_whose_output_is_missing(tmp_path):
    q = JobQueue(RunDir(tmp_path).sqlite_url("jobs"), queue="t")
    q.add("train", {"a": {"x": 1}})
    ran = []
    q.work("train", lambda k, p: ran.append(k))
    q.add("train", {"a": {"x": 1}})          # done stays done
    assert q.work("train", lambda k, p: ran.append(k)) == 0
    q.add("train", {"a": {"x": 1}}, reopen=True)
    assert q.work("train", lambda k, p: ran.append(k)) == 1
    assert ran == ["a", "a"]


def test_context_work_skips_finished_jobs_and_redoes_them_on_overwrite(tmp_path):
    ctx = Context(StudyConfig(), RunDir(tmp_path), progress=False)
    ran = []
    jobs = {"a": {"k": "a"}, "b": {"k": "b"}}
    ctx.work("x", jobs, lambda p: ran.append(p["k"]), finished=lambda p: p["k"] == "a")
    assert ran == ["b"]
    ctx.work("x", jobs, lambda p: ran.append(p["k"]), finished=lambda p: True)
    assert ran == ["b"]
    ctx.overwrite = True
    ctx.work("x", jobs, lambda p: ran.append(p["k"]), finished=lambda p: True)
    assert sorted(ran) == ["a", "b", "b"]


# --------------------------------------------------------------------------- run directory

def test_run_dir_layout_is_one_table(tmp_path):
    run = RunDir(tmp_path)
    assert run.metrics_path("rte", "lora", 42) == tmp_path / "models/rte/lora/seed42/metrics.json"
    assert run.weights_dir("rte", "lora", 1) == tmp_path / "models/rte/lora/seed1/adapter"
    assert run.weights_dir("rte", "full", 1) == tmp_path / "models/rte/full/seed1/model"
    assert run.search_path("sst2", "full") == tmp_path / "search/sst2-full.json"
    assert run.extract_manifest("rte") == tmp_path / "extract/rte/manifest.json"
    assert run.serving_path == tmp_path / "bench/serving.json"
    assert run.sqlite_url("jobs") == f"sqlite:///{(tmp_path / 'jobs.db').resolve()}"
    for t, m, s in [("rte", "lora", 1), ("sst2", "full", 2)]:
        atomic_write_text(run.metrics_path(t, m, s), "{}")
        run.weights_dir(t, m, s).mkdir()
    run.job_dir("rte", "lora", 3).mkdir(parents=True)  # unfinished: no metrics.json
    assert run.finished_jobs() == [("rte", "lora", 1), ("sst2", "full", 2)]
    assert run.lora_adapters() == [("rte", 1, run.weights_dir("rte", "lora", 1))]


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


# --------------------------------------------------------------------------- config

def test_configs_validate_where_they_are_built():
    with pytest.raises(ConfigError, match=r"train.epochs: 0 is below the minimum 1"):
        dataclasses.replace(StudyConfig().train, epochs=0)
    with pytest.raises(ConfigError, match=r"train.precision: 'fp8' is not one of"):
        TrainConfig(precision="fp8")
    with pytest.raises(ConfigError, match=r"tasks: unknown task 'cola'"):
        dataclasses.replace(StudyConfig(), tasks=["cola"])
    with pytest.raises(ConfigError, match=r"search.lr_lora: expected \[low, high\]"):
        dataclasses.replace(StudyConfig().search, lr_lora=[1e-3, 1e-4])
    with pytest.raises(ConfigError, match=r"train: expected a TrainConfig"):
        dataclasses.replace(StudyConfig(), train={"epochs": 2})
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


def test_flow_lists_of_exponent_numbers_are_numbers():
    cfg = load_config(overrides=["search.lr_lora=[1e-4, 1e-3]"])
    assert cfg.search.lr_lora == [1e-4, 1e-3]
