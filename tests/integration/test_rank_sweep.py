"""The rank sweep on the tiny model through ``loralens run --preset micro --stages
train,extract,drift``: five methods trained, their parameter counts and both rank figures
(the presets and the figures on synthetic numbers: tests/unit/report/test_rank_sweep.py)."""

from __future__ import annotations

import json
import math

import numpy as np

from loralens import cli
from loralens.core.run_dir import RunDir
from loralens.report.rank_figures import (
    RANK_FIGURES,
    fig_drift_vs_rank,
)
from tests.helpers.figures import plotted

DEFS = ("method_defs={lora-r1: {family: peft, peft: {r: 1, alpha: 2}}, "
        "lora-r2: {family: peft, peft: {r: 2, alpha: 4}}, "
        "lora-r4: {family: peft, peft: {r: 4, alpha: 8}}}")


def test_micro_rank_sweep_draws_both_figures(tmp_path, glue_dir, tiny_base):
    from loralens.report import build_report

    run = RunDir(tmp_path / "run")
    methods = ["head", "lora-r1", "lora-r2", "lora-r4", "full"]
    assert cli.main(["run", "--preset", "micro", "--stages", "train,extract,drift",
                     "--run-dir", str(run.root), "--glue-dir", str(glue_dir), "--no-progress",
                     "tasks=[sst2]", "seeds=[42]", "search.enabled=false", "data.max_length=64",
                     f"methods=[{','.join(methods)}]", DEFS]) == 0
    # metrics.json records what each method trained: r * (32 + 32 + 32 + 16) * 2 + head
    for m, n in (("head", 64), ("lora-r1", 288), ("lora-r2", 512), ("lora-r4", 960),
                 ("full", 26944)):
        rec = json.loads(run.metrics_path("sst2", m, 42).read_text())
        assert rec["parameters"]["trainable"] == n, m
    # the report module draws both (the report stage's own method check is not needed)
    build_report(run)
    figs = run.report_dir / "figures"
    for fid, *_ in RANK_FIGURES:
        assert (figs / f"{fid}.png").stat().st_size > 0 and (figs / f"{fid}.svg").is_file()
    md = (run.report_dir / "report.md").read_text()
    assert "Figure R1: accuracy vs trainable parameters" in md
    assert "Figure R2: drift vs LoRA rank" in md
    # the plotted drift is layers.json's, per seed
    from loralens.report.run_data import load_run

    d = load_run(run)
    a = plotted(fig_drift_vs_rank(d))
    rows = json.loads(run.drift_path("layers.json").read_text())["rows"]
    for m, r in (("lora-r1", 1), ("lora-r2", 2), ("lora-r4", 4)):
        want = [np.mean([1 - x["cka_debiased"] for x in rows if x["method"] == m
                         and x["seed"] == 42 and x["in_drift"]])]
        assert all(math.isfinite(w) for w in want)
        np.testing.assert_allclose(a[f"seeds:drift:sst2:{m}"], [[r, w] for w in want])
