"""Every stage on tasks given as task files, by ``loralens run --preset micro --task FILE``
on the tiny random model: a 4-class pair task (a CSV training file, a JSON Lines
validation file) and a binary task in one Parquet file with a split column and no
validation split (carved from train); then the report again from the run directory alone.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from loralens import cli
from loralens.tasks import registry as tasks
from loralens.training.metrics import f1_macro, matthews
from loralens.core.run_dir import RunDir

WORDS = ("alpha", "beta", "gamma", "delta")


def _four(tmp_path):
    """4 classes, pairs: train.csv (48 rows), dev.jsonl (12 rows, 3 per class)."""
    rng = np.random.default_rng(0)
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["premise", "hypothesis", "label"])
        w.writerows((f"{WORDS[i % 4]} note {rng.integers(1000)}", f"so {WORDS[i % 4]}",
                     WORDS[i % 4]) for i in range(48))
    dev = [{"premise": f"{WORDS[i % 4]} memo {i}", "hypothesis": "and then", "label":
            WORDS[i % 4]} for i in range(12)]
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    (tmp_path / "four.yaml").write_text(
        "name: four\ntext_columns: [premise, hypothesis]\nlabel_column: label\n"
        "labels: [alpha, beta, gamma, delta]\nmetrics: [f1, accuracy, mcc]\n"
        "source:\n  files: {train: train.csv, validation: dev.jsonl}\n")
    return tmp_path / "four.yaml", np.array([WORDS.index(r["label"]) for r in dev])


def _parquet(tmp_path):
    """Binary integer labels, one Parquet file, split column, no validation split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 40
    pq.write_table(pa.table({"s": [f"sentence {i}" for i in range(n)],
                             "y": [i % 2 for i in range(n)],
                             "part": ["train"] * n}), tmp_path / "all.parquet")
    (tmp_path / "pq.yaml").write_text(
        "name: pq\ntext_columns: [s]\nlabel_column: y\nlabels: {0: \"no\", 1: \"yes\"}\n"
        "metrics: [mcc, accuracy]\n"
        "splits: {train: train}\nvalidation_carve: {fraction: 0.25, seed: 3}\n"
        "source:\n  files: {file: all.parquet, split_column: part}\n")
    return tmp_path / "pq.yaml"


def test_every_stage_on_task_files(tmp_path, glue_dir, offline, capsys):
    four, dev_labels = _four(tmp_path)
    files = [four, _parquet(tmp_path)]
    run = tmp_path / "run"
    argv = ["run", "--preset", "micro", "--run-dir", str(run), "--glue-dir", str(glue_dir),
            "--no-progress", "search.trials=1", "bench.requests=2", "bench.warmup=0"]
    for f in files:
        argv += ["--task", str(f)]
    assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["tasks"] == ["four", "pq"] and set(cfg["task_defs"]) == {"four", "pq"}
    data = json.loads((run / "data.json").read_text())
    # per-class counts of the rows used; the reported rows are the whole validation file
    assert data["four"]["validation"]["label_counts"] == {str(c): 3 for c in range(4)}
    pv = data["pq"]["validation"]
    assert pv["rows"] == 10 and pv["label_counts"] == {"0": 5, "1": 5}    # carved, stratified
    assert "fraction 0.25, seed 3" in pv["source"]

    # the 4-class head and its metrics, checked against the labels read here
    rd = RunDir(run)
    m = json.loads(rd.metrics_path("four", "lora", 42).read_text())
    logits = np.load(rd.val_logits_path("four", "lora", 42))
    assert logits.shape == (12, 4) and m["selection_metric"] == "f1"
    pred = logits.argmax(1)
    assert m["validation"]["f1"] == pytest.approx(f1_macro(pred, dev_labels))
    assert m["validation"]["mcc"] == pytest.approx(matthews(pred, dev_labels, 4))
    assert m["score"] == m["validation"]["f1"]
    # Table 1 from the task's own statistics and label names
    html = (run / "report" / "report.html").read_text()
    sel = data["four"]["selection"]["label_counts"]
    assert sel == {str(c): 6 for c in range(4)}        # half of 48 rows, stratified
    assert "alpha 6 (25%), beta 6 (25%), gamma 6 (25%), delta 6 (25%)" in html
    for name in ("four", "pq"):
        train = data[name]["train"]["label_counts"]
        assert sum(train.values()) == data[name]["train"]["rows"]

    mm = json.loads(rd.metrics_path("pq", "full", 1337).read_text())
    assert mm["selection_metric"] == "mcc" and mm["score"] == mm["validation"]["mcc"]

    # the run directory describes its tasks: the report and serve need no task file
    for f in files:
        f.unlink()
    for name in cfg["tasks"]:
        tasks.REGISTERED.pop(name, None)
    from loralens.serving.sources import task_of

    assert task_of(rd.weights_dir("four", "lora", 42))[0] == "four"
    assert tasks.get_task("four").label_names == WORDS
    tasks.REGISTERED.pop("four")
    (run / "report" / "report.html").unlink()
    assert cli.main(["report", str(run), "--no-progress"]) == 0
    assert "alpha 6 (25%)" in (run / "report" / "report.html").read_text()
