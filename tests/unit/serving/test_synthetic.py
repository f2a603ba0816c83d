"""Generated adapters and traffic for the at-scale benchmark (issue 29.2): shapes, ranks,
file layout, that PEFT and our runtime read the files, and the LRU hit rates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from loralens.serving.bench import synthetic as S


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = _Attn()


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])


@pytest.fixture
def shapes():
    return S.projection_shapes(_Backbone(), ["q_proj", "v_proj"])


def test_projection_shapes_are_the_targets_in_out(shapes):
    assert shapes == {"layers.0.self_attn.q_proj": (16, 16), "layers.0.self_attn.v_proj": (16, 8),
                      "layers.1.self_attn.q_proj": (16, 16), "layers.1.self_attn.v_proj": (16, 8)}


def test_adapter_bytes_by_hand(shapes):
    # rank 4: per layer q 4*(16+16) + v 4*(16+8) = 224 floats, 2 layers, head 2x16: 480 floats
    assert S.adapter_file_bytes(shapes, 4, 16) == 480 * 4
    # SmolLM2-135M, rank 8 on q (576->576) and v (576->192) in 30 layers + a 2x576 head:
    # the 1.85 MB per adapter
    smol = {f"layers.{i}.self_attn.{m}": (576, o) for i in range(30)
            for m, o in (("q_proj", 576), ("v_proj", 192))}
    assert S.adapter_file_bytes(smol, 8, 576) == 1_847_808


def test_study_targets_are_q_and_v():
    assert S.study_targets() == ["q_proj", "v_proj"]


def test_generated_adapters_layout_shapes_and_ranks(tmp_path, shapes):
    made = S.generate_adapters(tmp_path, [4, 8], shapes, hidden=16, base_model="tiny")
    assert [n for n, _ in made] == ["syn0-r4", "syn1-r8"]
    assert made[0][1] == tmp_path / "models" / "sst2" / "lora" / "seed0" / "adapter"
    for (_, d), r in zip(made, [4, 8]):
        assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json",
                                                       "adapter_model.safetensors"]
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"], cfg["task_type"]) == \
            (r, 16.0, "LORA", "SEQ_CLS")
        assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
        assert cfg["modules_to_save"] == ["score"]
        state = load_file(str(d / "adapter_model.safetensors"))
        assert len(state) == 4 * 2 + 1
        assert state["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (r, 16)
        assert state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (8, r)
        assert state["base_model.model.score.weight"].shape == (2, 16)
    # each adapter has its own head
    h0, h1 = (load_file(str(d / "adapter_model.safetensors"))["base_model.model.score.weight"]
              for _, d in made)
    assert not torch.equal(h0, h1[:, :16])
    sizes = S.file_bytes(d for _, d in made)
    assert sizes > S.adapter_file_bytes(shapes, 4, 16) + S.adapter_file_bytes(shapes, 8, 16)


def test_peft_and_our_runtime_read_them(tmp_path, shapes):
    from peft import PeftConfig

    from loralens.serving.runtime import LoraAdapter

    (_, d), = S.generate_adapters(tmp_path, [4], shapes, hidden=16, base_model="tiny")
    pc = PeftConfig.from_pretrained(str(d))
    assert (type(pc).__name__, pc.r, pc.lora_alpha, sorted(pc.target_modules)) == \
        ("LoraConfig", 4, 16.0, ["q_proj", "v_proj"])
    ad = LoraAdapter.from_dir(d)
    assert ad.num_labels == 2 and len(ad.factors) == 4
    A, B, s = next(iter(ad.factors.values()))
    assert (tuple(A.shape), s) == ((4, 16), 4.0)  # scaling alpha / r = 16 / 4


def test_factor_scales(tmp_path):
    g = torch.Generator().manual_seed(0)
    st = S.adapter_state({"x.q_proj": (400, 300)}, 8, 400, 2, g)
    a, b = st["base_model.model.model.x.q_proj.lora_A.weight"], \
        st["base_model.model.model.x.q_proj.lora_B.weight"]
    assert float(a.abs().max()) <= 1 / 20  # U(-1/sqrt(400), 1/sqrt(400)), PEFT's init
    assert float(a.std()) == pytest.approx(1 / (20 * 3 ** 0.5), rel=0.05)
    assert float(b.std()) == pytest.approx(0.015, rel=0.05)


def test_existing_adapters_are_kept_and_deterministic(tmp_path, shapes):
    (_, d), = S.generate_adapters(tmp_path / "a", [8], shapes, hidden=16)
    (_, e), = S.generate_adapters(tmp_path / "b", [8], shapes, hidden=16)
    assert (d / "adapter_model.safetensors").read_bytes() == \
        (e / "adapter_model.safetensors").read_bytes()
    mtime = (d / "adapter_model.safetensors").stat().st_mtime_ns
    S.generate_adapters(tmp_path / "a", [8], shapes, hidden=16)
    assert (d / "adapter_model.safetensors").stat().st_mtime_ns == mtime


def test_zipf_probabilities_by_hand():
    np.testing.assert_allclose(S.zipf_probabilities(3, 1.0), [6 / 11, 3 / 11, 2 / 11])


def test_traffic():
    u = S.traffic(10, 10_000, "uniform", seed=1)
    assert u.min() == 0 and u.max() == 9
    z = S.traffic(1000, 50_000, "zipf", 1.1, seed=1)
    top = np.bincount(z, minlength=1000).max() / len(z)
    assert top == pytest.approx(S.zipf_probabilities(1000, 1.1)[0], abs=0.01)
    with pytest.raises(ValueError, match="uniform or zipf"):
        S.traffic(10, 5, "pareto")


def test_exact_lru_by_hand():
    # capacity 2: 1 miss, 2 miss, 1 hit, 3 miss (evicts 2), 2 miss (evicts 1), 1 miss
    assert S.lru_hit_rate([1, 2, 1, 3, 2, 1], 2) == pytest.approx(1 / 6)
    assert S.lru_hit_rate([1, 2, 1, 3, 2, 1], 2, warmup=2) == pytest.approx(1 / 4)


def test_che_by_hand_and_against_an_exact_simulation():
    # uniform over 10 with room for 5: 1 - exp(-T/10) = 1/2, hit rate 1/2 = C/n
    assert S.che_hit_rate(np.full(10, 0.1), 5) == pytest.approx(0.5, abs=1e-9)
    # p = (3/4, 1/4), C = 1: x = exp(-T/4) solves x^3 + x = 1 (x = 0.682328),
    # hit rate 3/4 (1 - x^3) + 1/4 (1 - x) = 0.59119
    assert S.che_hit_rate(np.array([0.75, 0.25]), 1) == pytest.approx(0.59119, abs=1e-4)
    assert S.che_hit_rate(np.full(4, 0.25), 4) == 1.0
    # the figure: a budget of 100 under Zipf 1.1 over 1000 reaches about 0.67
    p = S.zipf_probabilities(1000, 1.1)
    che = S.che_hit_rate(p, 100)
    assert che == pytest.approx(0.67, abs=0.005)
    seq = S.traffic(1000, 100_000, "zipf", 1.1, seed=3)
    assert S.lru_hit_rate(seq, 100, warmup=10_000) == pytest.approx(che, abs=0.01)


# --------------------------------------------------------------------------- reading /metrics

def test_metric_values_and_histogram_quantile_by_hand():
    from loralens.serving.loadtest import histogram_buckets, histogram_quantile, metric_values

    text = """# HELP loralens_adapter_store_hits_total hits
# TYPE loralens_adapter_store_hits_total counter
loralens_adapter_store_hits_total 67.0
x_bucket{le="0.01"} 2.0
x_bucket{le="0.05"} 6.0
x_bucket{le="+Inf"} 8.0
x_count 8.0
"""
    v = metric_values(text)
    assert v["loralens_adapter_store_hits_total"] == 67.0 and v["x_count"] == 8.0
    b = histogram_buckets(v, "x")
    assert b == [(0.01, 2.0), (0.05, 6.0), (float("inf"), 8.0)]
    # rank 4 of 8 lies in (0.01, 0.05], 2 of its 4 observations in: 0.01 + 0.04 * 2/4
    assert histogram_quantile(0.5, b) == pytest.approx(0.03)
    assert histogram_quantile(0.1, b) == pytest.approx(0.004)  # 0.8 of the first 2, from 0
    assert histogram_quantile(0.9, b) == 0.05  # in +Inf: the largest finite bound
    assert histogram_quantile(0.5, [(0.01, 0.0), (float("inf"), 0.0)]) is None


def test_loadtest_takes_sources_or_synthetic_not_both():
    import argparse

    from loralens.serving import add_loadtest_arguments
    from loralens.serving.loadtest import LoadTestError, cli_command

    p = argparse.ArgumentParser()
    add_loadtest_arguments(p)
    with pytest.raises(LoadTestError, match="not both"):
        cli_command(p.parse_args(["runs/x", "--synthetic", "4"]))
    with pytest.raises(LoadTestError, match="not both"):
        cli_command(p.parse_args([]))
    with pytest.raises(LoadTestError, match="at least 1"):
        cli_command(p.parse_args(["--synthetic", "0"]))
    args = p.parse_args(["--synthetic", "4", "--traffic", "zipf"])
    assert (args.synthetic, args.traffic, args.zipf_s, args.backends, args.adapters) == \
        (4, "zipf", 1.1, None, None)
