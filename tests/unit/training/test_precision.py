"""Training precision and FLOPs accounting on the tiny random Llama (model-free, seconds).

FLOP counts are checked against parameter counts worked out by hand from the tiny config
(hidden 32, MLP 64, 2 layers, 4 heads of 8, 2 KV heads, vocab 49152, rank-8 LoRA on
q_proj and v_proj); the bfloat16 path against its contract: frozen weights cast once and
given back bit for bit, trained weights float32 (masters for full fine-tuning), and the
precision ``auto`` picks from a measurement.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from loralens.training import batches as B
from loralens.training import flops
from loralens.training import precision as P
from loralens.core.errors import ConfigError
from loralens.core.config import StudyConfig
from loralens.models.classifier import apply_method, build_classifier
from loralens.models.tiny import tiny_llama_config
from loralens.training.loop import evaluate, fit

EOS = 2
# per layer: q 32x32 + k 32x16 + v 32x16 + o 32x32 + gate/up/down 3 x 32x64 + 2 norms of 32
LAYER = 1024 + 512 + 512 + 1024 + 3 * 2048 + 64
N_FULL = 2 * LAYER + 32 + 32 * 2            # + final norm + head (32 -> 2, no bias)
LORA = 2 * ((8 * 32 + 32 * 8) + (8 * 32 + 16 * 8))   # A and B of q (32->32), v (32->16)
HEAD = 32 * 2


def encoded(n=24, seed=0, lo=3, hi=20):
    rng = np.random.default_rng(seed)
    ids = [list(rng.integers(10, 4000, size=rng.integers(lo, hi))) for _ in range(n)]
    labels = np.array([int(sum(x) % 2) for x in ids])
    return B.Encoded([[int(t) for t in x] for x in ids], labels, np.arange(n))


def model_for(backbone, method):
    return apply_method(build_classifier(backbone, 2, seed=0), method, StudyConfig())


def train(model, enc, method, precision="fp32", **kw):
    tc = replace(StudyConfig().train, epochs=1, batch_size=8, warmup_ratio=0.0,
                 precision=precision, **kw)
    return fit(model, enc, None, EOS, tc, lr=1e-2, seed=0, progress=False, method=method)


def test_flops_per_token_from_hand_counted_parameters(tiny_backbone):
    full = model_for(tiny_backbone, "full")
    assert flops.non_embedding_params(full) == N_FULL == 18656
    assert flops.train_flops_per_token(full, "full") == 6 * N_FULL
    assert flops.forward_flops_per_token(full) == 2 * N_FULL
    from transformers import AutoModel

    torch.manual_seed(0)
    lora = model_for(AutoModel.from_config(tiny_llama_config()), "lora")
    # the forward multiplies by the base, the adapters and ONE head (PEFT's original head
    # is kept beside the trained copy but never used)
    assert flops.non_embedding_params(lora) == N_FULL + LORA
    assert flops.trainable_non_embedding_params(lora) == LORA + HEAD
    assert flops.train_flops_per_token(lora, "lora") == 4 * (N_FULL + LORA) + 2 * (LORA + HEAD)


def test_model_shapes_of_a_llama_layer():
    assert flops.model_shapes(tiny_llama_config()) == [(32, 32, 2), (32, 16, 2), (32, 64, 2),
                                                       (64, 32, 1)]


def test_fit_records_throughput_consistently(tiny_backbone):
    model = model_for(tiny_backbone, "full")
    res = train(model, encoded(), "full")
    assert res.precision == "fp32" and res.real_tokens > 0
    assert res.flops_per_token == 6 * N_FULL
    assert res.train_flops == res.flops_per_token * res.real_tokens
    assert res.achieved_flops_per_s == pytest.approx(res.train_flops / res.step_seconds)
    assert res.mfu == pytest.approx(res.achieved_flops_per_s / res.peak_flops_per_s)
    assert res.mfu_model_shapes == pytest.approx(res.achieved_flops_per_s
                                                 / res.peak_model_flops_per_s)
    assert res.peak_flops_per_s == flops.gemm_peak(torch.float32)  # measured once, cached
    assert 0 < res.step_seconds <= res.train_seconds
    assert res.step_seconds + res.eval_seconds <= res.train_seconds + 1e-6


def test_lora_in_bf16_casts_the_frozen_base_once_and_gives_it_back_bit_for_bit(tiny_backbone):
    model = model_for(tiny_backbone, "lora")
    frozen = {n: p.data for n, p in model.named_parameters() if not p.requires_grad}
    copies = {n: t.clone() for n, t in frozen.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    mp = P.CastOnce(model, torch.bfloat16)
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), n
    assert mp.params == trainable and not mp.masters   # adapters and head: float32 as they are
    mp.finish()
    for n, p in model.named_parameters():
        if n in frozen:
            # the very storage it had (not a copy cast back), holding the same bits
            assert p.data_ptr() == frozen[n].data_ptr() and torch.equal(p.data, copies[n]), n


def test_full_in_bf16_steps_float32_masters(tiny_backbone):
    model = model_for(tiny_backbone, "full")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mp = P.CastOnce(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert len(mp.masters) == len(before)
    for (p, m), (n, b) in zip(mp.masters, before.items()):
        assert m.dtype == torch.float32 and torch.equal(m, b), n   # masters hold the fp32 values
    assert {id(q) for q in mp.params} == {id(m) for _, m in mp.masters}
    mp.finish()
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n


def test_bf16_training_leaves_a_float32_model_close_to_the_float32_path(tiny_backbone):
    enc = encoded(48)
    results, models = {}, {}
    for prec in ("fp32", "bf16"):
        for method in ("lora", "full"):
            import copy

            m = model_for(copy.deepcopy(tiny_backbone), method)
            results[prec, method] = train(m, enc, method, prec)
            models[prec, method] = m
            assert all(p.dtype == torch.float32 for p in m.parameters())
            assert results[prec, method].precision == prec
    for method in ("lora", "full"):
        a, b = results["fp32", method], results["bf16", method]
        assert b.final_train_loss == pytest.approx(a.final_train_loss, rel=0.02), method
        la = evaluate(models["fp32", method], enc, EOS)["loss"]
        lb = evaluate(models["bf16", method], enc, EOS)["loss"]
        assert lb == pytest.approx(la, rel=0.02), method
        # it did train: the bf16 path moved the trained weights
        assert not torch.equal(next(p for p in models["bf16", method].parameters()
                                    if p.requires_grad),
                               next(p for p in model_for(tiny_backbone, method).parameters()
                                    if p.requires_grad))


def test_bf16_early_stopping_restores_the_best_float32_state(tiny_backbone):
    enc, es = encoded(48, seed=1), encoded(16, seed=2)
    model = model_for(tiny_backbone, "full")
    tc = replace(StudyConfig().train, epochs=3, batch_size=8, warmup_ratio=0.0,
                 precision="bf16", patience=0, eval_every=2)
    snapshots = []

    def on_eval(entry):
        snapshots.append({n: p.detach().float().clone() for n, p in model.named_parameters()})

    res = fit(model, enc, es, EOS, tc, lr=3e-2, seed=0, progress=False, method="full",
              on_eval=on_eval)
    best = res.best_step
    best_index = next(i for i, h in enumerate(res.history) if h["step"] == best)
    # the restored model is the masters at the best evaluation: its bf16 copy matches the
    # snapshot taken then to bf16 resolution, and it is float32 again
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32
        assert torch.allclose(p.to(torch.bfloat16).float(), snapshots[best_index][n],
                              rtol=0, atol=0), n


@pytest.mark.parametrize("fp32, bf16, want", [(100e9, 120e9, torch.bfloat16),
                                              (100e9, 105e9, torch.float32),
                                              (257e9, 167e9, torch.float32)])
def test_auto_on_the_cpu_trains_in_bf16_only_where_it_measured_faster(monkeypatch, fp32, bf16,
                                                                      want):
    calls = []

    def fake(config, tokens, dtype=torch.float32, device="cpu"):
        calls.append(dtype)
        return bf16 if dtype == torch.bfloat16 else fp32

    monkeypatch.setattr(flops, "model_gemm_peak", fake)
    dtype, note = P.choose("auto", torch.device("cpu"), tiny_llama_config())
    assert dtype == want and sorted(map(str, calls)) == ["torch.bfloat16", "torch.float32"]
    assert f"{bf16 / fp32:.2f}x float32" in note
    assert ("computes in bfloat16" if want == torch.bfloat16 else "computes in float32") in note


def test_explicit_precisions_and_the_gpu_need_no_measurement(monkeypatch):
    monkeypatch.setattr(flops, "model_gemm_peak", lambda *a, **k: pytest.fail("measured"))
    assert P.choose("fp32", torch.device("cpu"), tiny_llama_config())[0] == torch.float32
    assert P.choose("bf16", torch.device("cpu"), tiny_llama_config())[0] == torch.bfloat16
    assert P.choose("auto", torch.device("cuda"), tiny_llama_config())[0] == torch.bfloat16
    with pytest.raises(ConfigError, match=r"train.precision: 'fp16' is not one of"):
        P.choose("fp16", torch.device("cpu"))


def test_bf16_on_a_gpu_is_autocast_and_nothing_on_the_cpu():
    ctx = P.autocast(torch.device("cuda"), torch.bfloat16)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert not isinstance(P.autocast(torch.device("cpu"), torch.bfloat16), torch.autocast)
