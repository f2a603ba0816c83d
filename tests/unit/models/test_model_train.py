"""Classifier, methods and the training loop on tiny random Llama models; the registry's
tiny-random model itself."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from loralens.training import batches as B
from loralens.core.config import StudyConfig
from loralens.models.classifier import CausalLMClassifier, apply_method, build_classifier
from loralens.models.families import last_token_index, masked_mean
from loralens.models.saving import load_trained, save_trained
from loralens.training.loop import evaluate, fit

from tests.helpers.training import EOS, fit_tiny, tiny_encoded

def test_last_token_index_from_mask():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 0]


def test_head_reads_end_of_sentence2_not_separator(tiny_backbone):
    """pad == EOS == separator, right padding: the head must read the last real token.

    The expected logits of each row are computed independently of the classifier's
    pooling: the backbone runs on the row ALONE (batch of one, no padding, mask of ones)
    and the head reads that run's final position. The batch holds a pair that is
    right-padded with EOS behind a longer row, and a pair that ends in a real EOS (the
    case where "rightmost non-pad id" breaks)."""
    model = build_classifier(tiny_backbone, 2, seed=0).eval()
    s1, s2 = [101, 102, 103], [201, 202, 203, 204]
    pair = s1 + [EOS] + s2                     # padded with EOS below
    longer = [300 + i for i in range(11)]      # forces the padding of the other rows
    ends_in_eos = s1 + [EOS] + s2[:2] + [EOS]  # a real EOS is the last real token
    rows = [pair, longer, ends_in_eos]
    ids, mask = B.collate(rows, pad_id=EOS)
    assert ids[0, len(pair):].tolist() == [EOS] * (len(longer) - len(pair))
    assert mask[0].tolist() == [1] * len(pair) + [0] * (len(longer) - len(pair))

    def alone(row):  # the head on the last position of the row run by itself
        with torch.no_grad():
            t = torch.tensor([row])
            h = model.backbone(input_ids=t, attention_mask=torch.ones_like(t)).last_hidden_state
            return model.score(h[0, -1]).float()

    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    for i, row in enumerate(rows):
        torch.testing.assert_close(logits[i], alone(row), rtol=0, atol=1e-5)
    # The readings the design warns about give other values, far beyond that tolerance:
    # the old "token before the first pad id" reads sentence 1's end ...
    first_pad = int((ids[0] == EOS).nonzero()[0])
    assert ids[0, first_pad - 1] == s1[-1]
    assert (logits[0] - alone(pair[:first_pad])).abs().max() > 1e-3
    # ... the separator itself (the first EOS) is not the end either ...
    assert (logits[0] - alone(pair[:len(s1) + 1])).abs().max() > 1e-3
    # ... and "rightmost non-pad id" skips a real closing EOS.
    assert (logits[2] - alone(ends_in_eos[:-1])).abs().max() > 1e-3


def test_padding_to_384_changes_nothing(tiny_backbone):
    model = build_classifier(tiny_backbone, 2, seed=0).eval()
    enc = tiny_encoded(6)
    dyn = B.collate(enc.input_ids, EOS)
    full = B.collate(enc.input_ids, EOS, pad_to=384)
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


def test_lora_changes_only_adapter_and_head(tiny_backbone):
    cfg = StudyConfig()
    model = apply_method(build_classifier(tiny_backbone, 2, seed=0), "lora", cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or ("score" in n) for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and any("v_proj.lora_B" in n for n in trainable)
    assert not any("k_proj.lora" in n or "o_proj.lora" in n for n in trainable)
    fit_tiny(model, tiny_encoded())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed) and any("score" in n for n in changed)


def test_full_trains_every_parameter(tiny_backbone):
    model = apply_method(build_classifier(tiny_backbone, 2, seed=0), "full", StudyConfig())
    assert all(p.requires_grad for p in model.parameters())


def test_merged_equals_unmerged_and_roundtrip(tiny_backbone, tmp_path):
    from transformers import AutoModel

    from loralens.models.tiny import tiny_llama_config

    cfg = StudyConfig()
    model = apply_method(build_classifier(tiny_backbone, 2, seed=0), "lora", cfg)
    fit_tiny(model, tiny_encoded(), max_steps=2)
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

    from loralens.models.tiny import tiny_llama_config

    model = apply_method(build_classifier(tiny_backbone, 2, seed=0), "full", StudyConfig())
    fit_tiny(model, tiny_encoded(), max_steps=1)
    enc = tiny_encoded(8, seed=3)
    want = evaluate(model, enc, EOS)["logits"]
    save_trained(model, "full", tmp_path / "model")
    fresh = AutoModel.from_config(tiny_llama_config(), dtype=torch.float32)
    got = evaluate(load_trained(tmp_path, fresh, 2), enc, EOS)["logits"]
    np.testing.assert_allclose(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_same_seed_same_result(method):
    from transformers import AutoModel

    from loralens.models.tiny import tiny_llama_config

    def once():
        torch.manual_seed(0)
        bb = AutoModel.from_config(tiny_llama_config(), dtype=torch.float32)
        torch.manual_seed(7)
        m = apply_method(build_classifier(bb, 2, seed=7), method, StudyConfig())
        res = fit_tiny(m, tiny_encoded(), max_steps=3)
        return res.final_train_loss, evaluate(m, tiny_encoded(8, seed=9), EOS)["logits"]

    (la, a), (lb, b) = once(), once()
    assert la == lb
    np.testing.assert_array_equal(a, b)


def test_grad_accumulation_equals_big_batch(monkeypatch):
    """One step over 8 rows = one step over 2 accumulated micro-batches of 4. Plain SGD
    (make_optimizer patched) keeps the update linear in the gradient: Adam's first step,
    about lr * sign(g), would amplify summation-order noise where g is near 0 (a float32
    difference of 1.4e-6 on this CPU) and hide a wrong scale."""
    from transformers import AutoModel

    import loralens.training.step
    from loralens.models.tiny import tiny_llama_config

    monkeypatch.setattr(loralens.training.step, "make_optimizer",
                        lambda groups, lr, *a, **k: (torch.optim.SGD(groups, lr=lr), ""))

    def step(batch, accum):
        torch.manual_seed(0)
        bb = AutoModel.from_config(tiny_llama_config(), dtype=torch.float32)
        m = apply_method(build_classifier(bb, 2, seed=1), "full", StudyConfig())
        tc = replace(StudyConfig().train, precision="fp32", epochs=1, batch_size=batch,
                     grad_accum=accum, warmup_ratio=0.0, max_steps=1, max_grad_norm=0.0)
        fit(m, tiny_encoded(16), None, EOS, tc, lr=1e-3, seed=0, group_by_length=False,
            progress=False)
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    torch.manual_seed(0)
    start = torch.cat([p.detach().flatten() for p in apply_method(build_classifier(
        AutoModel.from_config(tiny_llama_config(), dtype=torch.float32), 2, seed=1), "full",
        StudyConfig()).parameters()])
    big, small = step(8, 1) - start, step(4, 2) - start  # the updates
    assert big.abs().max() > 1e-4  # the step moved the model
    # a wrong weight (e.g. the 2 micro-batches' losses summed, not averaged) is a 2x update
    assert (big - small).abs().max() < 1e-4 * big.abs().max()


def test_grad_accumulation_partial_last_window(monkeypatch):
    """5 micro-batches, grad_accum 2: windows of 2, 2 and 1 micro-batches (8, 8 and 2
    rows). Each optimizer step must descend the window's mean loss: the sum of its rows'
    losses divided by ITS row count (2 in the last window, not 8 nor 2 x 4).

    The reference is computed by hand, independently of fit's weighting and batching:
    every row runs alone (no padding), the window's loss is summed and divided by its
    rows, and plain SGD takes the step with the cosine schedule's factors written out
    (no warm-up, 3 steps: 0.5 * (1 + cos(pi * k / 3)) = 1, 0.75, 0.25). fit gets the same
    SGD (make_optimizer patched) so that the update is linear in the gradient: a wrong
    weight of any window shows in the parameters at full size (Adam's first steps would
    hide a scale).
    """
    import copy
    import math

    from transformers import AutoModel

    import loralens.training.step
    from loralens.models.tiny import tiny_llama_config

    lr, enc = 0.5, tiny_encoded(18, seed=3)  # 18 rows, batch 4: 4 + 4 + 4 + 4 + 2
    torch.manual_seed(0)
    bb = AutoModel.from_config(tiny_llama_config(), dtype=torch.float32)
    model = apply_method(build_classifier(bb, 2, seed=1), "full", StudyConfig())
    ref = copy.deepcopy(model)

    monkeypatch.setattr(loralens.training.step, "make_optimizer",  # where the step looks it up
                        lambda groups, lr, *a, **k: (torch.optim.SGD(groups, lr=lr), ""))
    seen = []  # the micro-batches fit draws (which rows; the weighting is fit's to get right)
    real_batches = B.train_batches
    monkeypatch.setattr(B, "train_batches",
                        lambda *a, **k: seen.append(real_batches(*a, **k)) or seen[-1])
    tc = replace(StudyConfig().train, precision="fp32", epochs=1, batch_size=4, grad_accum=2, warmup_ratio=0.0,
                 max_grad_norm=0.0, weight_decay=0.0)
    res = fit(model, enc, None, EOS, tc, lr=lr, seed=0, group_by_length=False, progress=False)
    (batches,) = seen
    assert [len(b) for b in batches] == [4, 4, 4, 4, 2] and res.steps == 3
    windows = [np.concatenate(batches[0:2]), np.concatenate(batches[2:4]), batches[4]]
    assert sorted(np.concatenate(windows).tolist()) == list(range(18))

    def row_loss(m, r):
        t = torch.tensor([enc.input_ids[r]])
        logits = m(input_ids=t, attention_mask=torch.ones_like(t)).logits
        return torch.nn.functional.cross_entropy(logits, torch.tensor([int(enc.labels[r])]),
                                                 reduction="sum")

    def by_hand(weight_of_window):
        m = copy.deepcopy(ref).train()
        params = [p for p in m.parameters() if p.requires_grad]
        for k, rows in enumerate(windows):
            m.zero_grad(set_to_none=True)
            (sum(row_loss(m, int(r)) for r in rows) * weight_of_window(rows)).backward()
            factor = 0.5 * (1 + math.cos(math.pi * k / 3))
            assert factor == pytest.approx([1.0, 0.75, 0.25][k])
            with torch.no_grad():
                for p in params:
                    p -= lr * factor * p.grad
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    start = torch.cat([p.detach().flatten() for p in ref.parameters()])
    got = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
    want = by_hand(lambda rows: 1 / len(rows)) - start
    assert want.abs().max() > 0.1  # the steps moved the parameters (float32 rounding: ~1e-7)
    err = (got - want).abs().max()
    assert err < 5e-6, f"fit's parameters differ from the reference by {err:.2e}"
    # The weightings a bug would use move the parameters 20x the tolerance and more: the
    # last window divided by a full window's 8 rows, or every micro-batch's mean halved.
    for wrong in (lambda rows: 1 / 8,
                  lambda rows: 1 / 2 / (4 if len(rows) > 2 else 2)):
        assert (got - (by_hand(wrong) - start)).abs().max() > 1e-4


def test_early_stopping_restores_best(tiny_backbone):
    model = apply_method(build_classifier(tiny_backbone, 2, seed=0), "full", StudyConfig())
    train, val = tiny_encoded(48), tiny_encoded(16, seed=1)
    tc = replace(StudyConfig().train, precision="fp32", epochs=20, batch_size=4, warmup_ratio=0.0, eval_every=1,
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

    from loralens.models.registry import resolve_model

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
