"""Device-dependent choices (loralens.training.devices), the sanity check's device and the serving
benchmark's dtype, on a CPU-only machine: CUDA is faked (torch.cuda.is_available,
torch.device("cuda") objects that no tensor is moved to, a fake ``bitsandbytes`` module)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from loralens.training import devices
from loralens.core.errors import ConfigError
from loralens.study.config import load_config
from loralens.training.devices import make_optimizer, optimizer_for, param_groups, serving_dtype

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


class FakePaged:
    """Stands in for bitsandbytes.optim.PagedAdamW8bit; records what it was given."""

    calls: list = []

    def __init__(self, params, **kwargs):
        FakePaged.calls.append((params, kwargs))


@pytest.fixture
def bnb(monkeypatch):
    FakePaged.calls = []
    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(PagedAdamW8bit=FakePaged)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    return fake


@pytest.fixture
def no_bnb(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError


@pytest.fixture
def groups():
    w, b = torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3))
    return param_groups([w, b], 0.01)


def test_param_groups_decay_matrices_only():
    w, b = torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3))
    g = param_groups([w, b], 0.05)
    assert [x["weight_decay"] for x in g] == [0.05, 0.0]
    assert g[0]["params"][0] is w and g[1]["params"][0] is b


@pytest.mark.parametrize("choice", ["auto", "adamw_8bit_paged"])
def test_full_on_cuda_with_bitsandbytes_is_paged_8bit(bnb, groups, choice):
    opt, note = make_optimizer(groups, 2e-5, "full", choice, CUDA)
    assert isinstance(opt, FakePaged)
    assert FakePaged.calls == [(groups, {"lr": 2e-5})]
    assert note == devices.PAGED_NOTE


def test_auto_on_cpu_is_torch_adamw_with_a_note(bnb, groups):
    opt, note = make_optimizer(groups, 2e-5, "full", "auto", CPU)
    assert type(opt) is torch.optim.AdamW and FakePaged.calls == []
    assert note == ("8-bit paged AdamW needs a CUDA GPU and bitsandbytes; using torch AdamW "
                    "(fp32 state)")
    assert opt.defaults["lr"] == 2e-5
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert opt.defaults["fused"] is True  # fused where available


def test_auto_on_cuda_without_bitsandbytes_falls_back(no_bnb, groups):
    opt, note = make_optimizer(groups, 2e-5, "full", "auto", CUDA)
    assert type(opt) is torch.optim.AdamW
    assert note == devices.FALLBACK_NOTE


def test_explicit_8bit_on_cpu_is_an_error(bnb, groups):
    with pytest.raises(ConfigError) as e:
        make_optimizer(groups, 2e-5, "full", "adamw_8bit_paged", CPU)
    assert e.value.key == "train.optimizer_full"
    assert str(e.value) == (
        "train.optimizer_full: adamw_8bit_paged needs a CUDA GPU and training runs on cpu; "
        "set train.optimizer_full=auto (8-bit paged on a GPU, torch AdamW elsewhere) or adamw")
    assert FakePaged.calls == []


def test_explicit_8bit_without_bitsandbytes_is_an_error(no_bnb, groups):
    with pytest.raises(ConfigError) as e:
        make_optimizer(groups, 2e-5, "full", "adamw_8bit_paged", CUDA)
    assert e.value.key == "train.optimizer_full"
    assert str(e.value) == (
        "train.optimizer_full: adamw_8bit_paged needs bitsandbytes, which does not import "
        "(ModuleNotFoundError: import of bitsandbytes halted; None in sys.modules); "
        "pip install bitsandbytes, or set train.optimizer_full=auto or adamw")


@pytest.mark.parametrize("choice", ["adamw", "auto", "adamw_8bit_paged"])
def test_lora_always_gets_torch_adamw(bnb, groups, choice):
    opt, note = make_optimizer(groups, 1e-3, "lora", choice, CUDA)
    assert type(opt) is torch.optim.AdamW and note == "" and FakePaged.calls == []


def test_adamw_is_torch_adamw_everywhere(bnb, groups):
    for device in (CPU, CUDA, "cuda:0"):
        opt, note = make_optimizer(groups, 1e-5, "full", "adamw", device)
        assert type(opt) is torch.optim.AdamW and note == ""
    assert FakePaged.calls == []


def test_bad_arguments(groups):
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        make_optimizer(groups, 1e-5, "dora", "auto", CPU)
    with pytest.raises(ConfigError, match=r"train.optimizer_full: 'sgd' is not one of"):
        make_optimizer(groups, 1e-5, "full", "sgd", CPU)


def test_optimizer_for_reads_the_train_config(bnb, groups):
    tc = load_config(overrides=["train.optimizer_full=auto"]).train
    opt, _ = optimizer_for(groups, 1e-5, "full", tc, CUDA)
    assert isinstance(opt, FakePaged)
    opt, note = optimizer_for(groups, 1e-5, "full", load_config().train, CUDA)
    assert type(opt) is torch.optim.AdamW and note == ""  # the default: adamw


def test_training_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.training_device() == CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.training_device() == CPU


# --------------------------------------------------------------------------- serving dtype

def test_serving_dtype():
    assert serving_dtype(CUDA, "auto") == (torch.bfloat16, "")
    assert serving_dtype("cuda:1") == (torch.bfloat16, "")
    assert serving_dtype(CPU, "auto") == (
        torch.float32, "serving benchmark: bf16 needs a CUDA GPU; serving in float32 on the CPU "
                       "(train.precision auto)")
    assert serving_dtype(CPU, "bf16") == (torch.bfloat16, "")  # asked for: honoured
    assert serving_dtype(CUDA, "fp32") == (torch.float32, "")
    with pytest.raises(ConfigError, match="train.precision: 'fp16' is not one of"):
        serving_dtype(CUDA, "fp16")


def test_tolerance_follows_the_dtype():
    from loralens.serving.bench.task import TOL, tolerance

    assert tolerance(torch.float32) == TOL == 1e-5
    assert tolerance(torch.bfloat16) == 0.5
    with pytest.raises(ValueError, match="no logit tolerance"):
        tolerance(torch.int8)


class _Stop(Exception):
    pass


class _FakeBase:
    """Records the dtype the benchmark loads its base weights in, then stops the run."""

    name, note, tokenizer = "fake", "fake", None
    family, pooling = "causal", "last"  # a causal LM read at its last token: servable

    def __init__(self):
        self.dtypes = []

    def backbone(self, dtype=torch.float32):
        self.dtypes.append(dtype)
        raise _Stop


def _bench_until_load(tmp_path, monkeypatch, cuda: bool, **kw):
    from loralens.serving.bench import stage as bench
    from loralens.core.run_dir import RunDir
    from loralens.core.files import atomic_write_json

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    run = RunDir(tmp_path / "run")
    atomic_write_json(run.metrics_path("sst2", "lora", 42), {"score": 0.5})
    base = _FakeBase()
    with pytest.raises(_Stop):
        bench.run_bench(load_config(overrides=["tasks=[sst2]"]), run, n_requests=1, base=base,
                        threads=torch.get_num_threads(), **kw)
    return base.dtypes


def test_bench_loads_bf16_on_a_gpu(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="loralens")
    assert _bench_until_load(tmp_path, monkeypatch, cuda=True) == [torch.bfloat16]
    assert devices.SERVING_FALLBACK_NOTE not in caplog.text


def test_bench_falls_back_to_float32_on_the_cpu_with_a_note(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="loralens")
    assert _bench_until_load(tmp_path, monkeypatch, cuda=False) == [torch.float32]
    assert devices.SERVING_FALLBACK_NOTE in caplog.text
    assert _bench_until_load(tmp_path, monkeypatch, cuda=False, precision="bf16") == [
        torch.bfloat16]


# --------------------------------------------------------------------------- sanity device

def test_sanity_model_goes_to_the_training_device(monkeypatch, tiny_base):
    """sanity_pair moves its model to cuda when CUDA is available, as train_model does
    (the move is recorded, not made: the parameters stay on the CPU), and to the CPU
    otherwise."""
    import numpy as np

    from loralens.training import batches as B
    from loralens.training import sanity
    from loralens.tasks.registry import get_task

    seen = []
    real_apply = sanity.apply_method

    def apply_method(model, method, cfg):
        out = real_apply(model, method, cfg)
        out.to = lambda device: seen.append(device) or out  # instance attribute: recorded only
        return out

    monkeypatch.setattr(sanity, "apply_method", apply_method)
    enc = B.Encoded([[1, 10 + i, 11, 2] for i in range(4)], np.array([0, 1] * 2), np.arange(4))
    prepared = types.SimpleNamespace(train=enc, task=get_task("sst2"), pad_id=2)
    cfg = load_config(overrides=["sanity.examples=2", "sanity.epochs=1", "sanity.batch_size=2"])
    for cuda, device in ((True, CUDA), (False, CPU)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        r = sanity.sanity_pair(cfg, "sst2", "lora", prepared, tiny_base, progress=False)
        assert seen[-1] == device and r["device"] == str(device) and r["steps"] == 1
    assert seen == [CUDA, CPU]


# --------------------------------------------------------------------------- a real GPU

@pytest.mark.gpu
def test_real_paged_8bit_on_a_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.nn.Parameter(torch.randn(64, 64, device="cuda"))
    opt, note = make_optimizer(param_groups([w], 0.0), 1e-3, "full", "auto", CUDA)
    assert isinstance(opt, bnb.optim.PagedAdamW8bit) and note == devices.PAGED_NOTE
    w.sum().backward()
    opt.step()
