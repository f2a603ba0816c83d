"""Model families: detection, pooling, pair tokenization, LoRA targets, artifacts, and the
extract and drift stages on a tiny random BERT encoder built in code (no hub); the Llama
path's logits unchanged."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from loralens.tasks import sources as TS
from loralens.training import batches as B
from loralens.models import families as F
from loralens.analysis import similarity as S
from loralens.core.config import ModelConfig, StudyConfig
from loralens.study.config import load_config
from loralens.analysis.drift.stage import run_drift
from loralens.analysis.extract import load_task, pooled_hidden_states, run_extract
from loralens.core.files import atomic_write_json
from loralens.training.loop import fit
from loralens.models.methods import get_method
from loralens.models.classifier import CausalLMClassifier, apply_method, build_classifier, load_base
from loralens.models.registry import ResolvedModel, load_tokenizer
from loralens.models.saving import load_trained, save_trained
from loralens.core.run_dir import RunDir
from loralens.tasks.registry import get_task
from loralens.training.job import train_job

WORDS = "the cat sat on a mat while dogs ran far away from home today".split()
ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"


def bert_tokenizer():
    """A WordPiece tokenizer over a tiny vocabulary: the words above, then characters, so
    any lowercase text is encodable."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *ALNUM, *".,!?'-",
             *(f"##{c}" for c in ALNUM)]
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BERT (2 layers, hidden 32) and its tokenizer, saved as a local model
    directory, as a user's would be."""
    from transformers import AutoModel, BertConfig

    out = tmp_path_factory.mktemp("bert")
    tok = bert_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def bert_base(bert_dir):
    return load_base(ModelConfig(name=str(bert_dir)))


def sentence(rng):
    return " ".join(rng.choice(WORDS, size=rng.integers(2, 9)))


def encoded(tok, n=16, seed=0, pairs=True):
    rng = np.random.default_rng(seed)
    texts = [(sentence(rng), sentence(rng)) if pairs and i % 2 else (sentence(rng),)
             for i in range(n)]
    return B.Encoded([B.encode_texts(tok, t, 64) for t in texts],
                     np.array([i % 2 for i in range(n)]), np.arange(n))


# --------------------------------------------------------------------------- families

def test_detect_family():
    from transformers import (BertConfig, DistilBertConfig, GPT2Config, LlamaConfig,
                              PretrainedConfig, RobertaConfig, T5Config)

    assert F.detect_family(LlamaConfig()) == F.CAUSAL
    assert F.detect_family(GPT2Config()) == F.CAUSAL
    for c in (BertConfig(), RobertaConfig(), DistilBertConfig()):
        assert F.detect_family(c) == F.ENCODER, c.model_type
    # is_decoder (a BERT used as a causal LM) and the architectures come first.
    assert F.detect_family(BertConfig(is_decoder=True)) == F.CAUSAL
    assert F.detect_family(BertConfig(architectures=["BertLMHeadModel"])) == F.CAUSAL
    assert F.detect_family(LlamaConfig(architectures=["LlamaForMaskedLM"])) == F.ENCODER
    with pytest.raises(ValueError, match="encoder-decoder"):
        F.detect_family(T5Config())
    with pytest.raises(ValueError, match="causal LM or an encoder"):
        F.detect_family(PretrainedConfig())


def test_resolve_pooling():
    assert F.resolve_pooling(F.CAUSAL, "auto") == "last"
    assert F.resolve_pooling(F.ENCODER, None) == "cls"
    assert F.resolve_pooling(F.ENCODER, "mean") == "mean"
    assert F.resolve_pooling(F.CAUSAL, "mean") == "mean"
    with pytest.raises(ValueError, match="cls .* not a summary in a causal LM"):
        F.resolve_pooling(F.CAUSAL, "cls")
    with pytest.raises(ValueError, match="'max' is not one of"):
        F.resolve_pooling(F.ENCODER, "max")


def test_pooling_config_key(tiny_base, bert_dir):
    assert (tiny_base.family, tiny_base.pooling) == (F.CAUSAL, "last")
    assert getattr(tiny_base.tokenizer, F.PAIRS_ATTR) == "eos"
    base = load_base(ModelConfig(name=str(bert_dir), pooling="mean"))
    assert (base.family, base.pooling) == (F.ENCODER, "mean")
    assert CausalLMClassifier(base.backbone(), 2).pooling == "mean"
    assert load_config(overrides=["model.pooling=cls"]).model.pooling == "cls"
    with pytest.raises(ValueError, match="not a summary in a causal LM"):
        load_base(ModelConfig(name="tiny-random", pooling="cls"))


def test_token_type_ids_by_hand():
    ids = torch.tensor([[2, 7, 8, 3, 5, 3, 0], [2, 9, 3, 0, 0, 0, 0]])
    mask = (torch.arange(7) < torch.tensor([[6], [3]])).long()
    assert F.token_type_ids(ids, mask, sep_id=3).tolist() == [[0, 0, 0, 0, 1, 1, 0],
                                                               [0, 0, 0, 0, 0, 0, 0]]


# --------------------------------------------------------------------------- the Llama path

def test_llama_logits_bit_identical_to_last_token_by_hand(tiny_backbone):
    """The causal path computes exactly what it did before families: the backbone with
    use_cache=False, the hidden state at position len(row) - 1 (right padding, index
    computed here from the row lengths), the head. Bit for bit."""
    model = build_classifier(tiny_backbone, 2, seed=0).eval()
    assert (model.family, model.pooling) == (F.CAUSAL, "last")
    rows = [[1, 50, 60, 70, 2, 80, 90], [1, 100, 110], [1, 120, 130, 140, 150, 2]]
    ids, mask = B.collate(rows, pad_id=2)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        h = tiny_backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        pooled = torch.stack([h[i, len(r) - 1] for i, r in enumerate(rows)])
        want = model.score(pooled).float()
    assert torch.equal(got, want)


def test_llama_pairs_keep_the_eos_format(tiny_tokenizer):
    ids = B.encode_texts(tiny_tokenizer, ("ab", "c"), 64)
    assert ids == [1, 3 + ord("a"), 3 + ord("b"), 2, 3 + ord("c")]


# --------------------------------------------------------------------------- encoders

def test_encoder_tokenizer_keeps_its_pair_template_and_pad(bert_base):
    tok = bert_base.tokenizer
    assert (bert_base.family, bert_base.pooling) == (F.ENCODER, "cls")
    assert tok.pad_token == "[PAD]" and tok.padding_side == "right"
    got = B.encode_texts(tok, ("the cat sat", "dogs ran"), 64)
    assert got == tok("the cat sat", "dogs ran")["input_ids"]
    assert tok.convert_ids_to_tokens(got) == ["[CLS]", "the", "cat", "sat", "[SEP]", "dogs",
                                              "ran", "[SEP]"]
    # Truncation keeps both [SEP]s (longest segment first).
    short = B.encode_texts(tok, ("the cat sat on a mat", "dogs ran"), 7)
    assert len(short) == 7 and tok.convert_ids_to_tokens(short)[-1] == "[SEP]"
    assert tok.convert_ids_to_tokens(short).count("[SEP]") == 2


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_encoder_pooling_by_hand_and_padding_invariant(bert_base, pooling):
    """Each row's logits equal the backbone run on that row alone (no padding; segment ids
    from the tokenizer's own output) with the head on the first position (cls) or the mean
    over the row's tokens (mean); padding the batch further changes nothing."""
    tok = bert_base.tokenizer
    model = CausalLMClassifier(bert_base.backbone(), 3, pooling=pooling).eval()
    texts = [("the cat sat", "a dog ran far"), ("home today",),
             ("the mat while dogs ran far away from home",)]
    rows = [B.encode_texts(tok, t, 64) for t in texts]
    ids, mask = B.collate(rows, tok.pad_token_id)
    padded = B.collate(rows, tok.pad_token_id, pad_to=40)

    def alone(t, with_segments=True):
        enc = tok(*t, return_tensors="pt")
        kw = {"token_type_ids": enc["token_type_ids"]} if with_segments else {}
        with torch.no_grad():
            h = model.backbone(input_ids=enc["input_ids"],
                               attention_mask=enc["attention_mask"], **kw).last_hidden_state[0]
            return model.score(h[0] if pooling == "cls" else h.mean(dim=0))

    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        more = model(input_ids=padded[0], attention_mask=padded[1]).logits
    for i, t in enumerate(texts):
        torch.testing.assert_close(logits[i], alone(t), rtol=0, atol=1e-5)
    torch.testing.assert_close(more, logits, rtol=0, atol=1e-5)
    # The test can fail: sentence B's segment ids change the pair's logits.
    assert (logits[0] - alone(texts[0], with_segments=False)).abs().max() > 1e-4
    if pooling == "mean":  # and averaging the pads in (the published code's bug) would show
        with torch.no_grad():
            h = model.backbone(input_ids=padded[0], attention_mask=padded[1]).last_hidden_state
        assert (model.score(h[1].mean(dim=0)) - logits[1]).abs().max() > 1e-4


def test_encoder_lora_targets_and_training(bert_base):
    """The default LoRA (q_proj/v_proj) becomes BERT's query/value; only adapter and head
    parameters train, and a few steps change them."""
    cfg = StudyConfig()
    model = apply_method(build_classifier(bert_base.backbone(), 2, seed=0), "lora", cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    assert any("attention.self.query.lora_A" in n for n in trainable)
    assert any("attention.self.value.lora_B" in n for n in trainable)
    assert not any("key.lora" in n or "dense.lora" in n for n in trainable)
    assert not any("pooler" in n for n in model.state_dict())  # unused: dropped
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tc = replace(cfg.train, epochs=1, batch_size=4, warmup_ratio=0.0, max_steps=3)
    res = fit(model, encoded(bert_base.tokenizer), None, bert_base.tokenizer.pad_token_id, tc,
              lr=1e-2, seed=0, progress=False)
    assert res.steps == 3 and np.isfinite(res.final_train_loss)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed) and any("score" in n for n in changed)


def test_family_targets_rule():
    lora = get_method("lora", StudyConfig())
    assert F.family_targets("roberta", lora.peft)["target_modules"] == ["query", "value"]
    assert F.family_targets("distilbert", lora.peft)["target_modules"] == ["q_lin", "v_lin"]
    written = {**lora.peft, "target_modules": ["query", "key"]}
    assert F.family_targets("bert", written)["target_modules"] == ["query", "key"]
    ia3 = F.family_targets("bert", get_method("ia3", StudyConfig()).peft)
    assert ia3["target_modules"] == ["key", "value", "output.dense"]
    assert ia3["feedforward_modules"] == ["output.dense"]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_encoder_artifacts_roundtrip_in_loralens_layout(bert_base, tmp_path, method):
    tok = bert_base.tokenizer
    model = apply_method(build_classifier(bert_base.backbone(), 2, seed=3), method,
                         StudyConfig())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    enc = encoded(tok, 6, seed=1)
    batch = B.collate(enc.input_ids, tok.pad_token_id)
    with torch.no_grad():
        want = model(input_ids=batch[0], attention_mask=batch[1]).logits
    sub = "adapter" if method == "lora" else "model"
    save_trained(model, method, tmp_path / sub, tokenizer=tok, label_names=["no", "yes"])
    back = load_trained(tmp_path, bert_base.backbone(), 2)
    with torch.no_grad():
        got = back(input_ids=batch[0], attention_mask=batch[1]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # No transformers class computes this head: the files claim none, the card says so.
    if method == "full":
        config = json.loads((tmp_path / sub / "config.json").read_text())
        assert config.get("architectures") is None and config[F.POOLING_ATTR] == "cls"
    else:
        assert json.loads((tmp_path / sub / "adapter_config.json").read_text())[
            "task_type"] is None
    card = (tmp_path / sub / "README.md").read_text()
    assert "loralens only" in card and "`cls` pooling" in card
    assert "AutoModelForSequenceClassification" not in card
    # The artifact's tokenizer comes back as an encoder's (for an adapter: from its base).
    again = load_tokenizer(ResolvedModel(str(tmp_path / sub), str(tmp_path / sub), ""))
    assert getattr(again, F.PAIRS_ATTR) == "native" and again.pad_token == "[PAD]"
    assert B.encode_texts(again, ("the cat", "a mat"), 64) == tok("the cat", "a mat")[
        "input_ids"]


# --------------------------------------------------------------------------- stages

def write_glue(root):
    rng = np.random.default_rng(0)
    (root / "SST-2").mkdir(parents=True)
    (root / "RTE").mkdir()
    for name, n in (("train", 24), ("dev", 14)):
        with open(root / "SST-2" / f"{name}.tsv", "w") as f:
            f.write("sentence\tlabel\n" + "".join(f"{sentence(rng)}\t{i % 2}\n"
                                                   for i in range(n)))
        with open(root / "RTE" / f"{name}.tsv", "w") as f:
            f.write("index\tsentence1\tsentence2\tlabel\n" + "".join(
                f"{i}\t{sentence(rng)}\t{sentence(rng)}\t"
                f"{'entailment' if i % 3 else 'not_entailment'}\n" for i in range(n - 4)))
    return root


def test_train_extract_drift_stages_on_an_encoder_run(tmp_path, bert_dir):
    """An encoder run: the train stage trains LoRA (BERT's query/value) a few steps;
    extraction gives [n, layers + 1, d]; a job whose backbone is the base model's (full,
    untrained) has drift 0 (CKA 1) at every state; the trained LoRA job does not."""
    cfg = load_config(overrides={"tasks": ["sst2", "rte"], "seeds": [1],
                                 "model": {"name": str(bert_dir)},
                                 "data": {"glue_dir": str(write_glue(tmp_path / "glue")),
                                          "max_length": 64},
                                 "train": {"epochs": 1, "batch_size": 4, "lr_lora": 5e-2}})
    base = load_base(cfg)
    run = RunDir(tmp_path / "run")
    run.bind_config(cfg)
    for task in cfg.tasks:
        metrics = train_job(cfg, run, task, "lora", 1, base=base, progress=False)
        assert np.isfinite(metrics["validation"]["accuracy"])
        adapter = json.loads((run.job_dir(task, "lora", 1) / "adapter" /
                              "adapter_config.json").read_text())
        assert sorted(adapter["target_modules"]) == ["query", "value"]
        model = apply_method(build_classifier(base.backbone(), 2, 1), "full", cfg)
        job = run.job_dir(task, "full", 1)
        save_trained(model, "full", job / "model", tokenizer=base.tokenizer)
        atomic_write_json(job / "metrics.json", {
            "task": task, "method": "full", "seed": 1, "model": base.name,
            "validation": {"accuracy": 0.5, "f1": 0.5, "n": 10, "loss": 0.7},
            "majority_baseline": {"label": 1, "accuracy": 0.5, "f1": 0.67}})
    res = run_extract(cfg, run, n_examples=12, batch_size=4, base=base, progress=False)
    assert {r["status"] for r in res} == {"extracted"} and len(res) == 6
    manifest, arrays = load_task(run, "rte")
    assert manifest["n_examples"] == 10
    assert {k: a.shape for k, a in arrays.items()} == {
        k: (10, 3, 32) for k in ("base", "lora-seed1", "full-seed1")}
    np.testing.assert_array_equal(arrays["full-seed1"], arrays["base"])
    # The pooled states are the classifier's hidden states, mean-pooled over real tokens.
    enc = B.encode_split(base.tokenizer, TS.load_split(get_task("rte"), "validation",
                                                      cfg.data.glue_dir), 64)
    again = pooled_hidden_states(build_classifier(base.backbone(), 2, 0), enc,
                                 base.tokenizer.pad_token_id, batch_size=3)
    np.testing.assert_allclose(again, arrays["base"], rtol=0, atol=1e-5)
    assert S.linear_cka(arrays["base"][:, 2], arrays["base"][:, 2]) == pytest.approx(1, abs=1e-9)
    out = run_drift(cfg, run, n_resamples=50)
    rows = [r for r in out["layers"] if r["task"] == "rte"]
    full = [r for r in rows if r["method"] == "full"]
    lora = [r for r in rows if r["method"] == "lora"]
    assert full and all(r["cka"] == pytest.approx(1, abs=1e-9) for r in full)
    assert all(r["drift"] == pytest.approx(0, abs=1e-9) for r in full)
    assert max(r["drift"] for r in lora) > 1e-5  # trained: it moved (base: exactly 0)


@pytest.mark.parametrize("family,pooling", [("encoder", "cls"), ("encoder", "mean"),
                                            ("causal", "mean")])
def test_serving_refuses_what_its_paths_would_compute_wrongly(family, pooling):
    from loralens.core.errors import ConfigError
    from loralens.models.families import require_servable

    with pytest.raises(ConfigError, match=f"bench: serving supports causal LMs with "
                       f"last-token pooling only; this model is a {family} with {pooling}"):
        require_servable(family, pooling, "bench")
    require_servable("causal", "last", "bench")  # the study's models serve
