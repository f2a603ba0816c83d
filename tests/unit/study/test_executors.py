"""The executor choice (``run.*``, ``--executor``): config, Ray task options, the error
without Ray, and the run directory not recording how it was executed. Ray itself runs
in tests/integration/test_ray.py."""

from __future__ import annotations

import sys

import pytest
import yaml

from loralens.cli import build_parser, _flag_overrides
from loralens.core.errors import ConfigError
from loralens.study.config import load_config
from loralens.study.executors import make_executor, ray_options
from loralens.core.run_dir import RunDir


def test_the_default_is_local_and_needs_no_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    cfg = load_config("micro")
    assert cfg.run.executor == "local" and make_executor(cfg) is None


def test_ray_without_ray_installed_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError) as e:
        make_executor(load_config("micro", None, ["run.executor=ray"]))
    assert e.value.key == "run.executor"
    assert "pip install 'loralens[ray]'" in str(e.value)


def test_config_keys_are_checked():
    with pytest.raises(ConfigError, match=r"run.executor: 'dask' is not one of \['local', "
                                          r"'ray'\]"):
        load_config(None, None, ["run.executor=dask"])
    with pytest.raises(ConfigError, match="run.ray_resources: unknown stage 'trian'; known: "
                                          "default, sanity, search, train"):
        load_config(None, None, ["run.ray_resources={trian: {num_gpus: 1}}"])
    with pytest.raises(ConfigError, match=r"run.ray_resources.train.num_gpus: -1.0 is below "
                                          r"the minimum 0.0"):
        load_config(None, None, ["run.ray_resources={train: {num_gpus: -1}}"])


def test_ray_options_by_stage_with_the_default_and_custom_resources():
    rc = load_config(None, None, [
        "run.ray_resources={default: {num_cpus: 2}, train: {num_cpus: 4, num_gpus: 1, "
        "memory: 8.0e9, H100: 1}}", "run.ray_max_retries=5"]).run
    assert ray_options(rc, "train") == {"num_cpus": 4.0, "num_gpus": 1.0, "memory": 8000000000,
                                        "resources": {"H100": 1.0}, "max_retries": 5,
                                        "retry_exceptions": False}
    assert ray_options(rc, "search") == {"num_cpus": 2.0, "max_retries": 5,
                                         "retry_exceptions": False}
    no_default = load_config(None, None, ["run.ray_resources={train: {num_gpus: 1}}"]).run
    assert ray_options(no_default, "extract")["num_cpus"] == 1.0  # one CPU when unsaid


def test_run_flags_become_run_overrides_an_address_stays_a_string():
    args = build_parser().parse_args(["run", "--executor", "ray", "--ray-address", "10:20"])
    extra = _flag_overrides(args)
    assert extra == ['run.executor="ray"', 'run.ray_address="10:20"']
    cfg = load_config(None, None, extra)  # 10:20 unquoted is YAML 1.1's sexagesimal 620
    assert (cfg.run.executor, cfg.run.ray_address) == ("ray", "10:20")


def test_the_run_directory_does_not_record_the_executor(tmp_path):
    """config.yaml has no run section, and the same study rerun with another executor is
    the same study (a Ray run and a local run give the same run directory)."""
    run = RunDir(tmp_path / "run")
    run.bind_config(load_config("micro", None, ["run.executor=ray", "run.ray_address=auto"]))
    stored = yaml.safe_load(run.config_path.read_text())
    assert "run" not in stored and stored["model"]["name"] == "tiny-random"
    run.bind_config(load_config("micro"))  # local now: no difference
    run.bind_config(load_config("micro", None, ["run.ray_resources={train: {num_gpus: 1}}"]))
    assert run.load_config().run == load_config().run  # read back: the defaults


def test_a_ray_task_leaves_a_job_another_worker_finished_done(tmp_path):
    """A Ray task (OneJob) reopens its job only when the stage's ``finished`` test still
    says the output is missing once the row reads done, as Context.work does: a job another
    worker finished since the driver looked stays done, unclaimed (attempts stay 1; without
    the test the task reopened it and claimed it again, attempts 2)."""
    from types import SimpleNamespace

    from loralens.core.job_queue import JobQueue
    from loralens.study.executors import JobDone, OneJob

    q = JobQueue(f"sqlite:///{tmp_path / 'jobs.db'}", "study")
    q.add("train", {"k": {"task": "rte"}})
    q.work("train", lambda key, payload: None, wait=False)  # another worker finished it
    ctx = SimpleNamespace(queue=q, bar=SimpleNamespace(n=0))
    ran = []
    with pytest.raises(JobDone):
        OneJob("train", "k").work(ctx, "train", {"k": {"task": "rte"}}, [],
                                  lambda key, payload: ran.append(key),
                                  finished=lambda payload: True)
    assert ran == [] and [(r["status"], r["attempts"]) for r in q.rows("train")] == [("done", 1)]
    # its output missing (finished says so): reopened and run once more
    with pytest.raises(JobDone):
        OneJob("train", "k").work(ctx, "train", {"k": {"task": "rte"}}, [],
                                  lambda key, payload: ran.append(key),
                                  finished=lambda payload: False)
    assert ran == ["k"] and [(r["status"], r["attempts"]) for r in q.rows("train")] == [("done", 2)]
