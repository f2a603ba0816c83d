"""Weight-space measures against independent constructions, PEFT's own intruder detection,
forgetting against transformers' own LM loss, and the weights stage on the tiny model."""

import copy
import math
import re

import numpy as np
import pytest
import torch

from loralens.study.config import load_config
from loralens.analysis.weights.forgetting import lm_cross_entropy, read_text_file
from loralens.models.classifier import apply_method, build_classifier
from loralens.analysis.weights.measures import (
    EPSILONS, effective_rank, energy_rank, intruder_counts, matrix_measures, max_cosines,
)
from loralens.analysis.weights.analyzer import Analyzer, backbone_of, spaced_layers


def orthonormal(rng, n, k):
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def built_with_intruders(r, seed=0, out=64, inp=48):
    """W0 = U0 S0 V0^T (full column rank, top 10 singular values 10..5, the rest 0.1..0.05);
    the update puts r new left directions, orthogonal to W0's range, on r of W0's *bottom*
    right singular vectors, with singular values 20..30 (above every base one)."""
    rng = np.random.default_rng(seed)
    basis = orthonormal(rng, out, inp + r)
    u0, u_new = basis[:, :inp], basis[:, inp:]
    v0 = orthonormal(rng, inp, inp)
    s0 = np.concatenate([np.linspace(10, 5, 10), np.linspace(0.1, 0.05, inp - 10)])
    w0 = u0 @ np.diag(s0) @ v0.T
    s_new = np.linspace(30, 20, r)
    dw = u_new @ np.diag(s_new) @ v0[:, inp - r:].T
    return torch.tensor(w0), torch.tensor(w0 + dw), s0, s_new


@pytest.mark.parametrize("r", [1, 3, 8])
def test_an_update_orthogonal_to_the_top_directions_has_exactly_its_intruders(r):
    w0, w, s0, s_new = built_with_intruders(r)
    m = matrix_measures(w, w0)
    assert m["intruders"] == {str(e): r for e in EPSILONS}
    # the top r tuned vectors are the new directions; the next are W0's own (cos 1)
    assert max(m["max_cos"][:r]) < 0.01 and min(m["max_cos"][r:]) > 1 - 1e-9
    # the change's spectrum, by hand from the singular values it was built with
    assert m["rel_change"] == pytest.approx(math.sqrt((s_new ** 2).sum() / (s0 ** 2).sum()),
                                            rel=1e-12)
    p = s_new / s_new.sum()
    # (the zero singular values come out at ~1e-8 of the largest from the Gram matrix)
    assert m["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-4)
    energy = np.cumsum(s_new ** 2) / (s_new ** 2).sum()
    assert m["rank90"] == int(np.argmax(energy >= 0.9)) + 1
    assert m["shape"] == [64, 48]


def test_a_small_full_rank_perturbation_has_no_intruders_at_half():
    rng = np.random.default_rng(1)
    w0 = torch.tensor(rng.standard_normal((96, 64)))
    w = w0 + 1e-3 * torch.tensor(rng.standard_normal((96, 64)))
    m = matrix_measures(w, w0)
    assert m["intruders"]["0.5"] == 0 and min(m["max_cos"]) > 0.9
    assert m["rank90"] > 32  # a full-rank change needs many of its 64 directions


def test_spectrum_helpers_by_hand():
    assert effective_rank(np.ones(4)) == pytest.approx(4.0)
    assert effective_rank(np.array([2.0, 0, 0])) == pytest.approx(1.0)
    assert effective_rank(np.zeros(3)) == 0.0
    assert energy_rank(np.ones(10)) == 9          # 9 of 10 equal values hold exactly 90%
    assert energy_rank(np.array([3.0, 1.0])) == 1  # 9 / 10
    assert energy_rank(np.array([2.0, 1.0])) == 2  # 4 / 5 < 0.9
    assert intruder_counts(np.array([0.05, 0.45, 0.95]), (0.1, 0.5, 0.9)) == \
        {0.1: 1, 0.5: 2, 0.9: 2}
    u = torch.eye(3, dtype=torch.float64)
    assert list(max_cosines(u, u, k=2)) == [1.0, 1.0]


def test_shapes_must_match():
    with pytest.raises(ValueError, match=r"tuned matrix \(3, 2\) and base \(2, 3\)"):
        matrix_measures(torch.zeros(3, 2), torch.zeros(2, 3))


def peft_counts(peft_model, top_k=10, eps=0.5):
    """Per-layer intruder counts as PEFT's reduce_intruder_dimension detects and logs them."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    lines = []
    reduce_intruder_dimension(copy.deepcopy(peft_model), top_k=top_k, threshold_epsilon=eps,
                              mitigation_lambda=0.5, logging_sink=lines.append)
    out = {}
    for ln in lines:
        m = re.match(r"(.+)\.(layers\.\d+\.self_attn\.\w+): (?:Intruders: (\d+)|No intruders)",
                     ln)
        if m:
            out[m.group(2)] = int(m.group(3) or 0)
    return out


def test_per_layer_counts_equal_peft_detection(tiny_base):
    cfg = load_config(overrides=["model.name=tiny-random"])
    model = apply_method(build_classifier(tiny_base.backbone(), 2, seed=0), "lora", cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # adapters of very different sizes: some layers get intruders
        for i, (name, mod) in enumerate(sorted(model.named_modules())):
            if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                scale = [0.001, 0.3, 3.0, 30.0][i % 4]
                mod.lora_A["default"].weight.copy_(torch.randn(
                    mod.lora_A["default"].weight.shape, generator=g))
                mod.lora_B["default"].weight.copy_(scale * torch.randn(
                    mod.lora_B["default"].weight.shape, generator=g))
    want = peft_counts(model)
    assert len(want) == 4 and len(set(want.values())) > 1  # not all equal: a real check
    an = Analyzer(cfg, tiny_base)
    rows = an.analyze(backbone_of(model), "lora")
    got = {r["module"]: r["intruders"]["0.5"] for r in rows}
    assert got == want


def test_spaced_layers():
    assert spaced_layers(30, 3) == [0, 14, 29] or spaced_layers(30, 3) == [0, 15, 29]
    assert spaced_layers(2, 3) == [0, 1] and spaced_layers(5, 0) == []


# --------------------------------------------------------------------------- forgetting

def test_cross_entropy_equals_transformers_lm_loss(tiny_base):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_base.resolved.path).eval()
    tok = tiny_base.tokenizer
    texts = ["The cat sat on the mat.", "A longer sentence, with some more bytes in it!", "ok"]
    ids = [tok(t)["input_ids"] for t in texts]
    with torch.no_grad():
        losses = [float(lm(input_ids=torch.tensor([x]), labels=torch.tensor([x])).loss)
                  for x in ids]
    n = [len(x) - 1 for x in ids]
    want = sum(loss * k for loss, k in zip(losses, n)) / sum(n)
    got, count = lm_cross_entropy(lm.model, lm.get_output_embeddings().weight, ids,
                                  tok.pad_token_id, batch_size=2)
    assert count == sum(n)
    assert got == pytest.approx(want, rel=1e-5)


def test_forgetting_of_the_untouched_base_is_exactly_zero(tiny_base, tmp_path):
    corpus = tmp_path / "general.txt"  # the corpus's sampling: test_forgetting.py
    corpus.write_text(" = Title = \n\n" + "".join(f" Sentence {i} of general text .\n"
                                                  for i in range(6)))
    cfg = load_config(overrides=["model.name=tiny-random", f"weights.forgetting_text={corpus}",
                                 "weights.forgetting_examples=4"])
    an = Analyzer(cfg, tiny_base)
    f = an.forgetting(tiny_base.backbone(), "rte")  # a fresh copy of the base's weights
    assert f["forgetting"] == 0.0 and f["ce_tuned"] == f["ce_base"] > 0
    assert f["source"].startswith(f"{corpus}: 4 of 6 text lines (seed 0), sha256 ")
    assert f["n_texts"] == 4


def test_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n two \n")
    assert read_text_file(tmp_path / "a.txt") == ["one", "two"]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n{"txt": "y"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: expected a string \"text\""):
        read_text_file(tmp_path / "b.jsonl")
    with pytest.raises(FileNotFoundError, match="weights.forgetting_text: .*nope.txt not found"):
        read_text_file(tmp_path / "nope.txt")


# --------------------------------------------------------------------------- the stage


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (30, 30)])
def test_gram_eigenproblem_gives_the_svd(shape):
    """The fast path (top-k vectors and all values from the Gram matrix) equals the SVD."""
    from loralens.analysis.weights.measures import singular_values, top_left_vectors

    rng = np.random.default_rng(5)
    w = torch.tensor(rng.standard_normal(shape))
    u, s, _ = torch.linalg.svd(w, full_matrices=False)
    got = top_left_vectors(w, 10)
    assert got.shape == (shape[0], 10)
    # the same vectors up to sign: |<u_i, got_i>| = 1
    np.testing.assert_allclose((u[:, :10] * got).sum(0).abs().numpy(), 1.0, atol=1e-9)
    np.testing.assert_allclose(singular_values(w), s.numpy(), atol=1e-9 * float(s[0]))


def test_summary_tests_only_what_varies_and_pairs_by_seed():
    from loralens.analysis.weights.analyzer import summarize

    def result(method, seed, rel, forget):
        mats = [{"group": "common", "intruders": {"0.5": 0}, "rel_change": rel,
                 "effective_rank": 8.0 if method == "lora" else 100.0 + seed, "rank90": 4}]
        return {"task": "rte", "method": method, "seed": seed, "matrices": mats,
                "forgetting": {"forgetting": forget}}

    results = [result("lora", s, 0.01 * s, 0.1 + 0.01 * s) for s in (1, 2, 3)] + \
              [result("full", s, 0.002 * s, 0.2 + 0.03 * s) for s in (1, 2, 3)]
    s = summarize(results, ["rte"])
    ms = s["tasks"][0]["measures"]
    # intruders (0 vs 0) has zero spread: it stays in its family (one per measure: the
    # configured task), undefined; rank90 and effective rank are stated (LoRA's update
    # has rank <= r by construction), not tested
    assert s["n_tests"] == 1
    assert ms["intruders"]["test"]["zero_spread"]
    assert ms["intruders"]["test"]["p_text"] == "undefined (zero spread)"
    assert ms["rank90"]["test"]["tested"] is False
    assert ms["effective_rank"]["test"]["tested"] is False
    assert ms["rel_change"]["lora"]["mean"] == pytest.approx(0.02)
    assert ms["rel_change"]["full"]["sd"] == pytest.approx(0.002)
    assert ms["forgetting"]["test"]["n_tests"] == 1
    from scipy.stats import ttest_rel
    want = ttest_rel([0.11, 0.12, 0.13], [0.23, 0.26, 0.29]).pvalue
    assert ms["forgetting"]["test"]["p"] == pytest.approx(want)


# --------------------------------------------------------------------------- own matrices

def test_each_method_is_analysed_on_its_own_matrices():
    """Issue 27.4a: IA3 adapts k, v and down, LoRA-all-linear every linear layer: each
    method's own set, full fine-tuning (and head only) on the union of the configured
    methods' targets; weights.matrices, where set, for every method alike."""
    from loralens.analysis.weights.analyzer import method_matrices

    cfg = load_config(overrides=["methods=[lora,ia3,full,head]"])
    got = {m: method_matrices(cfg, m) for m in cfg.methods}
    assert got == {"lora": ["q_proj", "v_proj"], "ia3": ["k_proj", "v_proj", "down_proj"],
                   "full": ["q_proj", "v_proj", "k_proj", "down_proj"],
                   "head": ["q_proj", "v_proj", "k_proj", "down_proj"]}
    cfg = load_config(overrides=["methods=[lora,lora-all-linear,full]"])
    assert [method_matrices(cfg, m) for m in cfg.methods] == [
        ["q_proj", "v_proj"], "all-linear", "all-linear"]
    cfg = load_config(overrides=["methods=[lora,full]"])  # the two-method study: q/v
    assert method_matrices(cfg, "full") == ["q_proj", "v_proj"]
    cfg = load_config(overrides=["methods=[ia3,full]", "weights.matrices=[o_proj]"])
    assert [method_matrices(cfg, m) for m in cfg.methods] == [["o_proj"], ["o_proj"]]


def test_ia3_and_all_linear_models_are_read_on_their_own_matrices(tiny_base):
    # the tiny model: 2 layers, 7 linear layers each (q, k, v, o, gate, up, down)
    cfg = load_config(overrides=["model.name=tiny-random",
                                 "methods=[lora,ia3,lora-all-linear,full]"])
    an = Analyzer(cfg, tiny_base)
    for method, want in (("ia3", {"k_proj", "v_proj", "down_proj"}),
                         ("lora-all-linear", {"q_proj", "k_proj", "v_proj", "o_proj",
                                              "gate_proj", "up_proj", "down_proj"}),
                         ("lora", {"q_proj", "v_proj"})):
        model = apply_method(build_classifier(tiny_base.backbone(), 2, seed=0), method, cfg)
        rows = an.analyze(backbone_of(model), method)
        assert {r["matrix"] for r in rows} == want, method
        assert len(rows) == 2 * len(want) and {r["group"] for r in rows} == {"common"}


def _result(method, seed, rel):
    """A model's weights JSON: rel_change per matrix (0 intruders; ranks fixed)."""
    return {"task": "rte", "method": method, "seed": seed,
            "matrices": [{"matrix": k, "layer": 0, "group": "common", "rel_change": v,
                          "intruders": {"0.5": 1}, "effective_rank": 2.0, "rank90": 1}
                         for k, v in rel.items()]}


def test_a_method_is_compared_with_full_on_its_own_matrices(tmp_path):
    from loralens.analysis.weights.analyzer import method_summary
    from loralens.core.run_dir import RunDir

    cfg = load_config(overrides=["methods=[ia3,full]", "tasks=[rte]", "seeds=[1,2,3]",
                                 "weights.forgetting=false"])
    # full changes q far more than k, v, down: over its own set (q, k, v, down) its mean is
    # (1 + 3 x 0.1s) / 4; over IA3's set (k, v, down) it is 0.1 s
    results = [_result("ia3", s, {"k_proj": 0.2 * s, "v_proj": 0.2 * s, "down_proj": 0.2 * s})
               for s in (1, 2, 3)]
    results += [_result("full", s, {"q_proj": 1.0, "k_proj": 0.1 * s, "v_proj": 0.1 * s,
                                    "down_proj": 0.1 * s}) for s in (1, 2, 3)]
    out = method_summary(cfg, RunDir(tmp_path / "run"), results)
    rows = {(r["method"], r["measure"]): r for r in out["rows"]}
    ia3, full = rows[("ia3", "rel_change")], rows[("full", "rel_change")]
    assert ia3["matrix_set"] == "down_proj, k_proj, v_proj"
    assert ia3["mean"] == pytest.approx(0.4)
    assert full["matrix_set"] == "down_proj, k_proj, q_proj, v_proj"
    assert full["mean"] == pytest.approx((1.0 + 3 * 0.2) / 4)  # its own row: its own set
    # the test pairs IA3 (0.2 s) with full on IA3's matrices (0.1 s): differences 0.1 s
    from scipy.stats import ttest_rel
    want = ttest_rel([0.2, 0.4, 0.6], [0.1, 0.2, 0.3]).pvalue
    assert ia3["test"]["p"] == pytest.approx(want)
    # intruders: summed over the compared set: IA3 3 vs full 3 (not 4): zero spread
    assert rows[("ia3", "intruders")]["test"]["zero_spread"]
