"""Integration: the serving runtime on SmolLM2 with real GLUE rows; the bench stage end to end."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch

from loralens.tasks import sources as TS
from loralens.training import batches as B
from loralens.core.config import StudyConfig
from loralens.study.config import load_config
from loralens.models.classifier import CausalLMClassifier, apply_method, build_classifier
from loralens.models.methods import get_method
from loralens.models.saving import save_trained
from loralens.serving import MultiLoraClassifier
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json
from loralens.tasks.registry import get_task

from tests.helpers.adapters import randomize_lora

TOL = 1e-5


def rows(tokenizer, glue_dir, task, n):
    split = TS.load_split(get_task(task), "validation", glue_dir)
    split.examples = split.examples[:n]
    return B.encode_split(tokenizer, split, 384).input_ids


@pytest.fixture(scope="module")
def smol_adapters(smollm2, tmp_path_factory):
    """Two random r=8 q/v adapters (sst2- and rte-like) saved in PEFT format."""
    cfg = StudyConfig()
    pristine = smollm2.backbone().eval()
    out = {}
    for i, name in enumerate(["sst2", "rte"]):
        peft = randomize_lora(apply_method(build_classifier(copy.deepcopy(pristine), 2, seed=i),
                                           "lora", cfg), seed=100 + i)
        path = tmp_path_factory.mktemp("adapters") / name
        peft.save_pretrained(str(path), safe_serialization=True)
        out[name] = (path, peft)
    return pristine, out


def test_runtime_equals_peft_on_smollm2_and_glue(smol_adapters, tokenizer, glue_dir):
    from peft import PeftModel

    pristine, adapters = smol_adapters
    rt = MultiLoraClassifier(copy.deepcopy(pristine))
    for name, (path, _) in adapters.items():
        rt.add_adapter(name, path)
    data = {t: rows(tokenizer, glue_dir, t, 3) for t in adapters}
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        for name, (_, peft) in adapters.items():
            for x in data[name]:  # batch 1, as served
                ids = torch.tensor([x])
                mask = torch.ones_like(ids)
                ref = peft(input_ids=ids, attention_mask=mask).logits
                assert (rt(ids, mask, name) - ref).abs().max().item() <= TOL
        # a mixed batch of sst2 and rte rows against separate PeftModels on the same batch
        mixed = [data["sst2"][0], data["rte"][0], data["sst2"][1], data["rte"][1]]
        names = ["sst2", "rte", "sst2", "rte"]
        ids, mask = B.collate(mixed, pad)
        out = rt(ids, mask, names)
        for i, n in enumerate(names):
            ref = adapters[n][1](input_ids=ids, attention_mask=mask).logits[i]
            assert (out[i] - ref).abs().max().item() <= TOL
        # and against PEFT's own adapter_names on one PeftModel (distinct adapter names)
        multi = PeftModel.from_pretrained(CausalLMClassifier(copy.deepcopy(pristine), 2),
                                          str(adapters["sst2"][0]), adapter_name="sst2")
        multi.load_adapter(str(adapters["rte"][0]), adapter_name="rte")
        multi.eval()
        ref = multi(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        assert (out - ref).abs().max().item() <= TOL
    # the shared base weights were never modified
    for k, v in pristine.state_dict().items():
        w = rt.backbone.state_dict()[k]
        assert torch.equal(v, w), k


# --------------------------------------------------------------------------- bench stage

@pytest.fixture(scope="module")
def tiny_run(tokenizer, glue_dir, tmp_path_factory):
    """A run directory with a tiny random Llama as its model and job directories built
    directly (saved models + a minimal metrics.json) instead of training."""
    from transformers import AutoModel

    from loralens.models.tiny import tiny_llama_config

    root = tmp_path_factory.mktemp("run")
    model_dir = root / "tiny-model"
    torch.manual_seed(0)
    AutoModel.from_config(tiny_llama_config()).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    cfg = load_config(overrides={"tasks": ["sst2", "rte"], "seeds": [1, 2],
                                 "model": {"name": str(model_dir)},
                                 "data": {"glue_dir": str(glue_dir), "max_length": 64}})
    run = RunDir(root / "run")
    run.bind_config(cfg)
    for task, method, seed in [("sst2", "lora", 1), ("sst2", "lora", 2), ("sst2", "full", 1),
                               ("rte", "lora", 1)]:
        backbone = AutoModel.from_pretrained(str(model_dir))
        model = apply_method(build_classifier(backbone, 2, seed), method, cfg)
        if method == "lora":
            randomize_lora(model, seed=seed)
        save_trained(model, method, run.weights_dir(task, method, seed,
                                                    adapter=get_method(method).is_adapter))
        atomic_write_json(run.metrics_path(task, method, seed),
                          {"task": task, "method": method, "seed": seed})
    return cfg, run


def test_run_bench_on_tiny_run(tiny_run):
    from loralens.models.classifier import load_base
    from loralens.serving.bench.stage import run_bench, summary_lines

    cfg, run = tiny_run
    res = run_bench(cfg, run, batch_sizes=(1, 2), warmup=2, n_requests=6, progress=False,
                    mixed_batch_size=4, threads=1, base=load_base(cfg))
    # identity checks: 3 adapters x 2 batch sizes x (runtime, merged), and the multi-adapter
    # stream and mixed batches through our runtime and PEFT; float64 verdict
    assert all(res["checks"].values()) and len(res["checks"]) == 3 * 2 * 2 + 4, res["checks"]
    ident = res["identity"]
    assert ident["dtype"] == "float64" and ident["tolerance"] == 1e-6
    assert ident["serving_dtype"] == res["dtype"] == "float32"
    for c in ident["checks"]:
        assert c["float64"]["max_abs_diff"] <= 1e-12 and c["float64"]["same_predictions"], c
        assert c["serving_dtype"]["relative_diff"] < 1e-4, c
        assert c["rows"] == (6 if c["workload"] == "single" else 18), c
    sst2 = res["tasks"]["sst2"]
    assert sst2["examples"] == 6 and set(sst2["seeds"]) == {"1", "2"}
    one = sst2["seeds"]["1"]["batch"]["1"]["kinds"]
    assert set(one) == {"full", "lora_merged", "lora_separate", "lora_runtime"}
    assert set(sst2["seeds"]["2"]["batch"]["2"]["kinds"]) == {"lora_merged", "lora_separate",
                                                              "lora_runtime"}
    k = one["lora_runtime"]
    assert k["n"] == 6 and k["p95_ms"] >= k["p50_ms"] > 0 and k["throughput_rps"] > 0
    assert sst2["seeds"]["2"]["batch"]["2"]["kinds"]["lora_runtime"]["n"] == 3
    mem = sst2["seeds"]["1"]["memory"]
    assert mem["full"]["peak_mb"] > 0
    # separate LoRA holds base + adapter + both heads; the runtime shares one base
    assert mem["lora_separate"]["weights_mb"] > mem["lora_merged"]["weights_mb"] > 0
    assert mem["lora_merged"]["weights_mb"] == pytest.approx(mem["full"]["weights_mb"])
    # Table 5: every kind vs full fine-tuning for sst2, seeds pooled
    table = [r for r in res["comparison"] if r["task"] == "sst2" and r["batch_size"] == 1]
    sep = next(r for r in table if r["kind"] == "lora_separate")
    assert sep["seeds"] == 2 and sep["n"] == 12
    # paired by request with full fine-tuning, on the one seed that has both: the p-value
    # recomputed from requests.csv (the raw latencies) with scipy directly
    from scipy import stats

    assert sep["paired_seeds_vs_full"] == [1] and sep["pairs_vs_full"] == 6
    with open(run.bench_dir / "requests.csv") as f:
        timed = [r for r in csv.DictReader(f) if r["task"] == "sst2" and r["seed"] == "1"
                 and r["batch_size"] == "1"]
    lat = {k: [float(r["latency_ms"]) for r in sorted(timed, key=lambda r: int(r["request"]))
               if r["kind"] == k] for k in ("lora_separate", "full")}
    diff = [a - b for a, b in zip(lat["lora_separate"], lat["full"])]
    assert sep["p_vs_full"] == pytest.approx(stats.wilcoxon(diff).pvalue, rel=1e-6)
    assert sep["overhead_vs_full_pct"] == pytest.approx(
        (sum(lat["lora_separate"]) / sum(lat["full"]) - 1) * 100, rel=1e-6)
    assert sep["seed_means_sd_ms"] > 0 and len(sep["overhead_vs_full_ci"]) == 2
    assert not any("overhead_vs_full_pct" in r for r in res["comparison"] if r["task"] == "rte")
    # several adapters of different tasks on one base
    multi = res["multi"]
    assert multi["adapters"] == ["sst2_seed1", "rte_seed1", "sst2_seed2"]  # tasks first
    assert multi["different_tasks"]
    assert {c["path"] for c in ident["checks"] if c["workload"] == "stream"} == {"runtime", "peft"}
    assert {c["path"] for c in ident["checks"] if c["workload"] == "mixed"} == {
        "runtime", "peft_adapter_names"}
    assert multi["mixed"]["runtime"]["throughput_vs_merged"] > 0
    # files
    out = run.bench_dir
    data = json.loads(run.serving_path.read_text())
    assert data["checks"] == res["checks"]
    with open(out / "requests.csv") as f:
        reqs = list(csv.DictReader(f))
    # sst2: 3 kinds x 2 seeds + full x 1, at 6 + 3 requests; rte: 3 kinds at 6 + 3
    assert len(reqs) == (3 * 2 + 1) * 9 + 3 * 9
    for name in ("latency.csv", "comparison.csv", "multi.csv"):
        assert (out / name).read_text().count("\n") > 1
    assert (out / "identity.csv").read_text().count("\n") == 1 + 16
    with open(out / "latency.csv") as f:
        latency = list(csv.DictReader(f))
    assert len(latency) == (3 * 2 + 1 + 3) * 2 and "latency_s" not in latency[0]
    assert {r["kind"] for r in latency} == {"full", "lora_merged", "lora_separate",
                                           "lora_runtime"}
    with open(out / "multi.csv") as f:
        multi_rows = list(csv.DictReader(f))
    assert [(r["section"], r["path"]) for r in multi_rows] == [
        ("stream", "runtime"), ("stream", "peft"), ("mixed", "runtime"),
        ("mixed", "merged_single_model"), ("mixed", "peft_adapter_names")]
    assert multi["stream"]["runtime"]["switch_median_ms"] >= 0
    assert multi["runtime_load_adapter_s"] > 0 and multi["peft_load_adapter_s"] > 0
    assert any("vs full" in line for line in summary_lines(res))
