"""The intruder sweep inside the weights stage, through ``loralens run --stages
train,extract,drift,weights`` on the tiny model, and its resume (the sweep itself:
tests/unit/analysis/test_intruder_sweep.py)."""

import json

import numpy as np
import pytest

from loralens import cli
from loralens.core.run_dir import RunDir
from tests.helpers.overrides import WEIGHTS

TINY = [*WEIGHTS, "extract.examples=16", "weights.sweep=true",
        "weights.sweep_lambdas=[1, 0]", "weights.sweep_eval_examples=24"]


def test_the_sweep_runs_in_the_weights_stage_and_resumes(tmp_path, glue_dir, tiny_base,
                                                         capsys):
    run = RunDir(tmp_path / "run")
    argv = ["--run-dir", str(run.root), "--glue-dir", str(glue_dir), "--no-progress", *TINY]
    assert cli.main(["run", "--stages", "train,extract,drift,weights", *argv]) == 0
    rows = json.loads(run.weightspace_path("sweep.json").read_text())["rows"]
    # one seed by default (weights.sweep_seeds = 1), every lambda
    assert [(r["task"], r["seed"], r["lambda"]) for r in rows] == [("rte", 42, 1), ("rte", 42, 0)]
    assert all(r["n_eval"] == 24 and r["n_drift"] == 16 for r in rows)
    one = json.loads(run.weightspace_sweep_path("rte", 42).read_text())["lambdas"]
    if rows[1]["peft_intruders"] == 0:  # nothing to remove: measured once, reused
        assert one["0"]["same_as"] == "1" and rows[1]["drift"] == rows[0]["drift"]
    else:
        assert "same_as" not in one["0"]
    # lambda = 1 reproduces the drift stage's own debiased drift of the same model
    layers = json.loads(run.drift_path("layers.json").read_text())["rows"]
    want = np.mean([r["drift_debiased"] for r in layers
                    if r["method"] == "lora" and r["seed"] == 42 and r["in_drift"]])
    assert rows[0]["drift"] == pytest.approx(want, abs=1e-4)
    assert run.weightspace_path("sweep.csv").read_text().startswith(
        "task,seed,lambda,metric,score,accuracy,n_eval,drift,forgetting,")
    before = run.weightspace_sweep_path("rte", 42).stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(["weights", *argv]) == 0
    assert run.weightspace_sweep_path("rte", 42).stat().st_mtime_ns == before
    assert "sweep rte" not in capsys.readouterr().out  # nothing measured again
