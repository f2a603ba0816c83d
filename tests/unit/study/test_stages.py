"""The stage table and the CLI generated from it; the job queue a stage's work goes
through."""

import dataclasses

import pytest

from loralens import cli
from loralens.core.config import StudyConfig
from loralens.study.stages import STAGE_NAMES, STAGES, Context, get_stage
from loralens.core.run_dir import RunDir
from loralens.core.job_queue import JobQueue


# --------------------------------------------------------------------------- the stage table

def test_stage_table_is_the_study_in_order():
    assert STAGE_NAMES == ("sanity", "search", "train", "extract", "drift", "weights", "bench",
                           "report")
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
    assert cli.main(["train", "--run-dir", str(tmp_path / "r2"), "tasks=[stsb]"]) == 2
    assert "tasks: unknown task 'stsb'" in capsys.readouterr().err  # cola is built in


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


def test_every_stage_takes_every_family_and_a_narrower_stage_refuses_by_name(tmp_path):
    """The stage table says which method families each stage handles (Stage.families): every
    stage takes every family today; a stage that did not would refuse naming both."""
    import dataclasses

    from loralens.core.errors import ConfigError
    from loralens.study.config import load_config
    from loralens.study.stages import STAGES, Context, check_methods

    cfg = load_config(overrides=["methods=[full, head, lora, dora, ia3]", "search.enabled=true"])
    ctx = Context(cfg, RunDir(tmp_path / "run"), progress=False)
    for stage in STAGES:
        check_methods(stage, ctx)
    narrow = dataclasses.replace(STAGES[0], families=frozenset({"peft"}))
    with pytest.raises(ConfigError, match=r"method 'full' \(family full\) is not supported by "
                                          r"the sanity stage yet"):
        check_methods(narrow, ctx)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        load_config(overrides=["methods=[full, nope]"])
