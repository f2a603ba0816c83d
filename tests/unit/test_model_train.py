"""Classifier, methods and the training loop on tiny random Llama models; the registry's
tiny-random model itself."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from loralens import data as D
from loralens.config import StudyConfig
from loralens.models import (CausalLMClassifier, apply_method, build_classifier,
                             last_token_index, load_trained, masked_mean, save_trained)
from loralens.train import evaluate, fit

EOS = 2


def tiny_encoded(n=24, seed=0, lo=3, hi=20):
    rng = np.random.default_rng(seed)
    ids = [list(rng.integers(10, 4000, size=rng.integers(lo, hi))) for _ in range(n)]
    labels = np.array([int(sum(x) % 2) for x in ids])
    return D.Encoded([[int(t) for t in x] for x in ids], labels, np.arange(n))


def test_last_token_index_from_mask():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 0]


def test_head_reads_end_of_sentence2_not_separator(tiny_backbone):
    """pad == EOS == separator: the head must read sentence 2's last token."""
    model = build_classifier(tiny_backbone, 2, seed=0).eval()
    s1, s2 = [101, 102, 103], [201, 202, 203, 204]
    ids, mask = D.collate([s1 + [EOS] + s2, [300, 301]], pad_id=EOS)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        h = tiny_backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    end_of_s2 = len(s1) + len(s2)          # position of token 204
    sep = len(s1)                          # position of the separator (EOS)
    torch.testing.assert_close(out.logits[0], model.score(h[0, end_of_s2]), rtol=0, atol=1e-6)
    assert not torch.allclose(out.logits[0], model.score(h[0, sep]), atol=1e-4)
    # The old transformers rule "token before the first pad id" reads sentence 1.
    first_pad = int((ids[0] == EOS).nonzero()[0])
    assert first_pad - 1 == sep - 1 != end_of_s2
    # Changing the last token of sentence 2 changes the prediction input.
    ids2 = ids.clone()
    ids2[0, end_of_s2] = 205
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids2, attention_mask=mask).logits[0],
                                  out.logits[0], atol=1e-6)


def test_padding_to_384_changes_nothing(tiny_backbone):
    model = build_classifier(tiny_backbone, 2, seed=0).eval()
    enc = tiny_encoded(6)
    dyn = D.collate(enc.input_ids, EOS)
    full = D.collate(enc.input_ids, EOS, pad_to=384)
    with torch.no_grad():
        a = model(input_ids=dyn[0], attention_mask=dyn[1], output_hidden_states=True)
        b = model(input_ids=full[0], attention_mask=full[1], output_hidden_states=True)
    assert (a.logits - b.logits).abs().max() <= 1e-5
    assert len(a.hidden_states) == 3  # embeddings + 2 layers
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        assert (masked_mean(ha, dyn[1]) - masked_mean(hb, full[1])).abs().max() <= 1e-5


def test_masked_mean_ignores_pads():
    h = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(h, torch.tensor([[1, 1, 0]])).item() == 2.0


def _train(model, enc, **tc_kw):
    tc = replace(StudyConfig().train, epochs=1, batch_size=8, warmup_ratio=0.0, **tc_kw)
    return fit(model, enc, None, EOS, tc, lr=1e-2, seed=0, progress=False)


def test_lora_changes_only_adapter_and_head(tiny_backbone):
    cfg = StudyConfig()
    model = apply_method(build_classifier(tiny_backbone, 2, seed=0), "lora", cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or ("score" in n) for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and any("v_proj.lora_B" in n for n in trainable)
    assert not any("k_proj.lora" in n or "o_proj.lora" in n for n in trainable)
    _train(model, tiny_encoded())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed) and any("score" in n for n in changed)


def test_full_trains_every_parameter(tiny_backbone):
    model = apply_method(build_classifier(tiny_backbone, 2, seed=0), "full", StudyConfig())
    assert all(p.requires_grad for p in model.parameters())


def test_merged_equals_unmerged_and_roundtrip(tiny_backbone, tmp_path):
    from transformers import AutoModel

    from loralens.models import tiny_llama_config

    cfg = StudyConfig()
    model = apply_method(build_classifier(tiny_backbone, 2, seed=0), "lora", cfg)
    _train(model, tiny_encoded(), max_steps=2)
    model.eval()
    enc = tiny_encoded(10, seed=5)
    unmerged = evaluate(model, enc, EOS)["logits"]
    save_trained(model, "lora", tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    torch.manual_seed(0)
    fresh = AutoModel.from_config(tiny_llama_config(), dtype=torch.float32)
    reloaded = load_trained(tmp_path, fresh, 2)
    np.testing.assert_allclose(evaluate(reloaded, enc, EOS)["logits"], unmerged, atol=1e-6)
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, CausalLMClassifier)
    np.testing.assert_allclose(evaluate(merged, enc, EOS)["logits"], unmerged, atol=1e-5)


def test_full_save_load_roundtrip(tiny_backbone, tmp_path):
    from transformers import AutoModel

    from loralens.models import tiny_llama_config

    model = apply_method(build_classifier(tiny_backbone, 2, seed=0), "full", StudyConfig())
    _train(model, tiny_encoded(), max_steps=1)
    enc = tiny_encoded(8, seed=3)
    want = evaluate(model, enc, EOS)["logits"]
    save_trained(model, "full", tmp_path / "model")
    fresh = AutoModel.from_config(tiny_llama_config(), dtype=torch.float32)
    got = evaluate(load_trained(tmp_path, fresh, 2), enc, EOS)["logits"]
    np.testing.assert_allclose(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_same_seed_same_result(method):
    from transformers import AutoModel

    from loralens.models import tiny_llama_config

    def once():
        torch.manual_seed(0)
        bb = AutoModel.from_config(tiny_llama_config(), dtype=torch.float32)
        torch.manual_seed(7)
        m = apply_method(build_classifier(bb, 2, seed=7), method, StudyConfig())
        res = _train(m, tiny_encoded(), max_steps=3)
        return res.final_train_loss, evaluate(m, tiny_encoded(8, seed=9), EOS)["logits"]

    (la, a), (lb, b) = once(), once()
    assert la == lb
    np.testing.assert_array_equal(a, b)


def test_grad_accumulation_equals_big_batch():
    from transformers import AutoModel

    from loralens.models import tiny_llama_config

    def step(batch, accum):
        torch.manual_seed(0)
        bb = AutoModel.from_config(tiny_llama_config(), dtype=torch.float32)
        m = apply_method(build_classifier(bb, 2, seed=1), "full", StudyConfig())
        tc = replace(StudyConfig().train, epochs=1, batch_size=batch, grad_accum=accum,
                     warmup_ratio=0.0, max_steps=1, max_grad_norm=0.0)
        fit(m, tiny_encoded(16), None, EOS, tc, lr=1e-3, seed=0, group_by_length=False,
            progress=False)
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    big, small = step(8, 1), step(4, 2)
    assert (big - small).abs().max() < 1e-6


def test_early_stopping_restores_best(tiny_backbone):
    model = apply_method(build_classifier(tiny_backbone, 2, seed=0), "full", StudyConfig())
    train, val = tiny_encoded(48), tiny_encoded(16, seed=1)
    tc = replace(StudyConfig().train, epochs=20, batch_size=4, warmup_ratio=0.0, eval_every=1,
                 patience=2, max_grad_norm=0.0)
    res = fit(model, train, val, EOS, tc, lr=0.05, seed=0, progress=False)
    losses = [h["val_loss"] for h in res.history]
    assert res.stopped_early and res.steps < 20 * 12
    assert res.best_val_loss == min(losses)
    # two evaluations without improvement, then stop
    assert losses.index(min(losses)) == len(losses) - 3
    assert evaluate(model, val, EOS)["loss"] == pytest.approx(min(losses), abs=1e-6)


# --------------------------------------------------------------------------- tiny-random

def test_tiny_random_is_built_once_and_the_same_everywhere(tmp_path, monkeypatch):
    from pathlib import Path

    from loralens.models import resolve_model

    monkeypatch.setenv("LORALENS_CACHE", str(tmp_path / "a"))
    r = resolve_model("tiny-random")
    path = Path(r.path)
    assert path.parent == tmp_path / "a" / "models" and path.name.startswith("tiny-random-")
    assert "tiny random" in r.note and "meaningless" in r.note
    # Written atomically: the model directory and its lock, no temporary directory left.
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]
    files = {p.name: p.read_bytes() for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    # Built once: a second resolve reuses the directory.
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("tiny-random") == r
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    # Deterministic: built in another cache (another machine), the same name and bytes.
    monkeypatch.setenv("LORALENS_CACHE", str(tmp_path / "b"))
    other = Path(resolve_model("tiny-random").path)
    assert other.name == path.name
    assert {p.name: p.read_bytes() for p in other.iterdir()} == files


def test_tiny_random_model_and_tokenizer(tiny_base):
    assert tiny_base.name == "tiny-random" and "meaningless" in tiny_base.note
    tok = tiny_base.tokenizer
    assert len(tok) == 259
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    # Byte-level, no merges: a BOS, then byte b of the UTF-8 text as id 3 + b.
    text = "Ünïcode café,\t tabs  and spaces"
    ids = tok(text)["input_ids"]
    assert ids == [1] + [3 + b for b in text.encode("utf-8")]
    assert tok.decode(ids, skip_special_tokens=True) == text
    bb, again = tiny_base.backbone(), tiny_base.backbone()
    c = bb.config
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size, c.model_type) == (32, 2, 259,
                                                                                "llama")
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)
    # Every call loads the same weights, as a fresh copy (training modifies weights).
    pairs = list(zip(bb.named_parameters(), again.named_parameters()))
    assert all(n == m and torch.equal(p, q) and p.data_ptr() != q.data_ptr()
               for (n, p), (m, q) in pairs)
    # Norms 1; matrices N(0, initializer_range = 0.02).
    for n, p in bb.named_parameters():
        if n.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), n
    emb = bb.embed_tokens.weight
    assert emb.shape == (259, 32)
    assert emb.std().item() == pytest.approx(0.02, rel=0.05)
    assert abs(emb.mean().item()) < 1e-3
