"""The paper preset is the published configuration.

The expected values below are the paper's (sections 3.2-3.5 and Table 2), written out
here as literals: they are compared with the RESOLVED config (defaults + preset), the
resolved search space, the task metrics and the code paths that realise them, never with
the preset file itself. Nothing here needs the network or a GPU.
"""

from __future__ import annotations

import math
import re
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from loralens.study.config import load_config
from loralens.core.config_load import preset_path
from loralens.core.protocol import differences

# --------------------------------------------------------------------------- the paper's table

HUB_ID = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
PAPER = {
    "model": "tinyllama-1.1b",
    "tasks": ["mrpc", "sst2", "rte"],
    "methods": {"lora", "full"},
    "max_length": 384,
    "lora_r": 8,
    "lora_targets": {"q_proj", "v_proj"},
    "layers": 22,
    "lr_full": ("loguniform", 1e-6, 5e-5),
    "lr_lora": ("loguniform", 5e-5, 5e-3),
    "batch_full": [1, 2, 4],
    "batch_lora": [4, 8, 16],
    "grad_accum": 8,
    "warmup_full": ("uniform", 0.0, 0.2),
    "warmup_lora": ("uniform", 0.0, 0.3),
    "weight_decay_full": ("uniform", 0.0, 0.01),
    "weight_decay_lora": ("uniform", 0.0, 0.1),
    "epochs": [2, 3, 4],
    "lora_alpha": [8, 16, 32, 64],
    "lora_dropout": ("uniform", 0.0, 0.3),
    "max_grad_norm": 0.3,
    "patience": 3,
    "trials": 15,
    "metrics": {"mrpc": "f1", "sst2": "accuracy", "rte": "accuracy"},
    "seeds": [42, 1337, 2024],
    "precision_gpu": torch.bfloat16,
    "extract_examples": 750,
    "bench_batch_sizes": [1],
    "bench_warmup": 10,
    "bench_requests": 100,
    "serving_dtype_gpu": torch.bfloat16,
}
CUDA = torch.device("cuda")  # a device object only: nothing is moved to it


@pytest.fixture(scope="module")
def cfg():
    return load_config(preset="paper")


def test_study_design(cfg):
    assert cfg.preset == "paper"
    assert cfg.model.name == PAPER["model"]
    assert cfg.tasks == PAPER["tasks"]
    assert set(cfg.methods) == PAPER["methods"]
    assert cfg.seeds == PAPER["seeds"]
    assert cfg.data.max_length == PAPER["max_length"]
    assert cfg.data.train_size is None and cfg.data.train_size_per_task == {}


def test_training_settings(cfg):
    tc = cfg.train
    assert tc.grad_accum == PAPER["grad_accum"]
    assert tc.max_grad_norm == PAPER["max_grad_norm"]
    assert tc.patience == PAPER["patience"]
    assert tc.max_steps == 0  # no step cap: epochs and early stopping decide
    assert tc.precision == "auto" and tc.gradient_checkpointing == "auto"
    assert tc.optimizer_full == "auto"


def test_search_settings(cfg):
    sc = cfg.search
    assert sc.enabled and sc.trials == PAPER["trials"]
    assert sc.prune is False
    assert sc.train_size is None and sc.eval_size is None  # trials see the full data


def test_resolved_search_space(cfg):
    from loralens.training.search import space

    assert space("full", cfg) == {
        "lr": PAPER["lr_full"],
        "batch_size": ("categorical", PAPER["batch_full"]),
        "warmup_ratio": PAPER["warmup_full"],
        "weight_decay": PAPER["weight_decay_full"],
        "epochs": ("categorical", PAPER["epochs"]),
    }
    assert space("lora", cfg) == {
        "lr": PAPER["lr_lora"],
        "batch_size": ("categorical", PAPER["batch_lora"]),
        "warmup_ratio": PAPER["warmup_lora"],
        "weight_decay": PAPER["weight_decay_lora"],
        "epochs": ("categorical", PAPER["epochs"]),
        "alpha": ("categorical", PAPER["lora_alpha"]),
        "dropout": PAPER["lora_dropout"],
    }


def test_search_study_is_tpe_maximising_without_pruning(cfg, tmp_path):
    import optuna

    from loralens.training.search import open_study
    from loralens.core.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    study = open_study(cfg, run, "mrpc", "lora")
    assert isinstance(study.sampler, optuna.samplers.TPESampler)
    assert isinstance(study.pruner, optuna.pruners.NopPruner)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE


def test_task_metrics(cfg):
    from loralens.tasks.registry import get_task

    assert {t: get_task(t).metric for t in cfg.tasks} == PAPER["metrics"]


def test_registry_names_the_hub_checkpoint(cfg):
    from loralens.models.registry import REGISTRY, resolve_model

    entry = REGISTRY[cfg.model.name]
    assert entry.source == "hub" and entry.ref == HUB_ID
    assert resolve_model(cfg.model.name).path == HUB_ID  # a hub entry resolves offline


def test_pair_is_s1_eos_s2_right_padded(cfg, tiny_tokenizer):
    """The tokenizer path of every model (models.load_tokenizer, data.encode_texts,
    data.collate) on the byte-level tiny tokenizer: BOS 1, EOS 2, byte b = 3 + b."""
    from loralens.training import batches as B

    tok = tiny_tokenizer
    assert tok.padding_side == "right" and tok.pad_token_id == tok.eos_token_id == 2
    ids = B.encode_texts(tok, ("ab", "cd"), cfg.data.max_length)
    assert ids == [1, 3 + ord("a"), 3 + ord("b"), 2, 3 + ord("c"), 3 + ord("d")]
    long = B.encode_texts(tok, ("x" * 300, "y" * 300), cfg.data.max_length)
    assert len(long) == PAPER["max_length"] and long[301] == 2  # s1, then <eos>, then s2
    batch, mask = B.collate([ids, ids[:2]], tok.pad_token_id)
    assert batch[1].tolist() == ids[:2] + [2] * 4  # padding on the right, with EOS
    assert mask.tolist() == [[1] * 6, [1, 1, 0, 0, 0, 0]]


def _tiny_22_layer_backbone():
    from transformers import AutoModel

    from loralens.models.tiny import tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=259, num_hidden_layers=PAPER["layers"])
    return AutoModel.from_config(config, dtype=torch.float32).eval()


def test_lora_adapts_q_and_v_of_every_layer_and_trains_a_b_and_head(cfg):
    from loralens.models.classifier import apply_method, build_classifier

    model = apply_method(build_classifier(_tiny_22_layer_backbone(), 2, 0), "lora", cfg)
    pc = model.peft_config["default"]
    assert pc.r == PAPER["lora_r"] and set(pc.target_modules) == PAPER["lora_targets"]
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    expected = {f"layers.{i}.self_attn.{p}" for i in range(PAPER["layers"])
                for p in PAPER["lora_targets"]}
    assert {re.sub(r"^.*?(layers\.)", r"\1", n) for n in adapted} == expected
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    kinds = {"lora_A" if ".lora_A." in n else "lora_B" if ".lora_B." in n
             else "head" if "modules_to_save" in n and ".score." in n else n for n in trained}
    assert kinds == {"lora_A", "lora_B", "head"}


def test_optimizer_precision_and_schedule_on_a_gpu(cfg, monkeypatch):
    from loralens.training.devices import make_optimizer, param_groups
    from loralens.training.loop import _cosine_schedule, autocast_ctx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... disabling autocast"
        ctx = autocast_ctx(CUDA, cfg.train.precision)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == PAPER["precision_gpu"]

    made = []

    class PagedAdamW8bit(torch.optim.AdamW):  # stands in for bitsandbytes' class
        def __init__(self, params, lr):
            made.append(lr)
            super().__init__(params, lr=lr)

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(PagedAdamW8bit=PagedAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    w = torch.nn.Parameter(torch.zeros(4, 4))
    opt, _ = make_optimizer(param_groups([w], 0.01), 1e-5, "full", cfg.train.optimizer_full,
                            CUDA)
    assert type(opt) is PagedAdamW8bit and made == [1e-5]
    opt, _ = make_optimizer(param_groups([w], 0.01), 1e-4, "lora", cfg.train.optimizer_full,
                            CUDA)
    assert type(opt) is torch.optim.AdamW  # LoRA: torch's AdamW

    # AdamW with linear warm-up, then cosine decay to 0 over every optimizer step
    from dataclasses import replace

    tc = replace(cfg.train, batch_size=4, epochs=2, warmup_ratio=0.25)
    opt = torch.optim.AdamW([w], lr=1.0)
    sched, total = _cosine_schedule(opt, 64, tc)
    assert total == 2 * math.ceil(64 / 4 / PAPER["grad_accum"])  # grad_accum counts
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1.0)  # 1 warm-up step of 4
    assert lrs[2] == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))


def test_extraction_every_layer_mean_over_real_tokens(cfg):
    from loralens.training import batches as B
    from loralens.analysis.extract import pooled_hidden_states

    assert cfg.extract.examples == PAPER["extract_examples"]
    enc = B.Encoded([[1, 10, 11, 12, 2, 13], [1, 20, 21]], np.array([0, 1]), np.array([0, 1]))
    model = _tiny_22_layer_backbone()
    batched = pooled_hidden_states(model, enc, pad_id=2, batch_size=2)
    one_by_one = pooled_hidden_states(model, enc, pad_id=2, batch_size=1)
    assert batched.shape == (2, PAPER["layers"] + 1, 32)  # embedding output + every layer
    # padding changes nothing: the mean runs over real tokens only
    assert abs(batched - one_by_one).max() < 1e-5


def test_serving_benchmark(cfg):
    from loralens.training.devices import serving_dtype

    bc = cfg.bench
    assert bc.batch_sizes == PAPER["bench_batch_sizes"]
    assert bc.warmup == PAPER["bench_warmup"] and bc.requests == PAPER["bench_requests"]
    assert bc.seeds == []  # every trained seed
    assert serving_dtype(CUDA, cfg.train.precision)[0] == PAPER["serving_dtype_gpu"]


def _difference_block(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith("# Deliberate differences from the published study"))
    block = []
    for line in lines[start + 1:]:
        if not line.startswith("#"):
            break
        block.append(line)
    return block


def test_every_deliberate_difference_is_listed_in_the_preset(cfg):
    diffs = differences(cfg)
    assert diffs, "protocol.differences lists nothing for the paper preset"
    block = _difference_block(preset_path("paper").read_text())
    listed = [m.group(1) for line in block if (m := re.match(r"#\s{3}(\S[^:]*):\s+\S", line))]
    for key, _ in diffs:
        assert listed.count(key) == 1, f"difference {key!r} is not listed once in paper.yaml"
    # and nothing listed that the code no longer does
    assert sorted(listed) == sorted(k for k, _ in diffs)
    assert sorted(listed) == ["Holm correction", "early-stopping cadence", "one persistent study",
                              "sampler seeding", "search seed", "selection slice"]


def test_paper_preset_is_its_own_reference(cfg):
    """The report's config rows are the diff against this preset: none for the preset."""
    from loralens.core.protocol import config_differences

    assert config_differences(cfg) == []
