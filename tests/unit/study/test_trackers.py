"""``--report-to`` names (issue 28 point 4): ``all``, lists, unknown names and missing packages
resolved without a model or a process; accelerate's trackers reached through its
``GeneralTracker`` interface (a recording stand-in here; the wandb run itself is
tests/integration/test_trackers.py)."""

from __future__ import annotations

import pytest

from loralens.core.errors import ConfigError
from loralens.study.config import load_config
from loralens.training import tracking as T

KNOWN = ("['none', 'all', 'tensorboard', 'mlflow', 'wandb', 'aim', 'clearml', 'comet_ml', "
         "'dvclive', 'trackio', 'swanlab']")


def _installed(*modules):
    return lambda name: object() if name in modules else None


def test_all_is_every_installed_tracker():
    fs = _installed("tensorboard", "wandb", "dvclive")
    assert T.reporters(["all"], fs) == ["tensorboard", "wandb", "dvclive"]
    assert T.reporters(["all"], _installed()) == []
    # a name given beside all stays, installed or not (require_installed then says so)
    assert T.reporters(["aim", "all"], fs) == ["tensorboard", "wandb", "aim", "dvclive"]
    assert T.reporters(["all"], _installed("mlflow", "comet_ml", "trackio", "swanlab")) == [
        "mlflow", "comet_ml", "trackio", "swanlab"]


def test_a_list_keeps_one_of_each_in_a_fixed_order():
    assert T.reporters(["wandb", "mlflow", "wandb"]) == ["mlflow", "wandb"]
    assert T.reporters(["none"]) == []
    with pytest.raises(ConfigError, match=r"'none' together with \['none', 'wandb'\]"):
        T.reporters(["none", "wandb"])
    assert load_config(overrides=["tracking.report_to=[wandb,aim]"]).tracking.report_to == [
        "wandb", "aim"]


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["tracking.report_to=[tensorboard,wandbx]"])
    assert str(e.value) == f"tracking.report_to[1]: 'wandbx' is not one of {KNOWN}"
    assert e.value.key.startswith("tracking.report_to")
    with pytest.raises(ConfigError) as e:  # a config built by hand, not loaded
        T.reporters(["comet"])
    assert str(e.value) == f"tracking.report_to: 'comet' is not one of {KNOWN}"
    assert e.value.key == "tracking.report_to"


def test_a_missing_package_is_named():
    with pytest.raises(ConfigError) as e:
        T.require_installed(["tensorboard", "wandb"], _installed("tensorboard"))
    assert str(e.value) == ("tracking.report_to: 'wandb' needs the wandb package, which is not "
                            "installed here: pip install wandb (or pip install "
                            "'loralens[wandb]')")
    assert e.value.key == "tracking.report_to"
    with pytest.raises(ConfigError) as e:  # the pip name, not the module name
        T.require_installed(["comet_ml"], _installed())
    assert str(e.value).endswith("'comet_ml' needs the comet-ml package, which is not "
                                 "installed here: pip install comet-ml")
    T.require_installed(["wandb", "aim"], _installed("wandb", "aim"))  # nothing to say


def test_a_missing_tracker_stops_the_job_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(T.ACCELERATE_TRACKERS, "wandb", ("loralens_no_such_module", "wandb"))
    cfg = load_config(overrides=["tracking.report_to=[wandb]"])
    with pytest.raises(ConfigError, match=r"pip install wandb"):
        T.open_job(cfg, tmp_path, "sst2", "lora", 42)
    assert list(tmp_path.iterdir()) == []


def test_the_names_are_accelerates():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    assert set(T.ACCELERATE_TRACKERS) | set(T.OWN) == set(LOGGER_TYPE_TO_CLASS)
    assert set(T.REPORT_TO) == {"none", "all"} | set(LOGGER_TYPE_TO_CLASS)


def test_wandb_arguments_follow_its_environment(tmp_path):
    tags = {"kind": "train", "task": "sst2"}
    args, kw = T._accelerate_args("wandb", "exp", "sst2/lora/seed42", "sst2-lora-seed42",
                                  tmp_path, tags, environ={})
    assert args == ("exp",)
    assert kw == {"name": "sst2/lora/seed42", "job_type": "train", "reinit": "finish_previous",
                  "config": {"tag.kind": "train", "tag.task": "sst2"}, "dir": str(tmp_path)}
    args, kw = T._accelerate_args("wandb", "exp", "x", "x", tmp_path, tags,
                                  environ={"WANDB_DIR": "/elsewhere", "WANDB_PROJECT": "mine"})
    assert args == ("mine",) and "dir" not in kw  # wandb reads WANDB_DIR itself
    args, kw = T._accelerate_args("dvclive", "exp", "a/b", "a-b", tmp_path, tags, environ={})
    assert kw == {"dir": str(tmp_path / "a-b")}


class _Recorder:
    """A stand-in GeneralTracker: records what loralens asks of it."""

    calls: list = []
    requires_logging_directory = False

    def __init__(self, *args, **kwargs):
        self.calls.append(("init", args, kwargs))

    def start(self):
        self.calls.append(("start",))

    def store_init_configuration(self, values):
        self.calls.append(("config", values))

    def log(self, values, step=None):
        self.calls.append(("log", step, values))

    def finish(self):
        self.calls.append(("finish",))


def test_a_job_reaches_accelerates_tracker_interface(tmp_path, monkeypatch):
    from accelerate import tracking as acc

    _Recorder.calls = []
    monkeypatch.setitem(acc.LOGGER_TYPE_TO_CLASS, "dvclive", _Recorder)
    monkeypatch.setitem(T.ACCELERATE_TRACKERS, "dvclive", ("json", "dvclive"))  # "installed"
    cfg = load_config(overrides=["tracking.report_to=[dvclive]", "tracking.experiment=exp"])
    tracker = T.open_job(cfg, tmp_path / "run", "sst2", "lora", 42)
    tracker.params({"hyperparameters": {"lr": 0.01, "lora": {"r": 8}}})
    tracker.on_step(1, 0.5, 0.001)
    tracker.on_eval({"step": 1, "val_loss": 0.25, "val_accuracy": 0.75, "examples": 16})
    tracker.scalars(2, {"fit/mfu": float("nan"), "fit/best_step": 1})
    tracker.close()
    folder = tmp_path / "run" / "trackers" / "dvclive"
    assert _Recorder.calls == [
        ("init", ("sst2/lora/seed42",), {"dir": str(folder / "sst2-lora-seed42")}),
        ("start",),
        ("config", {"hyperparameters.lr": 0.01, "hyperparameters.lora.r": 8}),
        ("log", 1, {"train/loss": 0.5, "train/lr": 0.001}),
        ("log", 1, {"selection/val_loss": 0.25, "selection/val_accuracy": 0.75}),
        ("log", 2, {"fit/best_step": 1.0}),  # NaN left out, as for MLflow and TensorBoard
        ("finish",)]
    assert folder.is_dir()


def test_a_failed_wandb_run_ends_with_exit_code_1(tmp_path, monkeypatch):
    """accelerate's WandBTracker.finish() takes no exit code: a failed job would show as a
    success; loralens finishes wandb's run itself with exit_code=1."""
    from accelerate import tracking as acc

    class Run:
        ended = []

        def finish(self, exit_code=None):
            self.ended.append(exit_code)

    class FakeWandb(_Recorder):
        tracker = Run()

    _Recorder.calls, Run.ended = [], []
    monkeypatch.setitem(acc.LOGGER_TYPE_TO_CLASS, "wandb", FakeWandb)
    monkeypatch.setitem(T.ACCELERATE_TRACKERS, "wandb", ("json", "wandb"))
    cfg = load_config(overrides=["tracking.report_to=[wandb]"])
    T.open_job(cfg, tmp_path / "run", "sst2", "lora", 42).close(ok=False)
    T.open_job(cfg, tmp_path / "run", "sst2", "lora", 43).close(ok=True)
    assert Run.ended == [1]
    assert [c for c in _Recorder.calls if c[0] == "finish"] == [("finish",)]
