"""The multi-adapter serving runtime against PEFT, on tiny random Llama models."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from loralens.training import batches as B
from loralens.models.classifier import CausalLMClassifier
from loralens.serving import LoraAdapter, MultiLoraClassifier

EOS = 2
TOL = 1e-5


def lora_classifier(base, num_labels, seed, r=8, alpha=16.0, targets=("q_proj", "v_proj"),
                    **extra):
    """A PEFT LoRA classifier on a fresh copy of ``base`` with random (non-zero) factors."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = CausalLMClassifier(copy.deepcopy(base), num_labels)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.05, target_modules=list(targets),
                     modules_to_save=["score"], bias="none", **extra)
    peft = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.normal_(0, 0.3)
    return peft.eval()


def batch(n=5, seed=0, lo=3, hi=14):
    rng = np.random.default_rng(seed)
    rows = [[int(t) for t in rng.integers(10, 4000, size=rng.integers(lo, hi))] for _ in range(n)]
    return B.collate(rows, EOS)


def logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture
def adapters(tiny_backbone, tmp_path):
    """Three saved adapters of different heads, ranks and targets, plus their PeftModels."""
    specs = {"a": dict(num_labels=2, seed=1),
             "b": dict(num_labels=3, seed=2, r=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj")),
             "c": dict(num_labels=2, seed=3, r=8, alpha=12.0, targets=("v_proj", "o_proj"))}
    out = {}
    for name, kw in specs.items():
        peft = lora_classifier(tiny_backbone, **kw)
        peft.save_pretrained(str(tmp_path / name), safe_serialization=True)
        out[name] = (tmp_path / name, peft)
    return out


@pytest.fixture
def runtime(tiny_backbone, adapters):
    rt = MultiLoraClassifier(copy.deepcopy(tiny_backbone))
    for name, (path, _) in adapters.items():
        rt.add_adapter(name, path)
    return rt


def test_reads_peft_directory(adapters):
    path, peft = adapters["b"]
    ad = LoraAdapter.from_dir(path)
    assert ad.num_labels == 3
    assert len(ad.factors) == 2 * 3  # 2 layers x q, k, v
    A, B, s = ad.factors["backbone.layers.0.self_attn.k_proj"]
    assert A.shape == (4, 32) and B.shape == (16, 4) and s == 2.0
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == 4


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_single_adapter_equals_separate_peft(runtime, adapters, name):
    ids, mask = batch()
    ref = logits(adapters[name][1], ids, mask)
    out = runtime(ids, mask, name)
    assert out.shape == ref.shape
    assert maxdiff(out, ref) <= TOL
    for i in range(len(ids)):  # batch 1, unpadded
        n = int(mask[i].sum())
        one = runtime(ids[i:i + 1, :n], mask[i:i + 1, :n], name)
        assert maxdiff(one, logits(adapters[name][1], ids[i:i + 1, :n], mask[i:i + 1, :n])) <= TOL


def test_mixed_batch_equals_separate_peft_with_ragged_heads(runtime, adapters):
    ids, mask = batch(7, seed=1)
    names = ["a", "b", "c", "a", "b", "b", "c"]
    out = runtime(ids, mask, names)
    assert out.shape == (7, 3)
    refs = {n: logits(p, ids, mask) for n, (_, p) in adapters.items()}
    for i, n in enumerate(names):
        k = refs[n].shape[1]
        assert maxdiff(out[i, :k], refs[n][i]) <= TOL
        assert torch.isneginf(out[i, k:]).all()
    # a mixed batch of two-label heads has no padding column
    two = runtime(ids[:2], mask[:2], ["a", "c"])
    assert two.shape == (2, 2) and torch.isfinite(two).all()


def test_mixed_batch_equals_peft_adapter_names(tiny_backbone, tmp_path):
    """PeftModel's own mixed-batch inference (adapter_names), heads of equal width."""
    from peft import PeftModel

    names = ["x", "y", "z"]
    for i, n in enumerate(names):
        lora_classifier(tiny_backbone, 2, seed=10 + i).save_pretrained(str(tmp_path / n))
    peft = PeftModel.from_pretrained(CausalLMClassifier(copy.deepcopy(tiny_backbone), 2),
                                     str(tmp_path / "x"), adapter_name="x")
    for n in names[1:]:
        peft.load_adapter(str(tmp_path / n), adapter_name=n)
    peft.eval()
    rt = MultiLoraClassifier(copy.deepcopy(tiny_backbone))
    for n in names:
        rt.add_adapter(n, tmp_path / n)
    ids, mask = batch(6, seed=2)
    rows = ["z", "x", "y", "y", "x", "z"]
    ref = logits(peft, ids, mask, adapter_names=rows)
    assert maxdiff(rt(ids, mask, rows), ref) <= TOL
    for n in names:  # and PEFT's set_adapter path, whole batch
        peft.set_adapter(n)
        assert maxdiff(rt(ids, mask, n), logits(peft, ids, mask)) <= TOL


def test_from_peft_in_memory_equals_from_dir(adapters, tiny_backbone):
    rt = MultiLoraClassifier(copy.deepcopy(tiny_backbone))
    rt.add_adapter("b", LoraAdapter.from_peft(adapters["b"][1]))
    ids, mask = batch()
    assert maxdiff(rt(ids, mask, "b"), logits(adapters["b"][1], ids, mask)) <= TOL


def test_add_and_remove_at_run_time(runtime, adapters, tiny_backbone):
    ids, mask = batch(4, seed=3)
    refs = {n: logits(p, ids, mask) for n, (_, p) in adapters.items()}
    base_state = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    assert runtime(ids, mask, "b").shape[1] == 3
    runtime.remove_adapter("b")           # the rank-4, 3-label adapter in the middle
    assert runtime.adapters == ["a", "c"]
    assert runtime.heads.shape[:2] == (2, 2)
    k_proj = runtime.wrapped["layers.0.self_attn.k_proj"]
    assert k_proj.At.shape[2] == 0 and not any(k_proj.has)  # only "b" adapted k_proj
    for n in ("a", "c"):
        assert maxdiff(runtime(ids, mask, n), refs[n]) <= TOL
    with pytest.raises(KeyError):
        runtime(ids, mask, "b")
    with pytest.raises(ValueError):
        runtime.add_adapter("a", adapters["a"][0])
    runtime.add_adapter("b2", adapters["b"][0])
    assert maxdiff(runtime(ids, mask, "b2"), refs["b"]) <= TOL
    mixed = runtime(ids, mask, ["b2", "a", "c", "b2"])
    for i, n in enumerate(["b", "a", "c", "b"]):
        k = refs[n].shape[1]
        assert maxdiff(mixed[i, :k], refs[n][i]) <= TOL
    for n in list(runtime.adapters):
        runtime.remove_adapter(n)
    # the frozen base is never modified: with no adapter the projections are the base's
    for k, v in runtime.backbone.state_dict().items():
        torch.testing.assert_close(v, base_state[k], rtol=0, atol=0)


def test_single_and_mixed_paths_agree(runtime):
    ids, mask = batch(4, seed=4)
    same = runtime(ids, mask, ["a"] * 4)  # all rows one adapter: the single path
    mixed = runtime(torch.cat([ids, ids]), torch.cat([mask, mask]), ["a"] * 4 + ["c"] * 4)
    assert maxdiff(same, mixed[:4]) <= TOL
    assert maxdiff(runtime(ids, mask, "c"), mixed[4:]) <= TOL


def test_merged_equals_separate(adapters):
    ids, mask = batch(5, seed=5)
    for name, (path, peft) in adapters.items():
        ref = logits(peft, ids, mask)
        merged = copy.deepcopy(peft).merge_and_unload()
        assert isinstance(merged, CausalLMClassifier)
        assert maxdiff(logits(merged, ids, mask), ref) <= TOL


def test_unsupported_adapter_configs_are_errors(tiny_backbone, tmp_path):
    peft = lora_classifier(tiny_backbone, 2, seed=0, use_dora=True)
    peft.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(NotImplementedError, match="use_dora"):
        LoraAdapter.from_dir(tmp_path / "dora")
    with pytest.raises(FileNotFoundError):
        LoraAdapter.from_dir(tmp_path / "missing")


def test_rslora_scaling(tiny_backbone, tmp_path):
    peft = lora_classifier(tiny_backbone, 2, seed=4, r=4, alpha=6.0, use_rslora=True)
    peft.save_pretrained(str(tmp_path / "rs"))
    rt = MultiLoraClassifier(copy.deepcopy(tiny_backbone))
    rt.add_adapter("rs", tmp_path / "rs")
    ids, mask = batch()
    assert maxdiff(rt(ids, mask, "rs"), logits(peft, ids, mask)) <= TOL


# --------------------------------------------------------------------------- bench statistics

def test_summarize():
    from loralens.core.timing import summarize

    s = summarize([0.010, 0.020, 0.030, 0.040], rows=8)
    assert s["n"] == 4 and s["mean_ms"] == pytest.approx(25.0) and s["p50_ms"] == pytest.approx(25.0)
    assert s["throughput_rps"] == pytest.approx(8 / 0.1)
    assert s["sd_ms"] == pytest.approx(np.std([10, 20, 30, 40], ddof=1))


def test_paired_compare_against_independent_values():
    """Wilcoxon signed-rank, exact: n positive differences of distinct sizes give the
    two-sided p = 2 / 2**n (only the all-positive sign pattern is as extreme on each side)."""
    from loralens.serving.bench.results import paired_compare

    # requests of very different lengths (20 to 400 ms); the kind costs 1-8 ms more on each
    base = np.array([0.02, 0.4, 0.05, 0.3, 0.1, 0.25, 0.03, 0.35])
    x = base + np.arange(1, 9) * 1e-3
    c = paired_compare([x], [base])
    assert c["p_wilcoxon"] == pytest.approx(2 / 2**8)          # 0.0078125
    assert c["pairs"] == 8 and c["seeds"] == 1
    assert c["median_diff_ms"] == pytest.approx(4.5)
    assert c["overhead_pct"] == pytest.approx(36e-3 / base.sum() * 100)
    lo, hi = c["overhead_ci_pct"]
    assert 0 < lo < c["overhead_pct"] < hi
    # the same data pooled, unpaired: the request lengths drown the difference
    from scipy import stats
    assert stats.mannwhitneyu(x, base).pvalue > 0.5
    # one difference of the other sign, the smallest: rank 1 -> W- = 1, p = 2 * 2 / 2**8
    y = x.copy()
    y[0] = base[0] - 0.5e-3
    assert paired_compare([y], [base])["p_wilcoxon"] == pytest.approx(4 / 2**8)
    # several seeds: the per-request difference is averaged over the seeds first
    two = paired_compare([x, x + 2e-3], [base, base])
    assert two["seeds"] == 2 and two["median_diff_ms"] == pytest.approx(5.5)
    assert two["p_wilcoxon"] == pytest.approx(2 / 2**8)
    # exact ratio: 20% on every request, interval [20, 20]
    r = paired_compare([base * 1.2], [base])
    assert r["overhead_pct"] == pytest.approx(20.0)
    assert r["overhead_ci_pct"] == pytest.approx([20.0, 20.0])
    # no difference at all: p undefined (never "significant")
    same = paired_compare([base], [base.copy()])
    assert same["p_wilcoxon"] is None and same["overhead_pct"] == 0.0
    with pytest.raises(ValueError, match="one shape"):
        paired_compare([x], [base[:-1]])


def _seed_result(latency_s: dict) -> dict:
    return {"methods": ["full", "lora"], "memory": {}, "batch": {"1": {"kinds": {
        k: {"latency_s": list(v)} for k, v in latency_s.items()}}}}


def test_table5_sd_is_across_seeds_and_the_test_pairs_by_request():
    from loralens.serving.bench.results import PAIRED_TEST, comparison

    base = np.array([0.02, 0.4, 0.05, 0.3, 0.1, 0.25, 0.03, 0.35])
    up = np.arange(1, 9) * 1e-3
    res = {"seeds": {"1": _seed_result({"full": base, "lora_separate": base + up}),
                     "2": _seed_result({"full": base + 0.01, "lora_separate": base + 0.01 + up}),
                     "3": _seed_result({"lora_separate": base + 0.03})}}  # no full model
    rows = {r["kind"]: r for r in comparison("sst2", res, [1])}
    sep, full = rows["lora_separate"], rows["full"]
    means = [1e3 * (base + up).mean(), 1e3 * (base + 0.01 + up).mean(), 1e3 * (base + 0.03).mean()]
    assert sep["seeds"] == 3 and sep["n"] == 24
    assert sep["mean_ms"] == pytest.approx(np.mean(means))
    assert sep["seed_means_sd_ms"] == pytest.approx(np.std(means, ddof=1))
    assert full["seed_means_sd_ms"] == pytest.approx(np.std([1e3 * base.mean(),
                                                             1e3 * (base.mean() + 0.01)], ddof=1))
    # paired on seeds 1 and 2 only (seed 3 has no full model), by request
    assert sep["paired_seeds_vs_full"] == [1, 2] and sep["pairs_vs_full"] == 8
    assert sep["p_vs_full"] == pytest.approx(2 / 2**8) and sep["test_vs_full"] == PAIRED_TEST
    assert sep["median_diff_ms_vs_full"] == pytest.approx(4.5)
    assert "p_vs_full" not in full and "p_welch_vs_full" not in sep
    one = comparison("rte", {"seeds": {"1": _seed_result({"full": base})}}, [1])[0]
    assert one["seed_means_sd_ms"] is None  # one seed: no sd


def test_memory_probe_sees_an_allocation():
    from loralens.serving.bench.measure import MemoryProbe

    with MemoryProbe(torch.device("cpu")) as probe:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    mem = probe.to_dict()
    assert mem["peak_increase_mb"] >= 60 and mem["peak_mb"] >= mem["peak_increase_mb"]


def test_adapter_for_another_model_is_rejected_without_changes(runtime, adapters):
    ad = LoraAdapter.from_dir(adapters["a"][0])
    ad.factors["backbone.layers.9.self_attn.q_proj"] = ad.factors.pop(
        "backbone.layers.0.self_attn.q_proj")
    with pytest.raises(ValueError, match="layers.9"):
        runtime.add_adapter("bad", ad)
    assert runtime.adapters == ["a", "b", "c"]
    assert all(len(m.has) == 3 for m in runtime.wrapped.values())
    ids, mask = batch()
    assert maxdiff(runtime(ids, mask, "a"), logits(adapters["a"][1], ids, mask)) <= TOL


def test_bench_seeds_select_the_models(tmp_path):
    from loralens.study.config import load_config
    from loralens.serving.bench.stage import run_bench
    from loralens.core.errors import RunDirError
    from loralens.core.run_dir import RunDir
    from loralens.core.files import atomic_write_json

    run = RunDir(tmp_path / "run")
    atomic_write_json(run.job_dir("sst2", "lora", 42) / "metrics.json", {"score": 0.5})
    cfg = load_config(overrides=["bench.seeds=[7, 8]"])
    with pytest.raises(RunDirError, match=r"no finished jobs to benchmark among seeds \[7, 8\]"):
        run_bench(cfg, run, n_requests=1)
    assert load_config("quick").bench.seeds == [42]
