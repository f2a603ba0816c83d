"""Model cards carry the Hub's metadata (issue 28.2): the written README.md, parsed back with
``huggingface_hub.ModelCard.load``, names the library, the base model's hub id (and, for the
packaged SmolLM2, the quantization of the weights actually trained on), the pipeline, the
dataset, the metrics and the validation scores with their split, and keeps the human text."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from loralens.models.cards import read_record, write_card

RTE = {"task": "rte", "method": "lora", "seed": 42, "label_names": ("entailment", "not_entailment"),
       "scores": {"accuracy": 0.625, "f1": 0.5, "loss": 0.69, "n": 277},
       "datasets": ["nyu-mll/glue"], "dataset_config": "rte", "dataset_split": "validation",
       "max_length": 384, "version": "0.1.0", "commit": "abc1234"}


def _adapter_dir(tmp_path, base_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": base_path}))
    return out


def test_adapter_card_on_the_packaged_smollm2_names_hub_id_and_quantization(tmp_path):
    out = _adapter_dir(tmp_path, "/cache/loralens/smollm2-135m")
    write_card(out, {**RTE, "base": "smollm2-135m", "adapter": True})
    card = ModelCard.load(out / "README.md")
    d = card.data
    assert d.library_name == "peft"
    assert d.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert d.pipeline_tag == "text-classification"
    assert d.datasets == ["nyu-mll/glue"]
    assert d.metrics == ["accuracy", "f1"]
    assert d.to_dict()["base_model_relation"] == "adapter"
    results = {(r.metric_type, r.metric_value, r.dataset_type, r.dataset_config, r.dataset_split,
                r.task_type) for r in d.eval_results}
    assert results == {
        ("accuracy", 0.625, "nyu-mll/glue", "rte", "validation", "text-classification"),
        ("f1", 0.5, "nyu-mll/glue", "rte", "validation", "text-classification")}
    base = d.to_dict()["loralens"]["base"]
    # the adapter's recorded base stays the converted local directory; the card says where
    # the weights came from and how they differ from the hub's
    assert base["path"] == "/cache/loralens/smollm2-135m"
    assert base["name"] == "smollm2-135m"
    assert base["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base["quantization"].startswith("Q4_1 (GGUF), dequantized to float32")
    assert base["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    # the existing human text follows the metadata
    assert card.text.lstrip().startswith("# loralens LoRA adapter for GLUE rte\n")
    assert "- accuracy: 0.625" in card.text and "format_input" in card.text
    assert "Q4_1" in card.text and "not the hub's" in card.text
    assert read_record(out)["max_length"] == 384
    assert read_record(out)["label_names"] == ["entailment", "not_entailment"]


def test_full_checkpoint_on_a_hub_base_records_the_hub_id_with_its_revision(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    write_card(out, {**RTE, "method": "full", "adapter": False, "base": "org/some-model",
                     "base_revision": "0123abcd"})
    d = ModelCard.load(out / "README.md").data
    assert (d.library_name, d.base_model, d.pipeline_tag) == (
        "transformers", "org/some-model", "text-classification")
    assert d.to_dict()["base_model_relation"] == "finetune"
    assert d.to_dict()["loralens"]["base"] == {
        "name": "org/some-model", "path": None, "hub_id": "org/some-model",
        "revision": "0123abcd", "quantization": None}


def test_a_local_base_has_no_hub_id_and_loralens_own_layout_claims_no_pipeline(tmp_path):
    base_dir = tmp_path / "my-base"
    base_dir.mkdir()
    out = _adapter_dir(tmp_path, str(base_dir))
    write_card(out, {**RTE, "base": str(base_dir), "adapter": True,
                     "own_layout": {"family": "encoder", "pooling": "cls",
                                    "inputs": "pairs as the tokenizer joins them"}})
    d = ModelCard.load(out / "README.md").data
    assert d.base_model is None and d.pipeline_tag is None and d.library_name is None
    assert d.to_dict()["loralens"]["base"]["hub_id"] is None


def test_scores_without_a_hub_metric_give_no_model_index(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    write_card(out, {"task": "mytask", "method": "full", "scores": {"loss": 0.3}})
    d = ModelCard.load(out / "README.md").data
    assert d.eval_results is None and d.metrics is None and d.datasets is None


def test_a_card_without_metadata_has_an_empty_record(tmp_path):
    (tmp_path / "README.md").write_text("# loralens LoRA adapter\n\n- method: lora\n")
    assert read_record(tmp_path) == {}
    assert read_record(tmp_path / "missing") == {}
