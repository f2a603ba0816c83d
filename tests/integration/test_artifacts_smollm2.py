"""Integration: SmolLM2 artifacts loaded with plain transformers/PEFT calls, on real GLUE rows
fed through the documented preprocessing, match loralens's own logits within 1e-5."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from loralens.tasks import sources as TS
from loralens.training import batches as B
from loralens.models.artifacts import merged
from loralens.core.config import StudyConfig
from loralens.training.loop import evaluate
from loralens.models.classifier import apply_method, build_classifier
from loralens.models.saving import save_trained
from loralens.tasks.preprocess import format_fields
from loralens.tasks.registry import get_task

TOL = 1e-5


@pytest.fixture(scope="module")
def rows(glue_dir):
    """Four raw SST-2 and four raw RTE dev rows (stripped by the loader, so re-add the
    trailing space SST-2's files have, as a user's raw text would)."""
    sst2 = TS.load_split(get_task("sst2"), "validation", glue_dir).examples[:4]
    rte = TS.load_split(get_task("rte"), "validation", glue_dir).examples[:4]
    return [(e.texts[0] + " ",) for e in sst2] + [e.texts for e in rte]


@pytest.fixture(scope="module")
def lora(smollm2):
    """A LoRA classifier with realistic non-zero factors (no training needed: the artifact
    path does not care how the numbers came about)."""
    model = apply_method(build_classifier(smollm2.backbone(), 2, 7), "lora", StudyConfig())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def _ours(model, tokenizer, rows) -> np.ndarray:
    ids = [B.encode_texts(tokenizer, [t.strip() for t in r], 384) for r in rows]
    enc = B.Encoded(ids, np.zeros(len(ids), dtype=np.int64), np.arange(len(ids)))
    return evaluate(model, enc, tokenizer.pad_token_id, batch_size=8)["logits"]


def _theirs(model, tokenizer, rows) -> np.ndarray:
    batch = tokenizer([format_fields(r, tokenizer.eos_token) for r in rows], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.float().numpy()


def test_smollm2_adapter_loads_with_plain_peft(smollm2, lora, rows, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    want = _ours(lora, smollm2.tokenizer, rows)
    out = save_trained(lora, "lora", tmp_path / "adapter", smollm2.tokenizer,
                       get_task("rte").label_names)
    base_dir = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_dir == smollm2.resolved.path
    tok = AutoTokenizer.from_pretrained(str(out))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
        pm = PeftModel.from_pretrained(base, str(out)).eval()
    assert [str(w.message)[:200] for w in record if "peft" in w.filename] == []
    base.config.pad_token_id = tok.pad_token_id
    got = _theirs(pm, tok, rows)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # the raw text (unstripped, pairs through the tokenizer's own pair template) does differ
    raw = tok([r[0] for r in rows[:4]], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert np.abs(pm(**raw).logits.numpy() - want[:4]).max() > 1e-3


def test_smollm2_merged_checkpoint_in_a_pipeline(smollm2, lora, rows, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    want = _ours(lora, smollm2.tokenizer, rows)
    names = get_task("rte").label_names
    out = save_trained(merged(lora), "full", tmp_path / "model", smollm2.tokenizer, names)
    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    np.testing.assert_allclose(_theirs(hf, tok, rows), want, atol=TOL, rtol=0)
    classify = pipeline("text-classification", model=hf, tokenizer=tok, device="cpu")
    for r, logits in zip(rows[4:], want[4:]):  # the RTE pairs, one at a time
        p = torch.softmax(torch.from_numpy(logits), -1)
        got = classify(format_fields(r, tok.eos_token))[0]
        assert got["label"] == names[int(p.argmax())]
        assert got["score"] == pytest.approx(float(p.max()), abs=TOL)
