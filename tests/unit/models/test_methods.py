"""Methods as data (:mod:`loralens.models.methods`) on the tiny random model: the registry and its
validation, each family's trainable parameters checked against plain PEFT, save/load
round trips read back by PEFT's own loader, and the stages that refuse a method they
cannot handle yet."""

import json
import math

import numpy as np
import pytest
import torch

from loralens import cli
from loralens.core.errors import ConfigError
from loralens.core.config import StudyConfig
from loralens.study.config import load_config
from loralens.training.loop import evaluate
from loralens.models.methods import BUILTIN, get_method, peft_config
from loralens.models.classifier import apply_method, build_classifier
from loralens.models.saving import load_trained, save_trained
from loralens.core.run_dir import RunDir
from tests.helpers.training import EOS, fit_tiny, tiny_encoded
from tests.helpers.overrides import tiny


def cfg_with(*overrides: str) -> StudyConfig:
    return load_config(overrides=list(overrides))


def _model(backbone, method, cfg=None):
    return apply_method(build_classifier(backbone, 2, seed=0), method, cfg or StudyConfig())


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- the registry

def test_builtins_resolve_and_the_study_lora_is_the_lora_section():
    cfg = StudyConfig()
    for name in BUILTIN:
        assert get_method(name, cfg).name == name
    lora = get_method("lora", cfg)
    assert lora.family == "peft" and lora.peft == {
        "type": "lora", "r": 8, "alpha": 16.0, "dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"], "use_rslora": False, "use_dora": False,
        "init_lora_weights": True}
    # the lora section reaches every LoRA-type method that does not set its own value
    cfg16 = cfg_with("lora.r=16")
    assert get_method("lora", cfg16).peft["r"] == 16 and get_method("dora", cfg16).peft["r"] == 16
    assert get_method("lora-all-linear", cfg).peft["target_modules"] == "all-linear"
    assert get_method("head", cfg).family == "head" and get_method("head", cfg).peft == {}


def test_methods_and_method_defs_in_the_config():
    cfg = cfg_with("methods=[full,head,lora,dora,r4]",
                   "method_defs={r4: {family: peft, peft: {type: lora, r: 4, "
                   "target_modules: all-linear}}}")
    assert cfg.methods == ["full", "head", "lora", "dora", "r4"]
    r4 = get_method("r4", cfg)
    assert r4.peft["r"] == 4 and r4.peft["alpha"] == 16.0  # alpha from the lora section
    assert cfg.reference_method == "full"


@pytest.mark.parametrize("override, message", [
    ("methods=[lora,qlora]", "methods: unknown method 'qlora'; known: full, head, lora"),
    ("methods=[lora,lora]", "methods: ['lora', 'lora'] names a method twice"),
    ("method_defs={x: {family: adapter}}",
     "method_defs.x.family: 'adapter' is not one of ['full', 'head', 'peft']"),
    ("method_defs={x: {family: peft}}", "method_defs.x.peft: a peft method needs its PEFT"),
    ("method_defs={x: {family: full, peft: {r: 2}}}",
     "method_defs.x.peft: a full method takes no PEFT config"),
    ("method_defs={x: {family: peft, peft: {type: lora, rank: 2}}}",
     "method_defs.x.peft.rank: unknown key for a lora method; known: type, r, alpha"),
    ("method_defs={x: {family: peft, peft: {type: lora, r: 0}}}",
     "method_defs.x.peft.r: 0 is not an integer rank in [1, 1024]"),
    ("method_defs={x: {family: peft, peft: {type: lora, dropout: 2}}}",
     "method_defs.x.peft.dropout: 2 is not a number in [0, 1.0]"),
    ("method_defs={x: {family: peft, peft: {type: lora, init_lora_weights: svd}}}",
     "method_defs.x.peft.init_lora_weights: 'svd' is not one of"),
    ("method_defs={x: {family: peft, peft: {type: prefix}}}",
     "method_defs.x.peft.type: 'prefix' is not one of ['lora', 'ia3']"),
    ("method_defs={x: {family: peft, peft: {type: ia3, feedforward_modules: [up_proj]}}}",
     "method_defs.x.peft.feedforward_modules: ['up_proj'] are not target modules"),
    ("method_defs={x: {family: peft, peft: {type: lora, target_modules: []}}}",
     "method_defs.x.peft.target_modules: expected 'all-linear' or a non-empty list"),
    ("method_defs={dora: {family: head}}", "method_defs.dora: 'dora' is a built-in method"),
    ("method_defs={x: {family: head, lr: 1}}", "method_defs.x.lr: unknown key; known: family"),
    ("reference_method=lorax", "reference_method: unknown method 'lorax'"),
    ("method_defs={x: {family: peft, peft: {type: lora, lr_ratio: 0}}}",
     "method_defs.x.peft.lr_ratio: 0 is not a positive number (LoRA+"),
])
def test_bad_methods_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        cfg_with(override)
    assert message in str(e.value)


# --------------------------------------------------------------------------- each family

def test_study_lora_is_plain_peft_lora(tiny_backbone):
    """The registry's ``lora`` builds the same PEFT model as PEFT's LoraConfig by hand."""
    import copy

    from peft import LoraConfig, get_peft_model

    ours = _model(copy.deepcopy(tiny_backbone), "lora")
    theirs = get_peft_model(build_classifier(tiny_backbone, 2, seed=0), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
        modules_to_save=["score"], bias="none"))
    assert _trainable(ours) == _trainable(theirs)
    a, b = ours.peft_config["default"], theirs.peft_config["default"]
    assert (a.r, a.lora_alpha, a.lora_dropout, a.target_modules, a.use_rslora, a.use_dora) == \
        (b.r, b.lora_alpha, b.lora_dropout, b.target_modules, b.use_rslora, b.use_dora)


def test_head_trains_only_the_head_and_leaves_the_backbone(tiny_backbone):
    model = _model(tiny_backbone, "head")
    assert _trainable(model) == {"score.weight"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit_tiny(model, tiny_encoded())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"score.weight"}  # the backbone is the base model's: drift 0


def test_dora_rslora_all_linear_and_ia3_adapt_what_they_say(tiny_backbone):
    import copy

    dora = _trainable(_model(copy.deepcopy(tiny_backbone), "dora"))
    assert any("q_proj.lora_magnitude_vector" in n for n in dora)
    rs = _model(copy.deepcopy(tiny_backbone), "rslora")
    q = rs.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(16 / math.sqrt(8))  # alpha / sqrt(r)
    plain = _model(copy.deepcopy(tiny_backbone), "lora").base_model.model.model.layers[0]
    assert plain.self_attn.q_proj.scaling["default"] == pytest.approx(16 / 8)
    every = _trainable(_model(copy.deepcopy(tiny_backbone), "lora-all-linear"))
    for mod in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"{mod}.lora_A" in n for n in every), mod
    assert not any("score.lora" in n for n in every)
    ia3 = _trainable(_model(copy.deepcopy(tiny_backbone), "ia3"))
    assert {n.split(".")[-3] for n in ia3 if "ia3_l" in n} == {"k_proj", "v_proj", "down_proj"}
    assert any("score" in n for n in ia3)


def test_pissa_starts_at_the_base_model(tiny_backbone):
    """PiSSA moves the principal part of W into A and B: at initialisation the adapted
    model computes the base classifier's function (up to float32 rounding)."""
    import copy

    enc = tiny_encoded(6, seed=3)
    base = evaluate(build_classifier(copy.deepcopy(tiny_backbone), 2, seed=0), enc, EOS)["logits"]
    pissa = evaluate(_model(tiny_backbone, "pissa"), enc, EOS)["logits"]
    np.testing.assert_allclose(pissa, base, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["dora", "ia3", "head", "rslora"])
def test_save_and_load_round_trip(tiny_backbone, tmp_path, method):
    """What save_trained writes, load_trained and (adapters) PEFT's own loader read back."""
    import copy

    from peft import PeftModel

    pristine = copy.deepcopy(tiny_backbone)
    model = _model(tiny_backbone, method)
    fit_tiny(model, tiny_encoded(), max_steps=2)
    model.eval()
    enc = tiny_encoded(8, seed=5)
    want = evaluate(model, enc, EOS)["logits"]
    sub = "model" if method == "head" else "adapter"
    save_trained(model, method, tmp_path / sub)
    card = next(line for line in (tmp_path / sub / "README.md").read_text().splitlines()
                if line.startswith("# "))  # the title, after any metadata block
    assert card == ("# loralens fine-tuned model (head, full checkpoint)" if method == "head"
                    else f"# loralens PEFT adapter ({method})")
    got = evaluate(load_trained(tmp_path, copy.deepcopy(pristine), 2), enc, EOS)["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if method != "head":
        saved = json.loads((tmp_path / sub / "adapter_config.json").read_text())
        assert saved["peft_type"] == ("IA3" if method == "ia3" else "LORA")
        assert saved.get("use_dora", False) == (method == "dora")
        assert saved.get("use_rslora", False) == (method == "rslora")
        theirs = PeftModel.from_pretrained(build_classifier(pristine, 2, seed=9),
                                           str(tmp_path / sub))
        np.testing.assert_allclose(evaluate(theirs, enc, EOS)["logits"], want,
                                   rtol=1e-5, atol=1e-6)


def test_peft_config_of_an_ia3_method():
    cfg = cfg_with("method_defs={ia: {family: peft, peft: {type: ia3, target_modules: "
                   "[v_proj, up_proj], feedforward_modules: [up_proj]}}}")
    pc = peft_config(get_method("ia", cfg))
    assert set(pc.target_modules) == {"v_proj", "up_proj"}
    assert set(pc.feedforward_modules) == {"up_proj"} and pc.modules_to_save == ["score"]


# --------------------------------------------------------------------------- stages

TINY = tiny("search.enabled=false")


def test_train_stage_trains_four_methods(tmp_path, glue_dir, tiny_base):
    run = RunDir(tmp_path / "run")
    assert cli.main(["train", "--run-dir", str(run.root), "--glue-dir", str(glue_dir),
                     "--no-progress", *TINY, "methods=[full,head,lora,dora]"]) == 0
    for method, sub, lr in (("full", "model", 2e-5), ("head", "model", 5e-4),
                            ("lora", "adapter", 5e-4), ("dora", "adapter", 5e-4)):
        assert run.weights_dir("rte", method, 42).name == sub
        assert (run.job_dir("rte", method, 42) / sub).is_dir()
        m = json.loads(run.metrics_path("rte", method, 42).read_text())
        assert m["hyperparameters"]["lr"] == lr
        if method in ("head", "dora"):
            assert m["hyperparameters"]["method"]["family"] == ("head" if method == "head"
                                                                 else "peft")
    head = json.loads(run.metrics_path("rte", "head", 42).read_text())["parameters"]
    assert head["trainable"] == 2 * 32  # the score head of the hidden-32 model only


# --------------------------------------------------------------------------- search

def test_each_family_has_its_search_space_and_a_method_overrides_it():
    from loralens.training.search import space

    cfg = cfg_with("method_defs={r4: {family: peft, peft: {type: lora, r: 4, alpha: 8}, "
                   "search: {lr: [loguniform, 1e-4, 1e-2], epochs: [categorical, [1, 2]]}}}")
    lora, full = space("lora", cfg), space("full", cfg)
    assert space("head", cfg) == {k: v for k, v in lora.items() if k not in ("alpha", "dropout")}
    assert space("dora", cfg) == lora and space("rslora", cfg) == lora
    assert space("ia3", cfg) == space("head", cfg)     # IA3 has no alpha/dropout
    r4 = space("r4", cfg)   # its own alpha: only dropout comes from (and is searched in) lora.*
    assert r4["lr"] == ("loguniform", 1e-4, 1e-2) and r4["epochs"] == ("categorical", [1, 2])
    assert "alpha" not in r4 and r4["dropout"] == lora["dropout"]
    assert r4["batch_size"] == lora["batch_size"] and full["lr"] == ("loguniform", 1e-6, 5e-5)


@pytest.mark.parametrize("search, message", [
    ("{alpha: [categorical, [8]]}", "method_defs.x.search.alpha: not a searchable key of this "
                                   "method; known: lr, batch_size, warmup_ratio, weight_decay, "
                                   "epochs, dropout"),
    ("{lr: [normal, 0, 1]}", "method_defs.x.search.lr: expected [loguniform|uniform, low, high]"),
    ("{lr: [loguniform, 0, 1]}", "method_defs.x.search.lr: loguniform needs numbers low <= "
                                 "high (low > 0)"),
    ("{epochs: [categorical, []]}", "method_defs.x.search.epochs: categorical needs a non-empty"),
])
def test_bad_search_overrides_name_the_key(search, message):
    with pytest.raises(ConfigError) as e:
        cfg_with(f"method_defs={{x: {{family: peft, peft: {{type: lora, alpha: 4}}, "
                 f"search: {search}}}}}")
    assert message in str(e.value)


def test_search_then_train_head_and_dora(tmp_path, glue_dir, tiny_base):
    """The search runs for non-study methods, and train uses each one's best trial (DoRA's
    alpha reaches its adapter through the lora section)."""
    run = RunDir(tmp_path / "run")
    common = ["--run-dir", str(run.root), "--glue-dir", str(glue_dir), "--no-progress",
              *TINY[:-1], "search.enabled=true", "search.seed=0", "search.trials=2",
              "search.startup_trials=1", "search.train_size=8", "search.eval_size=8",
              "search.epochs=[1]", "methods=[head,dora]"]
    assert cli.main(["search", *common]) == 0
    assert cli.main(["train", *common]) == 0
    for method in ("head", "dora"):
        best = json.loads(run.search_path("rte", method).read_text())
        assert ("alpha" in best["space"]) == (method == "dora")
        m = json.loads(run.metrics_path("rte", method, 42).read_text())
        assert m["overrides"] == best["overrides"]
        assert m["hyperparameters"]["lr"] == best["overrides"]["train"]["lr"]
    dora = json.loads(run.metrics_path("rte", "dora", 42).read_text())
    alpha = json.loads(run.search_path("rte", "dora").read_text())["overrides"]["lora"]["alpha"]
    assert dora["hyperparameters"]["method"]["peft"]["alpha"] == alpha
    saved = json.loads((run.weights_dir("rte", "dora", 42) / "adapter_config.json").read_text())
    assert saved["lora_alpha"] == alpha and saved["use_dora"] is True


def test_method_selector_takes_registry_names_and_refuses_unknown_ones(tmp_path, capsys):
    args = ["train", "--run-dir", str(tmp_path / "r"), "--no-progress", *TINY]
    assert cli.main([*args, "--method", "qlora"]) == 2
    assert "methods: unknown method 'qlora'; known: full, head, lora" in capsys.readouterr().err
    assert not (tmp_path / "r" / "models").exists()


def test_the_readme_method_example_is_a_valid_config():
    from pathlib import Path

    import yaml

    from loralens.core.config import merge
    from loralens.study.config import check_config

    text = (Path(__file__).resolve().parents[3] / "docs" / "tasks-and-methods.md").read_text()
    start = text.index("methods: [full, head, lora, r16-all]")
    cfg = check_config(merge(StudyConfig, StudyConfig(),
                             yaml.safe_load(text[start:text.index("```", start)])))
    m = get_method("r16-all", cfg)
    assert (m.peft["r"], m.peft["alpha"], m.peft["target_modules"], m.peft["use_rslora"]) == \
        (16, 32.0, "all-linear", True)


def test_loraplus_trains_b_at_ratio_times_the_rate(tiny_backbone):
    """Adam's first step moves every parameter with a gradient by about lr: LoRA+'s B
    matrices move 16x as far as plain LoRA's (A has no gradient at step 1: B = 0)."""
    import copy
    from dataclasses import replace

    from loralens.training.loop import fit

    assert get_method("loraplus", StudyConfig()).lr_ratio == 16.0
    tc = replace(StudyConfig().train, epochs=1, batch_size=8, warmup_ratio=0.0, max_steps=1,
                 weight_decay=0.0)
    steps = {}
    for method, ratio in (("lora", None), ("loraplus", 16.0)):
        model = _model(copy.deepcopy(tiny_backbone), method)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
        fit(model, tiny_encoded(), None, EOS, tc, lr=1e-3, seed=0, progress=False,
            lr_ratio=get_method(method, StudyConfig()).lr_ratio)
        steps[method] = max(float((p.detach() - before[n]).abs().max())
                            for n, p in model.named_parameters() if n in before)
    assert steps["lora"] == pytest.approx(1e-3, rel=0.05)
    assert steps["loraplus"] / steps["lora"] == pytest.approx(16.0, rel=0.02)


def test_loraplus_groups_split_b_from_the_rest():
    from loralens.models.methods import loraplus_groups

    a, b, n = (torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(3))
    names = {id(a): "x.lora_A.default.weight", id(b): "x.lora_B.default.weight",
             id(n): "norm.weight"}
    groups = loraplus_groups([{"params": [a, b], "weight_decay": 0.1},
                              {"params": [n], "weight_decay": 0.0}], names, 1e-3, 4.0)
    assert [([id(p) for p in g["params"]], g["lr"], g["weight_decay"]) for g in groups] == [
        ([id(a)], 1e-3, 0.1), ([id(b)], 4e-3, 0.1), ([id(n)], 1e-3, 0.0)]
