"""A killed training job resumes where it stopped (``training/checkpoint.py``, ``loop.fit``'s
``checkpoint``): trained k steps, "killed" (the in-memory model, optimizer and loop thrown
away), resumed from the checkpoint file in a fresh model, it ends with the same weights,
bit for bit, as an uninterrupted fit; a damaged or foreign checkpoint is ignored; the job
removes its checkpoint once it is finished. On the tiny random Llama (seconds)."""

import copy
import logging
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from loralens.core.config import StudyConfig
from loralens.core.leftovers import temp_prefix
from loralens.models.classifier import apply_method, build_classifier
from loralens.training import checkpoint as C
from loralens.training import step as S
from loralens.training.loop import fit
from tests.helpers.training import EOS, tiny_encoded

TRAIN, SELECT = tiny_encoded(24, seed=0), tiny_encoded(8, seed=1)
# 24 rows in micro-batches of 2, 2 per optimizer step: 6 steps an epoch, 12 in all;
# early stopping evaluated every 2 steps (patience 2 may stop it: the state carries it)
TC = replace(StudyConfig().train, epochs=2, batch_size=2, grad_accum=2, warmup_ratio=0.25,
             eval_every=2, patience=2, checkpoint_every=1, precision="fp32", eval_batch_size=8)


@pytest.fixture(autouse=True)
def no_peak_measurement(monkeypatch):
    """The fit's FLOP peaks (seconds of GEMMs on a private generator, nothing the weights
    depend on) are not what is tested here: a constant."""
    from loralens.training import loop

    monkeypatch.setattr(loop, "_measure_peaks", lambda *a, **kw: 1e12)


class Killed(BaseException):
    """The SIGKILL of these tests: nothing after it runs (BaseException: no handler)."""


def fresh_model(backbone, method, torch_seed=0):
    """The job's model as a fresh process builds it: the same base and head (seed 0); the
    global torch RNG, which LoRA's A matrices and dropout draw from, seeded by the test."""
    torch.manual_seed(torch_seed)
    model = apply_method(build_classifier(copy.deepcopy(backbone), 2, seed=0), method,
                         StudyConfig())
    torch.manual_seed(torch_seed)
    return model


def train(model, tc=TC, ckpt=None, lr=1e-2, method="lora"):
    return fit(model, TRAIN, SELECT, EOS, tc, lr=lr, seed=3, progress=False, method=method,
               checkpoint=ckpt)


def kill_after_checkpoint(monkeypatch, k):
    """Make the k-th checkpoint write the last thing the fit does."""
    real, writes = C.write, []

    def write_then_die(path, tensors, meta):
        real(path, tensors, meta)
        writes.append(meta["result"]["steps"])
        if len(writes) == k:
            raise Killed()
    monkeypatch.setattr(C, "write", write_then_die)
    return writes


def count_steps(monkeypatch):
    steps, real = [], S.TrainStep.optimizer_step

    def spy(self, *a, **kw):
        steps.append(1)
        return real(self, *a, **kw)
    monkeypatch.setattr(S.TrainStep, "optimizer_step", spy)
    return steps


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert differ == []


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads of hidden-32 products
    measured 20x slower (the micro preset sets train.threads=1 for the same reason)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone():
    """conftest's ``tiny_backbone`` (the tiny random Llama, seeded), once for the module:
    every model here trains a deep copy of it."""
    from transformers import AutoModel

    from loralens.models.tiny import tiny_llama_config

    torch.manual_seed(0)
    return AutoModel.from_config(tiny_llama_config(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(backbone):
    """Uninterrupted fits (no checkpoint file at all), by (method, precision)."""
    from loralens.training import loop

    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "_measure_peaks", lambda *a, **kw: 1e12)
    out = {}
    for method, precision in [("lora", "fp32"), ("full", "fp32"), ("full", "bf16")]:
        model = fresh_model(backbone, method)
        res = train(model, replace(TC, precision=precision), method=method)
        out[method, precision] = (model, res)
    mp.undo()
    return out


@pytest.mark.parametrize("method, precision, k", [
    ("lora", "fp32", 3),   # mid-epoch, between evaluations
    ("lora", "fp32", 6),   # the last step of epoch 1: the next process starts epoch 2
    ("lora", "fp32", 8),   # mid epoch 2, after an evaluation
    ("full", "fp32", 5),
    ("full", "bf16", 4),   # bfloat16 compute: float32 masters are what is saved
])
def test_a_killed_fit_resumes_to_the_same_weights_bit_for_bit(backbone, reference,
                                                              tmp_path, monkeypatch, method,
                                                              precision, k):
    tc = replace(TC, precision=precision)
    ref_model, ref = reference[method, precision]
    # the kill lands mid-fit, after evaluations, before the best one (restored at the end):
    # the final weights depend on the steps after the kill
    assert ref.steps > k and ref.history and ref.best_step > k

    ckpt = tmp_path / "checkpoint.safetensors"
    writes = kill_after_checkpoint(monkeypatch, k)
    with pytest.raises(Killed):
        train(fresh_model(backbone, method), tc, ckpt, method=method)
    assert writes == list(range(1, k + 1)) and ckpt.is_file()
    monkeypatch.undo()

    # a new "process": another torch RNG state, LoRA's A matrices drawn afresh
    steps = count_steps(monkeypatch)
    model = fresh_model(backbone, method, torch_seed=1234)
    res = train(model, tc, ckpt, method=method)
    assert res.resumed_at == [k] and len(steps) == ref.steps - k  # continued, not redone
    assert_same_weights(model, ref_model)
    assert (res.steps, res.best_step, res.stopped_early, res.epochs) == \
        (ref.steps, ref.best_step, ref.stopped_early, ref.epochs)
    assert res.history == ref.history
    assert res.final_train_loss == ref.final_train_loss


def test_the_best_state_is_carried_by_the_checkpoint(backbone, tmp_path, monkeypatch):
    """A fit whose best evaluation comes before the kill restores those weights in the
    resumed process: the best state is in the checkpoint, not only in memory."""
    tc = replace(TC, eval_every=1, patience=0)
    ref_model = fresh_model(backbone, "lora")
    ref = train(ref_model, tc, lr=0.3)  # too high a rate: the selection loss soon rises
    assert ref.best_step < ref.steps    # the restored weights are not the last ones
    k = ref.best_step + 1
    ckpt = tmp_path / "checkpoint.safetensors"
    kill_after_checkpoint(monkeypatch, k)
    with pytest.raises(Killed):
        train(fresh_model(backbone, "lora"), tc, ckpt, lr=0.3)
    saved = C.read(ckpt)
    assert saved.meta["result"]["best_step"] == ref.best_step
    assert sorted(saved.tensors["best"]) == sorted(saved.tensors["params"])
    monkeypatch.undo()
    model = fresh_model(backbone, "lora", torch_seed=99)
    res = train(model, tc, ckpt, lr=0.3)
    assert res.resumed_at == [k] and res.best_step == ref.best_step
    assert_same_weights(model, ref_model)


def test_a_leftover_temporary_file_is_ignored(backbone, reference, tmp_path,
                                              monkeypatch):
    """A kill while a checkpoint was written leaves a temporary file beside it (atomic
    writes): the fit resumes from the last whole checkpoint, or starts at step 0."""
    ref_model, ref = reference["lora", "fp32"]
    ckpt = tmp_path / "checkpoint.safetensors"
    half = tmp_path / f"{temp_prefix(ckpt.name)}x1y2z3.safetensors"

    half.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": {")   # half a header
    model = fresh_model(backbone, "lora")
    res = train(model, ckpt=ckpt)
    assert res.resumed_at == [] and ckpt.is_file()           # nothing to resume: step 0
    assert_same_weights(model, ref_model)

    ckpt.unlink()
    kill_after_checkpoint(monkeypatch, 5)
    with pytest.raises(Killed):
        train(fresh_model(backbone, "lora"), ckpt=ckpt)
    monkeypatch.undo()
    half.write_bytes(ckpt.read_bytes()[:1000])  # the next write, killed half-way
    model = fresh_model(backbone, "lora", torch_seed=5)
    res = train(model, ckpt=ckpt)
    assert res.resumed_at == [5]
    assert_same_weights(model, ref_model)


def test_a_damaged_checkpoint_is_ignored_and_said(backbone, reference, tmp_path, caplog):
    ref_model, ref = reference["lora", "fp32"]
    ckpt = tmp_path / "checkpoint.safetensors"
    ckpt.write_bytes(b"\x00" * 100)
    model = fresh_model(backbone, "lora")
    with caplog.at_level(logging.WARNING):
        res = train(model, ckpt=ckpt)
    assert "cannot be read" in caplog.text and "starts at step 0" in caplog.text
    assert res.resumed_at == [] and res.steps == ref.steps
    assert_same_weights(model, ref_model)


def test_a_checkpoint_of_another_configuration_is_ignored(backbone, reference, tmp_path,
                                                          monkeypatch, caplog):
    ref_model, ref = reference["lora", "fp32"]
    ckpt = tmp_path / "checkpoint.safetensors"
    kill_after_checkpoint(monkeypatch, 4)
    with pytest.raises(Killed):
        train(fresh_model(backbone, "lora"), ckpt=ckpt, lr=2e-2)   # another rate
    monkeypatch.undo()
    model = fresh_model(backbone, "lora")
    with caplog.at_level(logging.WARNING):
        res = train(model, ckpt=ckpt)                                   # the reference's
    assert "another configuration (lr differ)" in caplog.text
    assert res.resumed_at == []
    assert_same_weights(model, ref_model)


def test_checkpoint_every_sets_the_interval_and_zero_writes_none(backbone, tmp_path,
                                                                 monkeypatch):
    writes = kill_after_checkpoint(monkeypatch, 10**6)
    train(fresh_model(backbone, "lora"), replace(TC, checkpoint_every=5),
          tmp_path / "a.safetensors")
    assert writes[:2] == [5, 10]  # steps 5 and 10 (12 steps, unless patience stops it)
    writes.clear()
    train(fresh_model(backbone, "lora"), replace(TC, checkpoint_every=0),
          tmp_path / "b.safetensors")
    assert writes == [] and not (tmp_path / "b.safetensors").exists()


def test_rng_states_come_back():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # a cached Gaussian in numpy's state
    tensors, meta = C.rng_state()
    expected = (torch.rand(3).tolist(), np.random.standard_normal(3).tolist(), random.random())
    torch.manual_seed(7)
    np.random.seed(8)
    random.seed(9)
    C.set_rng_state(tensors, meta)
    assert (torch.rand(3).tolist(), np.random.standard_normal(3).tolist(),
            random.random()) == expected


def test_the_train_job_removes_its_checkpoint_when_finished(tmp_path, glue_dir, tiny_base,
                                                            monkeypatch):
    from loralens import cli
    from loralens.core.run_dir import RunDir
    from tests.helpers.overrides import tiny

    run = RunDir(tmp_path / "run")
    path = run.checkpoint_path("rte", "lora", 42)
    writes = kill_after_checkpoint(monkeypatch, 10**6)
    args = ["train", "--run-dir", str(run.root), "--glue-dir", str(glue_dir), "--no-progress",
            *tiny("methods=[lora]", "search.enabled=false", "train.batch_size=2",
                  "train.checkpoint_every=1", "train.patience=0")]
    assert cli.main(args) == 0
    assert writes == [1, 2, 3, 4]             # 8 rows in batches of 2: a checkpoint a step
    assert run.job_done("rte", "lora", 42) and not path.exists()
    assert path.parent == run.job_dir("rte", "lora", 42)
    # a finished job's leftover checkpoint (a killed --overwrite of it) goes on the next run
    path.write_bytes(b"old")
    assert cli.main(args) == 0
    assert not path.exists()


def test_a_run_directory_may_be_resumed_with_another_checkpoint_interval(tmp_path):
    """train.checkpoint_every says how often a job checkpoints, not what it learns: a
    killed run rerun with another interval is the same study (another learning rate is not)."""
    from loralens.core.config import merge
    from loralens.core.errors import RunDirError
    from loralens.core.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    run.bind_config(StudyConfig())
    run.bind_config(merge(StudyConfig, StudyConfig(), {"train": {"checkpoint_every": 1}}))
    with pytest.raises(RunDirError, match="train.lr_lora"):
        run.bind_config(merge(StudyConfig, StudyConfig(), {"train": {"lr_lora": 1e-3}}))
