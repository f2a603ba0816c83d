"""The identity checks of the serving paths (serving/identity.py): in float64 equivalent
paths agree far below the tolerance (1e-6 x the logits' scale), and each injected fault (a
row served with another adapter, the alpha/r scaling dropped, another adapter's head)
fails there."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from loralens.serving.bench import identity as I
from loralens.serving.runtime import LoraAdapter, MultiLoraClassifier
from tests.helpers.adapters import random_lora

EOS = 2


def _adapter(backbone, num_labels, seed, job_dir, r=8, alpha=16.0, targets=("q_proj", "v_proj")):
    """A PEFT LoRA classifier with random (non-zero) factors and head, saved as a job's
    adapter/ (the layout ``models.load_trained`` reads)."""
    random_lora(backbone, job_dir / "adapter", seed, r, alpha, targets, num_labels)


def _rows(n, seed, lo=3, hi=12):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(10, 4000, size=rng.integers(lo, hi))] for _ in range(n)]


@pytest.fixture
def three(tiny_backbone, tmp_path):
    """Three adapters with 2-label heads (r=8 alpha=16: s=2; r=4 alpha=12: s=3), 5 examples
    each of different lengths (padded batches)."""
    specs = [dict(seed=1), dict(seed=2, r=4, alpha=12.0, targets=("q_proj", "k_proj", "v_proj")),
             dict(seed=3, targets=("v_proj", "o_proj"))]
    out = []
    for i, kw in enumerate(specs):
        job = tmp_path / f"job{i}"
        _adapter(tiny_backbone, 2, job_dir=job, **kw)
        out.append(I.Adapter(f"t{i}_seed{i}", job, job / "adapter", 2, _rows(5, seed=i)))
    return out


def _run(backbone, adapters, runtime_cls=MultiLoraClassifier, batch_sizes=(1, 3)):
    return {c["name"]: c for c in I.run_identity(
        backbone, adapters, list(batch_sizes), [0, 1, 2], 4, EOS, torch.device("cpu"),
        runtime_cls=runtime_cls)}


def _float64(backbone):
    return copy.deepcopy(backbone).to(torch.float64).eval()


def test_every_path_agrees_in_float64(tiny_backbone, three):
    exact = _run(_float64(tiny_backbone), three)
    singles = {f"t{i}/seed{i}/batch{b}: {p} == separate"
               for i in range(3) for b in (1, 3) for p in ("runtime", "merged")}
    multis = {"multi stream: runtime == single adapter", "multi stream: peft == single adapter",
              "multi mixed batch: runtime == single adapter",
              "multi mixed batch: peft_adapter_names == single adapter"}
    assert set(exact) == singles | multis
    for name, c in exact.items():
        assert c["rows"] == (5 if name in singles else 15), name
        assert c["max_abs_diff"] <= 1e-12 and c["same_predictions"], (name, c)
        assert c["max_abs_logit"] > 0.1  # the logits are not trivially zero
    # float32: the same paths differ by rounding, relative to the logits' scale
    served = _run(tiny_backbone, three)
    assert max(c["max_abs_diff"] for c in served.values()) > 1e-9
    assert max(c["relative_diff"] for c in served.values()) < 1e-5
    combined = {c["name"]: c for c in I.combine(list(exact.values()), list(served.values()))}
    assert all(c["passed"] for c in combined.values())
    c = combined["multi mixed batch: runtime == single adapter"]
    assert c["float64"]["max_abs_diff"] == exact[c["name"]]["max_abs_diff"]
    assert c["serving_dtype"]["relative_diff"] == served[c["name"]]["relative_diff"]


def test_agreement_against_hand_values():
    pairs = [(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])),
             (torch.tensor([0.5, -3.0]), torch.tensor([0.5, -3.0]))]
    assert I.agreement(pairs) == {"rows": 2, "max_abs_diff": 2.0, "max_abs_logit": 4.0,
                                  "relative_diff": 0.5, "same_predictions": True}
    flipped = I.agreement([(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 4.0]))])
    assert flipped["max_abs_diff"] == 2.0 and not flipped["same_predictions"]
    # the verdict: max |diff| <= tol x max(1, max |logit|), on the float64 numbers only
    rec = I.combine([{"name": "x", **I.agreement(pairs)}], None, tol=0.5)[0]   # 2 <= 0.5 x 4
    assert rec["passed"] and rec["serving_dtype"] is None
    assert not I.combine([{"name": "x", **I.agreement(pairs)}], None, tol=0.499)[0]["passed"]
    small = {"max_abs_diff": 1e-6, "max_abs_logit": 0.01}  # logits below 1: scale 1
    assert I.passes(small) and not I.passes({**small, "max_abs_diff": 1.01e-6})


def test_workloads_cover_every_row():
    assert I.single_batches(0, 5, 2) == [[(0, 0), (0, 1)], [(0, 2), (0, 3)], [(0, 4)]]
    assert I.stream_batches([2, 0], 2) == [[(2, 0)], [(0, 0)], [(2, 1)], [(0, 1)]]
    assert I.mixed_batches([0, 1, 2], 2, 4) == [[(0, 0), (1, 0), (2, 0), (0, 1)],
                                                [(1, 1), (2, 1)]]


# --------------------------------------------------------------------------- injected faults

def _failed(checks: dict) -> set[str]:
    """The checks that fail at the float64 tolerance (1e-6 x max(1, max |logit|))."""
    return {c["name"] for c in I.combine(list(checks.values()), None) if not c["passed"]}


def test_fault_row_served_with_the_wrong_adapter(tiny_backbone, three):
    class WrongRow(MultiLoraClassifier):
        def forward(self, input_ids, attention_mask, adapters):
            if not isinstance(adapters, str) and len(set(adapters)) > 1:  # mixed batches only
                adapters = list(adapters)
                adapters[0] = next(a for a in self.adapters if a != adapters[0])
            return super().forward(input_ids, attention_mask, adapters)

    checks = _run(_float64(tiny_backbone), three, WrongRow, batch_sizes=(1,))
    assert _failed(checks) == {"multi mixed batch: runtime == single adapter"}
    assert checks["multi mixed batch: runtime == single adapter"]["max_abs_diff"] > 1e-3


def test_fault_scaling_dropped(tiny_backbone, three):
    class NoScaling(MultiLoraClassifier):
        def add_adapter(self, name, adapter):
            ad = LoraAdapter.from_dir(adapter)
            ad.factors = {k: (A, B, 1.0) for k, (A, B, s) in ad.factors.items()}
            super().add_adapter(name, ad)

    checks = _run(_float64(tiny_backbone), three, NoScaling, batch_sizes=(2,))
    assert _failed(checks) == {c for c in checks if "runtime" in c}
    assert min(c["max_abs_diff"] for n, c in checks.items() if "runtime" in n) > 1e-3


def test_fault_head_of_another_adapter(tiny_backbone, three):
    class ForeignHead(MultiLoraClassifier):
        def add_adapter(self, name, adapter):
            ad = LoraAdapter.from_dir(adapter)
            if self.adapters:  # every later adapter gets the first one's head
                ad.head_weight = LoraAdapter.from_dir(three[0].weights_dir).head_weight
            super().add_adapter(name, ad)

    checks = _run(_float64(tiny_backbone), three, ForeignHead, batch_sizes=(1,))
    assert _failed(checks) == {"t1/seed1/batch1: runtime == separate",
                               "t2/seed2/batch1: runtime == separate",
                               "multi stream: runtime == single adapter",
                               "multi mixed batch: runtime == single adapter"}


# --------------------------------------------------------------------------- the bench stage

def test_bench_stage_records_float64_identity(tmp_path, glue_dir, tiny_base):
    """``run_bench`` on the tiny random model: checks come from the float64 identity run,
    the serving dtype's differences are recorded beside them, Table 5 pairs by request."""
    from loralens.study.config import load_config
    from loralens.models.classifier import apply_method, build_classifier
    from loralens.models.methods import get_method
    from loralens.models.saving import save_trained
    from loralens.serving.bench.stage import run_bench, summary_lines
    from loralens.core.run_dir import RunDir
    from loralens.core.files import atomic_write_json, read_json

    cfg = load_config(overrides=["model.name=tiny-random", "tasks=[sst2, rte]", "seeds=[1]",
                                 f"data.glue_dir={glue_dir}", "data.max_length=48"])
    run = RunDir(tmp_path / "run")
    run.bind_config(cfg)
    for task, method in [("sst2", "lora"), ("sst2", "full"), ("rte", "lora")]:
        model = apply_method(build_classifier(tiny_base.backbone(), 2, 1), method, cfg)
        if method == "lora":
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n or "modules_to_save" in n:
                        p.normal_(0, 0.3)
        save_trained(model, method, run.weights_dir(task, method, 1,
                                                    adapter=get_method(method).is_adapter))
        atomic_write_json(run.metrics_path(task, method, 1),
                          {"task": task, "method": method, "seed": 1})
    res = run_bench(cfg, run, warmup=1, n_requests=4, progress=False, mixed_batch_size=3,
                    threads=1, base=tiny_base, identity_examples=3)
    ident = res["identity"]
    assert (ident["dtype"], ident["tolerance"], ident["serving_dtype"]) == \
        ("float64", 1e-6, "float32")
    assert res["checks"] == {c["name"]: True for c in ident["checks"]}
    assert set(res["checks"]) == {
        "sst2/seed1/batch1: runtime == separate", "sst2/seed1/batch1: merged == separate",
        "rte/seed1/batch1: runtime == separate", "rte/seed1/batch1: merged == separate",
        "multi stream: runtime == single adapter", "multi stream: peft == single adapter",
        "multi mixed batch: runtime == single adapter",
        "multi mixed batch: peft_adapter_names == single adapter"}
    for c in ident["checks"]:
        assert c["rows"] == (3 if c["workload"] == "single" else 6)
        assert c["float64"]["max_abs_diff"] <= 1e-12
        assert c["serving_dtype"]["relative_diff"] < 1e-5
    sep = next(r for r in res["comparison"] if r["kind"] == "lora_separate")
    assert sep["pairs_vs_full"] == 4 and sep["test_vs_full"].startswith("wilcoxon")
    assert "within_tol" not in str(res["tasks"]) and "tolerance" not in res
    assert read_json(run.serving_path)["identity"] == ident
    assert (run.bench_dir / "identity.csv").read_text().count("\n") == 1 + 8
    lines = summary_lines(res)
    assert lines[-1].startswith("identity checks in float64 (max |Δ logit| <= 1e-06 × max(1, "
                                "max |logit|)): 8/8 passed; in float32 max |diff| / max |logit| "
                                "up to ")
