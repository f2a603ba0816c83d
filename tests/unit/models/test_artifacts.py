"""Artifacts load with plain transformers/PEFT calls and give loralens's own logits (tiny
random model): LoRA adapters, full checkpoints, merged adapters; the old layouts still load
in loralens; the head reads the same token as transformers'; the exported preprocessing
tokenizes as training did."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from loralens.training import batches as B
from loralens.models.artifacts import ArtifactError, load_adapter, merged, write_full
from loralens.core.config import StudyConfig
from loralens.training.loop import evaluate
from loralens.models.classifier import apply_method, build_classifier
from loralens.models.saving import load_trained, save_trained
from loralens.tasks.preprocess import format_input

EOS = 2
LABELS = ("entailment", "not_entailment")
# singles and pairs, raw (with the surrounding spaces GLUE files have); lengths differ so
# batches are right-padded
EXAMPLES = [(" a nice film ",), ("bad",), ("the cat sat ", " on the mat"), ("x", "y z w v u")]


def _randomize(model, seed: int = 1, scale: float = 0.05):
    """Move every trainable parameter off its initialisation (LoRA B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _trained(tiny_base, method: str):
    model = apply_method(build_classifier(tiny_base.backbone(), 2, 3), method, StudyConfig())
    return _randomize(model)


def _encoded(tokenizer) -> B.Encoded:
    ids = [B.encode_texts(tokenizer, [t.strip() for t in ex], 64) for ex in EXAMPLES]
    return B.Encoded(ids, np.zeros(len(ids), dtype=np.int64), np.arange(len(ids)))


def _ours(model, tokenizer) -> np.ndarray:
    return evaluate(model, _encoded(tokenizer), EOS, batch_size=4)["logits"]


def _theirs(model, tokenizer) -> np.ndarray:
    """Logits of a plain transformers/PEFT model on the documented input form, as one
    right-padded batch (the tokenizer saved with the artifact pads)."""
    texts = [format_input(*ex, sep=tokenizer.eos_token) for ex in EXAMPLES]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.float().numpy()


def _no_peft_warnings(record) -> None:
    bad = [str(w.message)[:200] for w in record if "peft" in w.filename]
    assert bad == []


def test_lora_adapter_is_peft_standard_and_loads_with_plain_peft(tiny_base, tmp_path):
    from peft import AutoPeftModelForSequenceClassification, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = _trained(tiny_base, "lora")
    want = _ours(model, tiny_base.tokenizer)
    out = save_trained(model, "lora", tmp_path / "adapter", tiny_base.tokenizer, LABELS)

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]
    assert cfg["base_model_name_or_path"] == tiny_base.resolved.path
    assert cfg.get("auto_mapping") is None
    keys = sorted(load_file(str(out / "adapter_model.safetensors")))
    assert "base_model.model.score.weight" in keys
    assert all(k.startswith(("base_model.model.model.layers.", "base_model.model.score."))
               for k in keys), keys

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.pad_token == tok.eos_token == "</s>"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        base = AutoModelForSequenceClassification.from_pretrained(cfg["base_model_name_or_path"],
                                                                  num_labels=2)
        base.config.pad_token_id = tok.pad_token_id
        pm = PeftModel.from_pretrained(base, str(out)).eval()
        auto = AutoPeftModelForSequenceClassification.from_pretrained(str(out)).eval()
    _no_peft_warnings(record)
    np.testing.assert_allclose(_theirs(pm, tok), want, atol=1e-5, rtol=0)
    auto.config.pad_token_id = tok.pad_token_id
    np.testing.assert_allclose(_theirs(auto, tok), want, atol=1e-5, rtol=0)
    # and loralens reads it back
    again = load_trained(tmp_path, tiny_base.backbone(), 2)
    np.testing.assert_allclose(_ours(again, tiny_base.tokenizer), want, atol=1e-6, rtol=0)
    card = (out / "README.md").read_text()
    assert "format_input" in card and "`</s>`" in card and tiny_base.resolved.path in card


@pytest.mark.parametrize("kind", ["full", "merged"])
def test_full_and_merged_checkpoints_load_with_plain_transformers(tiny_base, tmp_path, kind):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = _trained(tiny_base, "full" if kind == "full" else "lora")
    want = _ours(model, tiny_base.tokenizer)
    plain = model if kind == "full" else merged(model)
    out = save_trained(plain, "full", tmp_path / "model", tiny_base.tokenizer, LABELS)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert cfg["id2label"] == {"0": "entailment", "1": "not_entailment"}
    assert cfg["label2id"] == {"entailment": 0, "not_entailment": 1}
    assert cfg["pad_token_id"] == EOS
    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert hf.config.num_labels == 2
    np.testing.assert_allclose(_theirs(hf, AutoTokenizer.from_pretrained(str(out))), want,
                               atol=1e-5, rtol=0)
    again = load_trained(tmp_path, tiny_base.backbone(), 2)
    np.testing.assert_allclose(_ours(again, tiny_base.tokenizer), want, atol=1e-5, rtol=0)


def test_pipeline_answers_a_pair_through_the_documented_input(tiny_base, tmp_path):
    from transformers import pipeline

    model = _trained(tiny_base, "full")
    logits = _ours(model, tiny_base.tokenizer)
    out = tmp_path / "model"
    out.mkdir()
    write_full(model, out, tiny_base.tokenizer, LABELS)
    classify = pipeline("text-classification", model=str(out), device="cpu")
    for i in (2, 3):  # the pairs
        got = classify(format_input(*EXAMPLES[i], sep="</s>"))[0]
        p = torch.softmax(torch.from_numpy(logits[i]), -1)
        assert got["label"] == LABELS[int(p.argmax())]
        assert got["score"] == pytest.approx(float(p.max()), abs=1e-5)


def _old_layout_adapter(new, old):
    """What loralens wrote before: keys under ``backbone.``, task_type null, an
    auto_mapping to loralens's class, no base recorded."""
    old.mkdir(parents=True)
    state = load_file(str(new / "adapter_model.safetensors"))
    save_file({k.replace("base_model.model.model.", "base_model.model.backbone."): v
               for k, v in state.items()}, str(old / "adapter_model.safetensors"))
    cfg = json.loads((new / "adapter_config.json").read_text())
    cfg.update(task_type=None, base_model_name_or_path=None, auto_mapping={
        "base_model_class": "CausalLMClassifier", "parent_library": "loralens.models"})
    (old / "adapter_config.json").write_text(json.dumps(cfg))


def test_old_layouts_still_load_in_loralens(tiny_base, tmp_path):
    lora, full = _trained(tiny_base, "lora"), _trained(tiny_base, "full")
    want_lora, want_full = _ours(lora, tiny_base.tokenizer), _ours(full, tiny_base.tokenizer)
    save_trained(lora, "lora", tmp_path / "new" / "adapter")
    _old_layout_adapter(tmp_path / "new" / "adapter", tmp_path / "old" / "adapter")
    got = load_trained(tmp_path / "old", tiny_base.backbone(), 2)
    np.testing.assert_array_equal(_ours(got, tiny_base.tokenizer), want_lora)
    # old full layout: the classifier's state dict under backbone.*, plus classifier.json
    job = tmp_path / "oldfull" / "model"
    job.mkdir(parents=True)
    save_file({k.replace("model.", "backbone.", 1) if k.startswith("model.") else k:
               v.contiguous() for k, v in full.state_dict().items()},
              str(job / "model.safetensors"))
    (job / "classifier.json").write_text(json.dumps({"num_labels": 2}))
    got = load_trained(job.parent, tiny_base.backbone(), 2)
    np.testing.assert_array_equal(_ours(got, tiny_base.tokenizer), want_full)


def test_an_adapter_that_does_not_fit_is_an_error_not_a_warning(tiny_base, tmp_path):
    from loralens.models.classifier import CausalLMClassifier

    save_trained(_trained(tiny_base, "lora"), "lora", tmp_path / "adapter")
    st = tmp_path / "adapter" / "adapter_model.safetensors"
    state = load_file(str(st))
    save_file({k.replace("model.layers.", "model.blocks."): v for k, v in state.items()}, str(st))
    with pytest.raises(ArtifactError, match="adapter does not fit the model: missing"):
        load_adapter(CausalLMClassifier(tiny_base.backbone(), 2), tmp_path / "adapter")


@pytest.mark.parametrize("texts", [[("ab",), ("abcdef",)], [("ab", "c"), ("abcd", "efg h")],
                                   [("ab", "cdefgh")], [("ab",)]])
def test_our_head_and_transformers_head_read_the_same_token(tiny_base, texts):
    """Single texts and pairs (the separator is the pad id), padded and unpadded batches."""
    from transformers import LlamaForSequenceClassification

    ours = build_classifier(tiny_base.backbone(), 2, 5).eval()
    hf = LlamaForSequenceClassification(ours.config).eval()
    hf.load_state_dict(ours.state_dict())  # identical parameter names
    hf.config.pad_token_id = EOS
    ids, mask = B.collate([B.encode_texts(tiny_base.tokenizer, t, 64) for t in texts], EOS)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    if len(texts) > 1:
        assert mask.sum(1).unique().numel() > 1  # really padded


def test_where_the_heads_differ_an_input_ending_in_the_pad_token(tiny_base):
    """transformers takes the rightmost non-pad id: when a real EOS ends the input it reads
    the token before it; loralens (the mask) reads the EOS. The README says so."""
    from transformers import LlamaForSequenceClassification

    ours = build_classifier(tiny_base.backbone(), 2, 5).eval()
    hf = LlamaForSequenceClassification(ours.config).eval()
    hf.load_state_dict(ours.state_dict())
    hf.config.pad_token_id = EOS
    ids = torch.tensor([[1, 3 + ord("a"), 3 + ord("b"), EOS]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        h = ours.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   ours.score(h[:, 3]))
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits,
                                   ours.score(h[:, 2]))


def test_format_input_tokenizes_as_training_did(tiny_tokenizer):
    # byte b is id 3 + b, BOS 1, EOS 2: the ids are known by hand
    s = tiny_tokenizer(format_input(" ab ", "c ", sep=tiny_tokenizer.eos_token))["input_ids"]
    assert s == [1, 3 + ord("a"), 3 + ord("b"), EOS, 3 + ord("c")]
    assert tiny_tokenizer(format_input(" ab\t", sep="</s>"))["input_ids"] == [1, 100, 101]
    for ex in EXAMPLES:
        assert (tiny_tokenizer(format_input(*ex, sep="</s>"))["input_ids"]
                == B.encode_texts(tiny_tokenizer, [t.strip() for t in ex], 64))
    with pytest.raises(ValueError, match="needs sep=tokenizer.eos_token"):
        format_input("a", "b", sep="")
