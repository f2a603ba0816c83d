"""The intervention sweep inside the weights stage, through ``loralens run --stages
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
    out = json.loads(run.weightspace_path("sweep.json").read_text())
    rows = out["rows"]
    # every seed by default (weights.sweep_seeds = 0), both arms, every lambda
    assert sorted((r["seed"], r["arm"], r["lambda"]) for r in rows) == sorted(
        (s, arm, lam) for s in (42, 1337) for arm in ("intruder", "control") for lam in (1, 0))
    assert all(r["task"] == "rte" and r["n_eval"] == 24 and r["n_drift"] == 16 for r in rows)
    one = json.loads(run.weightspace_sweep_path("rte", 42).read_text())
    # lambda = 1: the control is the intruder arm's model (rescaling by 1 changes nothing)
    assert one["arms"]["control"]["1"]["same_as"] == "intruder 1"
    for arm in ("intruder", "control"):  # both arms rescale as many directions
        e = one["arms"][arm]["0"]
        assert e["directions"] == e["intruders"]
        if e["intruders"] == 0:  # nothing to rescale: the reference, measured once
            assert e["same_as"] == "reference"
    # the unchanged model and lambda = 1 reproduce the drift stage's own debiased drift
    layers = json.loads(run.drift_path("layers.json").read_text())["rows"]
    want = np.mean([r["drift_debiased"] for r in layers
                    if r["method"] == "lora" and r["seed"] == 42 and r["in_drift"]])
    assert one["reference"]["drift"]["mean"] == pytest.approx(want, abs=1e-4)
    assert one["arms"]["intruder"]["1"]["drift"]["mean"] == pytest.approx(want, abs=1e-4)
    # one contrast per lambda and measure, over both seeds; lambda 1 stated, not tested
    c = {(r["lambda"], r["measure"]): r for r in out["contrasts"]["rows"]}
    assert set(c) == {(lam, m) for lam in (1, 0) for m in ("score", "drift", "forgetting")}
    assert c[(0, "score")]["seeds"] == [42, 1337] and c[(1, "score")]["tested"] is False
    assert out["contrasts"]["families"]["score"]["members"] == ["rte λ=0 score"]
    assert run.weightspace_path("sweep.csv").read_text().startswith(
        "task,seed,arm,lambda,metric,score,score_change,")
    before = run.weightspace_sweep_path("rte", 42).stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(["weights", *argv]) == 0
    assert run.weightspace_sweep_path("rte", 42).stat().st_mtime_ns == before
    assert "sweep rte" not in capsys.readouterr().out  # nothing measured again
