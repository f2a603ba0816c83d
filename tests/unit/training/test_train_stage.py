"""The train stage as a user starts it (``loralens train``) on the tiny random model:
the search's best hyperparameters are used when the search ran (and it says so),
``--no-search`` opts out, and a job killed while ``--overwrite`` rewrites it is never
left marked finished with missing or half-written files."""

import json

import numpy as np
import pytest

from loralens import cli
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json
from tests.helpers.overrides import tiny

TINY = tiny("methods=[lora]")


def train(run_dir, glue_dir, *extra):
    return cli.main(["train", "--run-dir", str(run_dir), "--glue-dir", str(glue_dir),
                     "--no-progress", *TINY, *extra])


def metrics(run, seed=42):
    return json.loads(run.metrics_path("rte", "lora", seed).read_text())


def test_train_uses_the_search_best_and_says_so(tmp_path, glue_dir, tiny_base, capsys):
    run = RunDir(tmp_path / "run")
    best = {"train": {"lr": 0.0123, "batch_size": 4, "warmup_ratio": 0.0, "weight_decay": 0.0,
                      "epochs": 1}, "lora": {"alpha": 8, "dropout": 0.0}}
    atomic_write_json(run.search_path("rte", "lora"), {"overrides": best})
    assert train(run.root, glue_dir) == 0
    out = capsys.readouterr().out
    assert f"hyperparameters of the search's best trial ({run.search_path('rte', 'lora')})" in out
    m = metrics(run)
    assert m["overrides"] == best
    assert m["hyperparameters"]["lr"] == 0.0123 and m["hyperparameters"]["batch_size"] == 4
    assert m["hyperparameters"]["lora"]["alpha"] == 8.0
    assert m["hyperparameters"]["lora"]["r"] == 8          # the config's rank, not forced

    # --no-search: the config's values, for a new seed
    assert train(run.root, glue_dir, "--seed", "7", "--no-search") == 0
    assert "search's best" not in capsys.readouterr().out
    m7 = metrics(run, 7)
    assert m7["overrides"] == {} and m7["hyperparameters"]["lr"] == 5e-4  # train.lr_lora
    assert m7["hyperparameters"]["batch_size"] == 8


def test_train_without_a_search_result_says_it_uses_the_config(tmp_path, glue_dir, tiny_base,
                                                                 capsys):
    run = RunDir(tmp_path / "run")
    assert train(run.root, glue_dir) == 0
    assert "no search result" in capsys.readouterr().out
    assert metrics(run)["overrides"] == {}


@pytest.mark.parametrize("where", ["weights", "logits"])
def test_a_kill_during_overwrite_leaves_the_job_unfinished(tmp_path, glue_dir, tiny_base,
                                                           monkeypatch, where):
    import loralens.training.job as train_module

    run = RunDir(tmp_path / "run")
    assert train(run.root, glue_dir) == 0
    weights = run.weights_dir("rte", "lora", 42)
    before = (weights / "adapter_model.safetensors").read_bytes()

    class Killed(BaseException):
        pass

    if where == "weights":  # the kill lands while the new adapter is being written
        def save_then_die(model, method, out, *_, **__):
            from loralens.core.files import atomic_dir

            with atomic_dir(out) as tmp:
                (tmp / "adapter_model.safetensors").write_bytes(b"half")
                raise Killed()
        monkeypatch.setattr(train_module, "save_trained", save_then_die)
    else:  # the kill lands after the adapter, while the logits are written
        monkeypatch.setattr(train_module.np, "save", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        train(run.root, glue_dir, "--overwrite")
    monkeypatch.undo()

    assert not run.job_done("rte", "lora", 42)      # never "finished" with missing files
    if where == "weights":
        assert (weights / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in weights.parent.iterdir() if p.name.startswith(".")) == []
    # the next run finds the job unfinished and trains it again, completely
    assert train(run.root, glue_dir) == 0
    assert run.job_done("rte", "lora", 42)
    assert np.load(run.val_logits_path("rte", "lora", 42)).shape == (277, 2)
