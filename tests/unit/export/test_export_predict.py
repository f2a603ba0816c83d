"""``loralens export`` and ``loralens predict`` on a run trained by ``loralens train`` (tiny
random model, RTE): exported artifacts, loaded with plain transformers/PEFT calls, and
predictions reproduce the training's own validation logits (val_logits.npy); an adapter of
the old layout is converted by the export."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from loralens import cli
from loralens.core.run_dir import RunDir

from tests.helpers.export import MAX_LENGTH, dev_rows, plain_logits
from tests.helpers.overrides import tiny

TINY = tiny("methods=[lora,full]")
@pytest.fixture(scope="module")
def run(tmp_path_factory, glue_dir, tiny_base):
    root = tmp_path_factory.mktemp("exp") / "run"
    assert cli.main(["train", "--run-dir", str(root), "--glue-dir", str(glue_dir),
                     "--no-progress", *TINY]) == 0
    return RunDir(root)


def _make_old_layout(adapter):
    """Rewrite a job's adapter as loralens wrote it before (backbone.* keys, no task type)."""
    st = adapter / "adapter_model.safetensors"
    save_file({k.replace("base_model.model.model.", "base_model.model.backbone."): v
               for k, v in load_file(str(st)).items()}, str(st))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(task_type=None, base_model_name_or_path=None)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


def test_export_converts_a_run_and_plain_peft_matches_val_logits(run, glue_dir, tmp_path,
                                                                  capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _make_old_layout(run.weights_dir("rte", "lora", 42))
    out = tmp_path / "exported"
    assert cli.main(["export", str(run.root), str(out)]) == 0
    assert "exported 2 model(s)" in capsys.readouterr().out
    manifest = json.loads((out / "export.json").read_text())
    assert {(a["method"], a["kind"]) for a in manifest["artifacts"]} == {
        ("lora", "peft-adapter"), ("full", "sequence-classification")}

    rows = dev_rows(glue_dir, 24)
    adapter = out / "rte" / "lora" / "seed42"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg.get("auto_mapping") is None
    tok = AutoTokenizer.from_pretrained(str(adapter))
    base = AutoModelForSequenceClassification.from_pretrained(cfg["base_model_name_or_path"],
                                                              num_labels=2)
    base.config.pad_token_id = tok.pad_token_id
    pm = PeftModel.from_pretrained(base, str(adapter)).eval()
    want = np.load(run.val_logits_path("rte", "lora", 42))[:24]
    np.testing.assert_allclose(plain_logits(pm, tok, rows), want, atol=1e-5, rtol=0)

    full = out / "rte" / "full" / "seed42"
    hf = AutoModelForSequenceClassification.from_pretrained(str(full)).eval()
    assert hf.config.id2label == {0: "entailment", 1: "not_entailment"}
    want = np.load(run.val_logits_path("rte", "full", 42))[:24]
    np.testing.assert_allclose(plain_logits(hf, AutoTokenizer.from_pretrained(str(full)), rows),
                               want, atol=1e-5, rtol=0)
    card = (adapter / "README.md").read_text()
    metrics = json.loads(run.metrics_path("rte", "lora", 42).read_text())
    assert f"- accuracy: {metrics['validation']['accuracy']}" in card
    assert "rows of" in card and "RTE/dev.tsv" in card and '"r": 8' in card


def test_export_merge_writes_checkpoints_only(run, tmp_path):
    out = tmp_path / "merged"
    assert cli.main(["export", str(run.root), str(out), "--merge"]) == 0
    lora = out / "rte" / "lora" / "seed42"
    assert not (lora / "adapter_config.json").exists()
    assert json.loads((lora / "config.json").read_text())["architectures"] == [
        "LlamaForSequenceClassification"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_predict_reproduces_the_validation_logits(run, glue_dir, tmp_path, method):
    out = tmp_path / "pred.jsonl"
    assert cli.main(["predict", str(run.root), "--task", "rte", "--method", method,
                     "--input", str(glue_dir / "RTE" / "dev.tsv"), "--output", str(out)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    logits = np.load(run.val_logits_path("rte", method, 42))
    assert len(got) == len(logits) == 277
    p = torch.softmax(torch.from_numpy(logits), -1).numpy()
    np.testing.assert_allclose([[g["probabilities"]["entailment"],
                                 g["probabilities"]["not_entailment"]] for g in got], p,
                               atol=1e-6)
    assert [g["label"] for g in got] == p.argmax(1).tolist()
    assert {g["label_name"] for g in got} <= {"entailment", "not_entailment"}


def test_predict_on_artifact_dirs_and_the_test_split(run, glue_dir, tmp_path):
    out = tmp_path / "exported"
    assert cli.main(["export", str(run.root), str(out)]) == 0
    logits = np.load(run.val_logits_path("rte", "lora", 42))
    dev = tmp_path / "dev.csv"  # the hub's column names, in a CSV
    with open(dev, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence1", "sentence2"])
        w.writerows([r["sentence1"], r["sentence2"]] for r in dev_rows(glue_dir, 5))
    pred = tmp_path / "pred.tsv"
    assert cli.main(["predict", str(out / "rte" / "lora" / "seed42"), "--task", "rte",
                     "--max-length", str(MAX_LENGTH), "--input", str(dev),
                     "--output", str(pred)]) == 0
    with open(pred, newline="") as f:
        got = list(csv.DictReader(f, delimiter="\t"))
    p = torch.softmax(torch.from_numpy(logits[:5]), -1).numpy()
    np.testing.assert_allclose([float(g["p_entailment"]) for g in got], p[:, 0], atol=1e-5)
    assert [g["index"] for g in got] == ["0", "1", "2", "3", "4"]

    test_pred = tmp_path / "test.tsv"
    assert cli.main(["predict", str(out / "rte" / "full" / "seed42"), "--task", "rte",
                     "--max-length", str(MAX_LENGTH), "--input",
                     str(glue_dir / "RTE" / "test.tsv"), "--output", str(test_pred)]) == 0
    lines = test_pred.read_text().splitlines()
    assert lines[0] == "index\tlabel\tlabel_name\tp_entailment\tp_not_entailment"
    assert len(lines) == 3001 and lines[1].startswith("0\t")


def test_predict_errors_name_the_file_and_line(run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence1": "a", "sentence2": "b"}\n{"sentence1": "a"}\n')
    rc = cli.main(["predict", str(run.root), "--task", "rte", "--input", str(bad),
                   "--output", str(tmp_path / "o.jsonl")])
    assert rc == 2
    assert f"{bad}:2: empty or missing text in ['sentence1', 'sentence2']" in capsys.readouterr().err


def test_exported_card_metadata_and_predict_reads_its_max_length(run, glue_dir, tmp_path):
    """The exported card carries the Hub's metadata and the training max_length, which
    predict uses when --max-length is not given (32 here; the old default 384 keeps more of
    each RTE pair and gives other logits)."""
    from huggingface_hub import ModelCard

    out = tmp_path / "exported"
    assert cli.main(["export", str(run.root), str(out), "--method", "lora"]) == 0
    adapter = out / "rte" / "lora" / "seed42"
    data = ModelCard.load(adapter / "README.md").data
    assert (data.library_name, data.pipeline_tag, data.datasets) == (
        "peft", "text-classification", ["nyu-mll/glue"])
    metrics = json.loads(run.metrics_path("rte", "lora", 42).read_text())["validation"]
    assert [(r.metric_type, r.metric_value, r.dataset_config, r.dataset_split)
            for r in data.eval_results] == [("accuracy", metrics["accuracy"], "rte",
                                             "validation"),
                                            ("f1", metrics["f1"], "rte", "validation")]
    assert data.to_dict()["loralens"]["max_length"] == MAX_LENGTH == 32
    pred = tmp_path / "pred.jsonl"
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"sentence1": r["sentence1"], "sentence2": r["sentence2"]})
                           + "\n" for r in dev_rows(glue_dir, 5)))
    assert cli.main(["predict", str(adapter), "--task", "rte", "--input", str(dev),
                     "--output", str(pred)]) == 0
    got = [json.loads(line)["probabilities"]["entailment"]
           for line in pred.read_text().splitlines()]
    want = torch.softmax(torch.from_numpy(np.load(run.val_logits_path("rte", "lora", 42))[:5]),
                         -1).numpy()[:, 0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_the_card_written_at_training_names_the_dataset(run):
    """The card saved beside a trained adapter (before any export) carries the Hub's dataset
    (name, config, split of the scores), as an exported card does (it had no datasets, and
    its scores named the task as their dataset)."""
    from huggingface_hub import ModelCard

    data = ModelCard.load(run.weights_dir("rte", "lora", 42) / "README.md").data
    assert data.datasets == ["nyu-mll/glue"]
    assert {(r.dataset_type, r.dataset_config, r.dataset_split) for r in data.eval_results} == {
        ("nyu-mll/glue", "rte", "validation")}
