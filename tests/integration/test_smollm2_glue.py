"""Integration: the embedded SmolLM2 and real GLUE rows from ../shared/glue."""

import subprocess
import sys

import pytest
import torch

from loralens.tasks import sources as TS
from loralens.training import batches as B
from loralens.models.registry import ModelNotFound, resolve_model
from loralens.models.classifier import build_classifier
from loralens.models.families import masked_mean
from loralens.tasks.registry import get_task


@pytest.mark.parametrize("task, split, rows, counts", [
    ("sst2", "train", 67349, None),
    ("sst2", "validation", 872, {0: 428, 1: 444}),
    ("mrpc", "train", 3668, None),
    ("mrpc", "validation", 408, {0: 129, 1: 279}),
    ("rte", "train", 2490, None),
    ("rte", "validation", 277, {0: 146, 1: 131}),
])
def test_glue_row_counts(glue_dir, task, split, rows, counts):
    s = TS.load_split(get_task(task), split, glue_dir)
    assert len(s) == rows
    if counts:
        assert s.label_counts == counts


@pytest.fixture(scope="module")
def base_model(smollm2):
    torch.manual_seed(0)
    return build_classifier(smollm2.backbone(), 2, seed=0).eval()


@pytest.mark.parametrize("task", ["sst2", "mrpc", "rte"])
def test_dynamic_padding_equals_padding_to_384(glue_dir, tokenizer, base_model, task):
    """Logits and the masked mean of every layer match padding to 384.

    Logits: max abs difference <= 1e-5. Pooled hidden states: <= 1e-5, or one part in
    a million of the layer's largest magnitude where that is coarser. SmolLM2 has massive
    activations (pooled values near 3000 in layers 12-28, where one float32 ulp is
    2.4e-4); the two paddings run GEMMs of different shapes, whose kernels round
    differently, so a 1e-5 absolute bound is below float32 resolution there.
    """
    spec = get_task(task)
    split = TS.load_split(spec, "validation", glue_dir)
    split.examples = split.examples[:4]
    enc = B.encode_split(tokenizer, split, 384)
    if spec.is_pair:
        assert all(tokenizer.eos_token_id in x for x in enc.input_ids)
    dyn = B.collate(enc.input_ids, tokenizer.pad_token_id)
    pad = B.collate(enc.input_ids, tokenizer.pad_token_id, pad_to=384)
    assert dyn[0].shape[1] < 384
    with torch.no_grad():
        a = base_model(input_ids=dyn[0], attention_mask=dyn[1], output_hidden_states=True)
        b = base_model(input_ids=pad[0], attention_mask=pad[1], output_hidden_states=True)
    assert (a.logits - b.logits).abs().max().item() <= 1e-5
    assert len(a.hidden_states) == 31  # embeddings + 30 layers
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        pa, pb = masked_mean(ha, dyn[1]), masked_mean(hb, pad[1])
        scale = pa.abs().max().item()
        assert (pa - pb).abs().max().item() <= max(1e-5, 1e-6 * scale)


def test_head_reads_last_token_of_sentence2_on_real_pairs(glue_dir, tokenizer, base_model):
    split = TS.load_split(get_task("rte"), "validation", glue_dir)
    enc = B.encode_split(tokenizer, split, 384)
    rows = enc.input_ids[:3]
    ids, mask = B.collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        out = base_model(input_ids=ids, attention_mask=mask)
        h = base_model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    for i, r in enumerate(rows):
        sep = r.index(tokenizer.eos_token_id)
        assert r[-1] != tokenizer.eos_token_id  # sentence 2 ends the input
        torch.testing.assert_close(out.logits[i], base_model.score(h[i, len(r) - 1]),
                                   atol=1e-5, rtol=0)
        assert not torch.allclose(out.logits[i], base_model.score(h[i, sep]), atol=1e-3)


def test_unknown_model_lists_registry():
    with pytest.raises(ModelNotFound, match=r"'no-such-model'.*registry names: smollm2-135m, tinyllama-1.1b"):
        resolve_model("no-such-model")


def test_concurrent_conversion_is_safe(tmp_path):
    """Two processes converting the packaged GGUF into an empty cache at once."""
    code = ("import sys; from loralens.models.registry import resolve_model; "
            "print(resolve_model('smollm2-135m').path)")
    env = {"LORALENS_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    models = list((tmp_path / "models").iterdir())
    assert [m.name for m in models if not m.name.endswith(".lock")] == [paths.pop().split("/")[-1]]
