"""Which path serves which method (serving/paths.py): the one rule, checked against what the
lean runtime really computes. For every built-in PEFT method an adapter with random
(non-zero) weights is saved as training saves it; where the rule says the runtime is exact,
its logits equal PEFT's own forward; where it says not, the runtime refuses the adapter
(and for PiSSA/OLoRA, serving the saved factors on the unchanged base would be wrong)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from loralens.study.config import load_config
from loralens.models.methods import BUILTIN, get_method, make_trainable, method_from_def
from loralens.models.classifier import CausalLMClassifier
from loralens.models.saving import load_trained, save_trained
from loralens.serving.bench.identity import head_logits
from loralens.models.serving_paths import (
    LEAN, MERGED, PEFT, WHOLE, adapter_name, lean_inexact, serving_kinds, split_kind,
)
from loralens.serving.runtime import LoraAdapter, MultiLoraClassifier

CFG = load_config(overrides=["model.name=tiny-random"])
LEAN_METHODS = {"lora", "rslora", "lora-all-linear", "loraplus"}
IDS = torch.tensor([[5, 60, 70, 80, 9, 11, 300], [7, 8, 9, 2, 2, 2, 2]])
MASK = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0]])


def _save(backbone, method, out, seed=0):
    """A classifier made trainable for ``method``, its trainable weights moved off their
    initialisation (LoRA's B starts at 0), saved as a job's adapter/ or model/."""
    torch.manual_seed(seed)
    model = make_trainable(CausalLMClassifier(copy.deepcopy(backbone), 2), method)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    sub = "adapter" if method.is_adapter else "model"
    save_trained(model.eval(), method.name, out / sub)
    return out / sub


def test_the_rule_per_builtin_method():
    exact = {name for name in BUILTIN if lean_inexact(get_method(name, CFG)) is None}
    assert exact == LEAN_METHODS
    reasons = {name: lean_inexact(get_method(name, CFG)) for name in BUILTIN}
    assert reasons["dora"].startswith("DoRA rescales") and reasons["ia3"].startswith("IA3 ")
    assert "rewrites the base weights" in reasons["pissa"] and reasons["olora"].startswith(
        "olora initialisation")
    assert serving_kinds(get_method("head", CFG)) == {"head": WHOLE}
    assert serving_kinds(get_method("full", CFG)) == {"full": WHOLE}
    assert serving_kinds(get_method("lora", CFG)) == {
        "lora_merged": MERGED, "lora_separate": PEFT, "lora_runtime": LEAN}
    assert serving_kinds(get_method("dora", CFG)) == {"dora_merged": MERGED,
                                                      "dora_separate": PEFT}
    # any rank, alpha, targets and Gaussian initialisation stay exact
    custom = method_from_def("x", {"family": "peft", "peft": {
        "type": "lora", "r": 3, "alpha": 5, "target_modules": ["up_proj", "o_proj"],
        "init_lora_weights": "gaussian", "use_rslora": True}}, CFG)
    assert lean_inexact(custom) is None
    assert adapter_name("sst2", "lora", 42) == "sst2_seed42"
    assert adapter_name("sst2", "dora", 42) == "sst2_dora_seed42"


def test_split_kind_inverts_every_methods_kind_names():
    """Report and benchmark read (method, path) back from a kind's name by one function."""
    names = [*BUILTIN, "lora-r4", "my_full"]  # a name with an underscore, served whole
    defs = {"lora-r4": {"family": "peft", "peft": {"type": "lora", "r": 4}},
            "my_full": {"family": "full"}}
    cfg = load_config(overrides={"model": {"name": "tiny-random"}, "method_defs": defs})
    seen = 0
    for name in names:
        for kind, path in serving_kinds(get_method(name, cfg)).items():
            assert split_kind(kind, name) == (name, path)
            if name != "my_full":  # recorded by the benchmark; a name alone reads back too
                assert split_kind(kind) == (name, path)
            seen += 1
    assert seen >= len(names)
    assert split_kind("lora_runtime") == ("lora", LEAN)
    assert split_kind("dora_separate") == ("dora", PEFT)
    assert split_kind("full") == ("full", WHOLE)
    assert split_kind("my_full") == ("my_full", WHOLE)  # "full" is no path suffix


@pytest.mark.parametrize("name", [n for n in BUILTIN if BUILTIN[n]["family"] == "peft"])
def test_the_rule_matches_the_runtime(name, tiny_backbone, tmp_path):
    method = get_method(name, CFG)
    path = _save(tiny_backbone, method, tmp_path / "job")
    peft = load_trained(tmp_path / "job", copy.deepcopy(tiny_backbone), 2)
    with torch.no_grad():
        want = peft(input_ids=IDS, attention_mask=MASK).logits
    if lean_inexact(method) is not None:
        with pytest.raises((NotImplementedError, ValueError)):
            LoraAdapter.from_dir(path)
        return
    rt = MultiLoraClassifier(copy.deepcopy(tiny_backbone))
    rt.add_adapter("a", path)
    torch.testing.assert_close(rt(IDS, MASK, "a"), want, atol=1e-5, rtol=0)
    assert want.abs().max() > 0.05


@pytest.mark.parametrize("name", ["pissa", "olora"])
def test_base_rewriting_adapters_would_be_wrong_on_the_shared_base(name, tiny_backbone,
                                                                   tmp_path):
    """Why PiSSA/OLoRA go through PEFT: their saved A, B on the unchanged base W (what the
    runtime would compute, were it not refused) are not the trained model, which PEFT
    rebuilds (W - s B0 A0 + s B A) when it loads the adapter."""
    path = _save(tiny_backbone, get_method(name, CFG), tmp_path / "job")
    with torch.no_grad():
        want = load_trained(tmp_path / "job", copy.deepcopy(tiny_backbone), 2)(
            input_ids=IDS, attention_mask=MASK).logits
    naive = tmp_path / "naive"
    shutil.copytree(path, naive)
    cfg = json.loads((naive / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = True
    (naive / "adapter_config.json").write_text(json.dumps(cfg))
    rt = MultiLoraClassifier(copy.deepcopy(tiny_backbone))
    rt.add_adapter("a", naive)
    assert float((rt(IDS, MASK, "a") - want).abs().max()) > 1e-2


def test_rank_and_target_variations_in_the_runtime_equal_peft(tiny_backbone, tmp_path):
    """Adapters of different ranks, alphas (scalings not powers of two), targets (all-linear
    included) and rsLoRA in ONE runtime, single and mixed batches, against each adapter's
    own PeftModel, in float64 (identity there is exact up to ~1e-15)."""
    defs = {"r1": {"r": 1, "alpha": 3.0},
            "r4-qko-up": {"r": 4, "alpha": 7.0,
                          "target_modules": ["q_proj", "k_proj", "o_proj", "up_proj"]},
            "r16-all": {"r": 16, "alpha": 5.0, "target_modules": "all-linear"},
            "r8-rs": {"r": 8, "alpha": 3.0, "use_rslora": True, "target_modules": ["down_proj"]}}
    backbone = copy.deepcopy(tiny_backbone).double()
    rt = MultiLoraClassifier(copy.deepcopy(backbone))
    want = {}
    for i, (name, peft) in enumerate(defs.items()):
        m = method_from_def(name, {"family": "peft", "peft": {"type": "lora", **peft}}, CFG)
        assert lean_inexact(m) is None
        _save(tiny_backbone, m, tmp_path / name, seed=i)
        rt.add_adapter(name, tmp_path / name / "adapter")
        model = load_trained(tmp_path / name, copy.deepcopy(backbone), 2)
        with torch.no_grad():
            want[name] = head_logits(model, IDS, MASK)
    names = list(defs)
    for name in names:
        got = rt(IDS, MASK, name)
        assert float((got - want[name]).abs().max()) <= 1e-12, name
        assert float(want[name].abs().max()) > 0.05
    mixed = rt(IDS, MASK, [names[1], names[2]])
    assert float((mixed[0] - want[names[1]][0]).abs().max()) <= 1e-12
    assert float((mixed[1] - want[names[2]][1]).abs().max()) <= 1e-12
    # the adapters differ: serving one with another's factors would be caught
    assert float((want[names[0]] - want[names[3]]).abs().max()) > 1e-3
