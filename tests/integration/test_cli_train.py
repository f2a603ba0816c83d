"""The CLI on SmolLM2 and real GLUE rows: artifacts, skip-when-done, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from loralens.cli import main

TINY = ["data.train_size=16", "data.early_stop_size=16", "train.max_steps=2",
        "train.batch_size=8", "data.max_length=64"]


def test_train_writes_run_directory_and_skips_when_done(tmp_path, glue_dir, capsys):
    run = tmp_path / "run"
    argv = ["train", "--task", "rte", "--method", "lora", "--method", "full", "--seed", "42",
            "--preset", "smoke", "--run-dir", str(run), "--glue-dir", str(glue_dir),
            "--no-progress", *TINY]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "rte/lora/seed42: accuracy" in out and "rte/full/seed42: accuracy" in out
    lora = run / "models/rte/lora/seed42"
    full = run / "models/rte/full/seed42"
    assert (lora / "adapter/adapter_model.safetensors").is_file()
    assert (lora / "adapter/adapter_config.json").is_file()
    assert (full / "model/model.safetensors").is_file()
    m = json.loads((lora / "metrics.json").read_text())
    assert m["validation"]["n"] == 277            # the whole validation split
    assert m["fit"]["steps"] == 2
    # The recorded scores are the saved logits' scores against the labels of the GLUE file,
    # read here on their own (label = the last tab-separated field, in file order).
    lines = (glue_dir / "RTE" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0].split("\t")[-1] == "label"
    labels = np.array([{"entailment": 0, "not_entailment": 1}[ln.split("\t")[-1]]
                       for ln in lines[1:] if ln])
    assert len(labels) == 277 and np.bincount(labels).tolist() == [146, 131]
    for job in (lora, full):
        mj = json.loads((job / "metrics.json").read_text())
        logits = np.load(job / "val_logits.npy")
        assert logits.shape == (277, 2) and np.isfinite(logits).all()
        pred = logits.argmax(axis=1)
        assert mj["validation"]["accuracy"] == pytest.approx(float((pred == labels).mean()),
                                                             abs=1e-12)
        tp = int(((pred == 1) & (labels == 1)).sum())
        f1 = 2 * tp / (2 * tp + int((pred != labels).sum())) if tp else 0.0
        assert mj["validation"]["f1"] == pytest.approx(f1, abs=1e-12)
        assert mj["score"] == mj["validation"]["accuracy"]  # RTE's study metric
    # majority label of the 16 training rows, scored on the validation split (146 / 131)
    maj = m["majority_baseline"]
    assert maj["accuracy"] == pytest.approx({0: 146, 1: 131}[maj["label"]] / 277)
    assert m["parameters"]["trainable"] < m["parameters"]["total"] / 50
    mf = json.loads((full / "metrics.json").read_text())
    assert mf["parameters"]["trainable"] == mf["parameters"]["total"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["preset"] == "smoke" and cfg["train"]["max_steps"] == 2
    env = json.loads((run / "env.json").read_text())["train"]
    assert env["packages"]["torch"] and env["packages"]["peft"] and "hardware" in env
    data = json.loads((run / "data.json").read_text())["rte"]
    assert data["train"]["rows"] == 16 and data["validation"]["rows"] == 277

    mtime = (lora / "metrics.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert "already done, skipped" in capsys.readouterr().out
    assert (lora / "metrics.json").stat().st_mtime_ns == mtime


def test_changed_settings_in_same_run_dir_is_an_error(tmp_path, glue_dir, capsys):
    run = tmp_path / "run"
    (run).mkdir()
    from loralens.study.config import load_config

    first = load_config(overrides=[f"data.glue_dir={os.path.abspath(glue_dir)}", "train.epochs=99"])
    (run / "config.yaml").write_text(yaml.safe_dump(first.to_dict()))
    # a setting given to a command on an existing run directory must equal the stored one
    # (--glue-dir alone would use the stored settings: it says where, not what)
    rc = main(["train", "--task", "rte", "--run-dir", str(run), "--glue-dir", str(glue_dir),
               "train.epochs=3"])
    assert rc == 2
    assert "written with other settings (train.epochs: 99 -> 3);" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--task", "rte", "--run-dir", str(tmp_path / "r"),
                 "train.epoch=3"]) == 2
    assert "unknown key 'train.epoch'; did you mean train.epochs?" in capsys.readouterr().err
    assert main(["train", "--task", "rte", "--run-dir", str(tmp_path / "r2"),
                 "--glue-dir", str(tmp_path)]) == 2
    assert "RTE/train.tsv: file not found" in capsys.readouterr().err
    assert main(["train", "--task", "rte", "--run-dir", str(tmp_path / "r3"),
                 "--model", "nope-model"]) == 2
    assert "registry names: smollm2-135m, tinyllama-1.1b" in capsys.readouterr().err


def test_sanity_lora_sst2_passes(tmp_path, glue_dir):
    rc = main(["sanity", "--task", "sst2", "--method", "lora", "--preset", "smoke",
               "--run-dir", str(tmp_path), "--glue-dir", str(glue_dir), "--no-progress"])
    res = json.loads((tmp_path / "sanity.json").read_text())["results"]
    assert rc == 0 and res[0]["passed"] and res[0]["final_train_loss"] < 0.1
    assert res[0]["examples"] == 10


def test_console_script_installed():
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "loralens"), "models"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "smollm2-135m" in out.stdout
