"""Any PEFT method, declared the way PEFT declares it (:mod:`loralens.models.methods`): the
built-in LoHa, LoKr, OFT, VeRA and AdaLoRA train on the tiny model and round-trip through
PEFT's own loader; ``peft_type`` entries and ``adapter_config.json`` paths are built through
PEFT's config classes, their errors named; the old ``peft: {type: lora}`` form still loads."""

import copy
import json

import pytest
import torch

from loralens.core.config import StudyConfig
from loralens.core.errors import ConfigError
from loralens.models.classifier import apply_method, build_classifier
from loralens.models.methods import get_method, peft_config, recorded_method
from loralens.models.saving import load_trained, save_trained
from loralens.study.config import load_config
from loralens.training.loop import evaluate
from tests.helpers.training import EOS, fit_tiny, tiny_encoded

# method -> (PEFT type, the adapter parameter names' marker)
NEW = {"loha": ("LOHA", ".hada_"), "lokr": ("LOKR", ".lokr_"), "oft": ("OFT", ".oft_R."),
       "vera": ("VERA", ".vera_lambda_"), "adalora": ("ADALORA", ".lora_")}


@pytest.mark.parametrize("method", sorted(NEW))
def test_new_builtin_trains_and_round_trips_through_peft(tiny_backbone, tmp_path, method):
    """Trains a few steps (only its adapter and the head), saves, and plain
    ``PeftModel.from_pretrained`` on a fresh base gives the same logits."""
    from peft import PeftModel

    ptype, marker = NEW[method]
    pristine = copy.deepcopy(tiny_backbone)
    model = apply_method(build_classifier(copy.deepcopy(tiny_backbone), 2, seed=0), method,
                         StudyConfig())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(marker in n or ".score." in n for n in trained), sorted(trained)
    assert any(marker in n for n in trained) and any(".score." in n for n in trained)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit_tiny(model, tiny_encoded(), max_steps=3)
    model.eval()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and changed <= trained
    assert any(marker in n for n in changed)
    enc = tiny_encoded(8, seed=5)
    want = torch.as_tensor(evaluate(model, enc, EOS)["logits"])
    save_trained(model, method, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == ptype and saved["modules_to_save"] == ["score"]
    theirs = PeftModel.from_pretrained(build_classifier(copy.deepcopy(pristine), 2, seed=9),
                                       str(tmp_path / "adapter"))
    got = torch.as_tensor(evaluate(theirs, enc, EOS)["logits"])
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    ours = torch.as_tensor(evaluate(load_trained(tmp_path, copy.deepcopy(pristine), 2), enc,
                                    EOS)["logits"])
    assert torch.allclose(ours, want, atol=1e-6)


def test_adalora_allocates_over_the_jobs_steps(tiny_backbone):
    """AdaLoRA's step hook ran: the rank allocator scored importances, and the budget
    schedule's total_step is the job's 3 optimizer steps, not the placeholder."""
    model = apply_method(build_classifier(copy.deepcopy(tiny_backbone), 2, seed=0),
                         "adalora", StudyConfig())
    fit_tiny(model, tiny_encoded(), max_steps=3)
    assert model.peft_config["default"].total_step == 3
    # lora_A, lora_B and lora_E of q and v in each of the 2 layers: 3 * 2 * 2
    assert len(model.base_model.rankallocator.ipt) == 12
    assert get_method("adalora").step_hook is not None
    assert get_method("loha").step_hook is None and get_method("lora").step_hook is None


def test_an_adalora_total_step_given_is_kept(tiny_backbone):
    cfg = load_config(overrides=["method_defs={ada: {peft_type: ADALORA, init_r: 4, "
                                 "target_r: 2, total_step: 50, target_modules: [q_proj]}}"])
    model = apply_method(build_classifier(copy.deepcopy(tiny_backbone), 2, seed=0), "ada", cfg)
    fit_tiny(model, tiny_encoded(), max_steps=2)
    assert model.peft_config["default"].total_step == 50


@pytest.mark.parametrize("entry, key, words", [
    ("{family: peft, peft: {peft_type: LOHA, r: -1}}", "method_defs.mine.peft.r",
     "method_defs.mine.peft.r: -1 is not an integer >= 1 (a LOHA rank)"),
    ("{family: peft, peft: {peft_type: LOHA, rank_dropout: 0.1, colour: red}}",
     "method_defs.mine.peft.colour",
     "method_defs.mine.peft.colour: unknown key for a LOHA method (PEFT's LoHaConfig)"),
    ("{peft_type: OFT, r: 4, oft_block_size: 8}", "method_defs.mine.peft.r",
     "method_defs.mine.peft.r: PEFT's OFTConfig refuses it: You can only specify either r"),
    ("{peft_type: LOHA, modules_to_save: [lm_head]}", "method_defs.mine.peft.modules_to_save",
     "method_defs.mine.peft.modules_to_save: set by loralens"),
    ("{peft_type: NOPE}", "method_defs.mine.peft.peft_type",
     "method_defs.mine.peft.peft_type: 'NOPE' is not a PEFT type"),
    ("{family: peft, peft: {type: loha}}", "method_defs.mine.peft.type",
     "declared as peft_type: LOHA"),
])
def test_bad_peft_configs_name_the_method_and_key(entry, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"method_defs={{mine: {entry}}}", "methods=[mine]"])
    assert words in str(e.value)
    assert e.value.key == key


def test_an_adapter_config_path_builds_the_same_config(tmp_path, tiny_backbone):
    """A method entry that is an adapter_config.json (as PEFT writes it: task type, base,
    modules_to_save included) gives the PEFT config of the same settings declared inline."""
    inline = load_config(overrides=["method_defs={mine: {peft_type: LOKR, r: 4, alpha: 8, "
                                    "rank_dropout: 0.1, target_modules: [q_proj, v_proj]}}"])
    want = peft_config(get_method("mine", inline)).to_dict()
    path = tmp_path / "adapter_config.json"
    as_json = {k: sorted(v) if isinstance(v, set) else v for k, v in want.items()}
    path.write_text(json.dumps({**as_json, "task_type": "SEQ_CLS", "base_model_name_or_path": "x",
                                "modules_to_save": ["classifier"], "inference_mode": True}))
    for entry in (str(path), f"{{family: peft, peft: {path}}}", str(tmp_path)):
        cfg = load_config(overrides=[f"method_defs={{theirs: {entry}}}"])
        got = peft_config(get_method("theirs", cfg)).to_dict()
        assert got == want
        assert got["r"] == 4 and got["alpha"] == 8 and got["rank_dropout"] == 0.1
        assert got["modules_to_save"] == ["score"] and got["peft_type"] == "LOKR"


def test_a_missing_adapter_config_is_named():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["method_defs={gone: /nonexistent/adapter_config.json}"])
    assert e.value.key == "method_defs.gone.peft"
    assert "cannot read the adapter config '/nonexistent/adapter_config.json'" in str(e.value)


def test_the_old_type_form_still_loads_and_records_as_before():
    cfg = load_config(overrides=["method_defs={r16: {family: peft, peft: {type: lora, r: 16}}}",
                                 "lora.alpha=32"])
    m = get_method("r16", cfg)
    assert m.peft == {"type": "lora", "r": 16, "alpha": 32.0, "dropout": 0.05,
                      "target_modules": ["q_proj", "v_proj"], "use_rslora": False,
                      "use_dora": False, "init_lora_weights": True}
    assert m.is_lora_type and m.peft_type == "LORA"
    pc = peft_config(m)
    assert (pc.r, pc.lora_alpha, pc.modules_to_save) == (16, 32.0, ["score"])
    # a record written by an older run (no peft_type) reads back as LoRA
    family, peft = recorded_method("r16", {"method": {"family": "peft",
                                                      "peft": {"type": "lora", "r": 16}}})
    assert (family, peft["r"]) == ("peft", 16)


def test_a_peft_type_lora_entry_is_lora_type_and_inherits_nothing():
    cfg = load_config(overrides=["method_defs={native: {peft_type: LORA, r: 4, lora_alpha: 4, "
                                 "target_modules: [q_proj]}}", "lora.r=16"])
    m = get_method("native", cfg)
    assert m.is_lora_type and m.peft["r"] == 4
    pc = peft_config(m)
    assert (pc.r, pc.lora_alpha, set(pc.target_modules)) == (4, 4, {"q_proj"})


def test_prompt_learning_is_refused_and_has_no_weight_delta():
    from loralens.models.methods import Method

    with pytest.raises(ConfigError) as e:
        load_config(overrides=["method_defs={prompt: {peft_type: PROMPT_TUNING, "
                               "num_virtual_tokens: 4}}"])
    assert e.value.key == "method_defs.prompt.peft.peft_type"
    assert str(e.value).startswith("method_defs.prompt.peft.peft_type: PROMPT_TUNING is "
                                   "prompt learning (virtual tokens before the input)")
    recorded = Method("prompt", "peft", {"type": "prompt_tuning", "peft_type": "PROMPT_TUNING"})
    assert recorded.weight_delta_skip.startswith(
        "PROMPT_TUNING is prompt learning (virtual tokens)")
    for name in ("lora", "ia3", "loha", "lokr", "oft", "vera", "adalora", "full", "head"):
        assert get_method(name).weight_delta_skip is None, name


def test_the_docs_peft_type_example_is_a_valid_config(tmp_path):
    """docs/tasks-and-methods.md's example, its adapter_config.json path pointed at a file."""
    from pathlib import Path

    import yaml

    from loralens.core.config import merge
    from loralens.study.config import check_config

    text = (Path(__file__).resolve().parents[3] / "docs" / "tasks-and-methods.md").read_text()
    start = text.index("methods: [full, lora, loha, mine, theirs]")
    data = yaml.safe_load(text[start:text.index("```", start)])
    assert data["method_defs"]["theirs"] == "path/to/adapter_config.json"
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": []}))
    data["method_defs"]["theirs"] = str(tmp_path / "adapter_config.json")
    cfg = check_config(merge(StudyConfig, StudyConfig(), data))
    assert get_method("mine", cfg).peft["n_frequency"] == 1000
    assert get_method("boft", cfg).peft_type == "BOFT"
    assert get_method("theirs", cfg).peft == {"type": "ia3", "peft_type": "IA3",
                                              "target_modules": ["k_proj"],
                                              "feedforward_modules": []}


def test_bench_serves_the_new_methods_through_peft_and_merged_only(tmp_path):
    """The lean runtime stays LoRA-only: the new methods are served through PEFT and merged,
    and the runtime refuses their adapters naming the backends that serve them."""
    from loralens.models.serving_paths import lean_inexact, serving_kinds
    from loralens.serving.runtime import LoraAdapter

    for m in NEW:
        assert serving_kinds(get_method(m)) == {f"{m}_merged": "merged", f"{m}_separate": "PEFT"}
        assert lean_inexact(get_method(m)) == (
            f"{NEW[m][0]} is not LoRA: the lean runtime computes W x + s B A x only "
            "(served through PEFT and merged)")
    assert lean_inexact(get_method("ia3")) == "IA3 is not LoRA: it rescales activations"
    with pytest.raises(ValueError) as e:
        LoraAdapter.from_state({}, {"peft_type": "LOHA"}, source="x")
    assert str(e.value) == ("x: peft_type 'LOHA' is not LORA: the lean runtime serves LoRA "
                            "only; serve this adapter through PEFT (--backend peft) or merged "
                            "(--backend merged)")


@pytest.mark.parametrize("spec", [
    "{peft_type: FOURIERFT, n_frequency: 100, target_modules: [q_proj]}",
    "{peft_type: BOFT, boft_block_size: 8, target_modules: [q_proj]}"])
def test_a_declared_peft_type_trains_and_round_trips(tiny_backbone, tmp_path, spec):
    """A type no built-in uses, declared in method_defs, trains and PEFT's loader reads it."""
    from peft import PeftModel

    cfg = load_config(overrides=[f"method_defs={{mine: {spec}}}"])
    pristine = copy.deepcopy(tiny_backbone)
    model = apply_method(build_classifier(copy.deepcopy(tiny_backbone), 2, seed=0), "mine", cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fit_tiny(model, tiny_encoded(), max_steps=2)
    model.eval()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters()
               if n in before and ".score." not in n)
    enc = tiny_encoded(8, seed=5)
    want = torch.as_tensor(evaluate(model, enc, EOS)["logits"])
    save_trained(model, "mine", tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(build_classifier(copy.deepcopy(pristine), 2, seed=9),
                                       str(tmp_path / "adapter"))
    assert torch.allclose(torch.as_tensor(evaluate(theirs, enc, EOS)["logits"]), want, atol=1e-6)
