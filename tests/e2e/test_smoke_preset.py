"""End to end: `loralens run --preset smoke` on SmolLM2 and real GLUE rows, every stage."""

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow


def test_smoke_preset_runs_every_stage(tmp_path, glue_dir):
    run = tmp_path / "smoke"
    exe = os.path.join(os.path.dirname(sys.executable), "loralens")
    out = subprocess.run([exe, "run", "--preset", "smoke", "--run-dir", str(run),
                          "--glue-dir", str(glue_dir), "--no-progress"],
                         capture_output=True, text=True, timeout=2400)
    assert out.returncode == 0, (out.stdout[-4000:], out.stderr[-4000:])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["preset"] == "smoke"
    tasks, methods = cfg["tasks"], cfg["methods"]
    assert tasks == ["sst2"] and methods == ["lora", "full"]
    # sanity, search, training
    # every sanity check ran and passed: the stored loss is below the stored threshold,
    # which is the preset's (a study continues past a failure, this smoke run must not)
    sanity = json.loads((run / "sanity.json").read_text())
    assert not sanity["missing"]
    assert sorted((r["task"], r["method"]) for r in sanity["results"]) == \
        sorted((t, m) for t in tasks for m in methods)
    for r in sanity["results"]:
        where = f"sanity {r['task']}/{r['method']}: {r}"
        assert r["passed"] is True, where
        assert r["threshold"] == cfg["sanity"]["loss_threshold"] == 0.1, where
        assert r["final_train_loss"] < r["threshold"], where
        assert r["examples"] == cfg["sanity"]["examples"] == 10, where
        assert r["epochs_run"] <= cfg["sanity"]["epochs"], where
    n = len(tasks) * len(methods)
    assert f"sanity: {n}/{n} passed" in out.stdout
    for t in tasks:
        for m in methods:
            s = json.loads((run / "search" / f"{t}-{m}.json").read_text())
            assert s["counts"]["COMPLETE"] + s["counts"]["PRUNED"] == cfg["search"]["trials"]
            assert s["counts"]["COMPLETE"] >= 1 and s["counts"]["FAIL"] == 0
            metrics = json.loads((run / "models" / t / m / "seed42" / "metrics.json").read_text())
            assert metrics["validation"]["n"] == {"sst2": 872, "rte": 277}[t]
            assert metrics["overrides"]["train"]["lr"] == s["best"]["params"]["lr"]
    # LoRA learns SST-2 on 480 rows: above the majority class of the 872 dev rows (444
    # positive, counted from dev.tsv: 0.509) by 3 standard errors (sqrt(.25/872) = 0.017)
    lora_sst2 = json.loads((run / "models" / "sst2" / "lora" / "seed42" / "metrics.json").read_text())
    assert lora_sst2["validation"]["accuracy"] > 0.56, lora_sst2["validation"]
    # extraction, drift, serving, report
    assert any((run / "extract").rglob("*.npy")) or any((run / "extract").rglob("*.npz"))
    assert (run / "drift").is_dir() and any((run / "drift").glob("*.csv"))
    assert (run / "bench").is_dir() and any((run / "bench").glob("*.json"))
    html = run / "report" / "report.html"
    assert html.is_file() and (run / "report" / "report.md").is_file()
    assert f"report: {html}" in out.stdout
    timings = json.loads((run / "timings.json").read_text())
    assert set(timings) == {"sanity", "search", "train", "extract", "drift", "weights", "bench",
                            "report"}
    # A second run finds everything done and repeats nothing.
    mtimes = {p: p.stat().st_mtime_ns for p in run.glob("models/*/*/seed*/metrics.json")}
    again = subprocess.run([exe, "run", "--preset", "smoke", "--run-dir", str(run),
                            "--glue-dir", str(glue_dir), "--no-progress",
                            "--stages", "sanity,search,train"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
