"""The weights stage after training, through ``loralens run --stages train,weights`` on the
tiny model: per-layer results, and a rerun resumes (the measures themselves:
tests/unit/analysis/test_weights.py)."""

import json

from loralens import cli
from loralens.core.run_dir import RunDir
from tests.helpers.overrides import WEIGHTS


def test_weights_stage_writes_per_layer_results_and_resumes(tmp_path, glue_dir, tiny_base,
                                                            capsys):
    run = RunDir(tmp_path / "run")
    argv = ["--run-dir", str(run.root), "--glue-dir", str(glue_dir), "--no-progress", *WEIGHTS]
    assert cli.main(["run", "--stages", "train,weights", *argv]) == 0
    rows = json.loads(run.weightspace_path("layers.json").read_text())["rows"]
    lora = [r for r in rows if r["method"] == "lora"]
    full = [r for r in rows if r["method"] == "full"]
    assert {(r["layer"], r["matrix"]) for r in lora} == {(i, m) for i in (0, 1)
                                                         for m in ("q_proj", "v_proj")}
    assert all(r["group"] == "common" for r in lora) and len(lora) == 2 * 4
    extra = {(r["layer"], r["matrix"]) for r in full if r["group"] == "extra"}
    assert extra == {(i, m) for i in (0, 1)
                     for m in ("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    assert all(r["rel_change"] > 0 for r in rows)
    assert all(r["rank90"] <= 8 for r in lora)  # a rank-8 update
    forget = json.loads(run.weightspace_path("forgetting.json").read_text())["rows"]
    assert {(r["task"], r["method"], r["seed"]) for r in forget} == {
        ("rte", m, s) for m in ("lora", "full") for s in (42, 1337)}
    assert all(r["forgetting"] == r["ce_tuned"] - r["ce_base"] for r in forget)
    summary = json.loads(run.weightspace_path("summary.json").read_text())
    cell = summary["tasks"][0]["measures"]["intruders"]
    assert cell["lora"]["n"] == 2 and "p" in cell["test"]
    assert (run.weightspace_path("layers.csv").read_text().splitlines()[0].startswith(
        "task,method,seed,layer,matrix,group,shape,rel_change,effective_rank,rank90,"
        "intruders_0.1,"))
    before = run.weightspace_model_path("rte", "lora", 42).stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(["weights", *argv]) == 0
    assert "weights: 4 model(s) up to date" in capsys.readouterr().out
    assert run.weightspace_model_path("rte", "lora", 42).stat().st_mtime_ns == before
