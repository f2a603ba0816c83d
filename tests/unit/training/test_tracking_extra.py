"""The trackers are optional (the ``tracking`` extra; ``make run`` does not install it): a
tracker asked for without its library is a ConfigError naming ``tracking.report_to`` and
the extra, before anything is written."""

import pytest

from loralens.core.errors import ConfigError
from loralens.study.config import load_config
from loralens.training import tracking as T


def test_a_missing_tracker_names_the_extra():
    missing = {"mlflow"}

    def find_spec(name):
        return None if name in missing else object()

    T.require_installed(["tensorboard"], find_spec)   # installed: nothing to say
    with pytest.raises(ConfigError, match=r"'mlflow' needs MLflow, which is not installed "
                                          r"here; install the tracking extra: pip install "
                                          r"'loralens\[tracking\]'") as e:
        T.require_installed(["tensorboard", "mlflow"], find_spec)
    assert e.value.key == "tracking.report_to"


def test_opening_a_job_checks_before_writing(tmp_path, monkeypatch):
    monkeypatch.setitem(T.TRACKER_MODULES, "tensorboard",
                        ("loralens_no_such_module", "TensorBoard"))
    cfg = load_config(overrides=["tracking.report_to=[tensorboard]"])
    with pytest.raises(ConfigError, match=r"'tensorboard' needs TensorBoard") as e:
        T.open_job(cfg, tmp_path, "sst2", "lora", 42)
    assert e.value.key == "tracking.report_to"
    assert list(tmp_path.iterdir()) == []
