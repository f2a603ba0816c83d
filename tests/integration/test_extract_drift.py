"""Integration: extract and drift on SmolLM2 and real RTE rows, with two finished jobs in the
real on-disk format (weights moved a little from the base, not trained: ``fake_job``).

Tolerances: SmolLM2 has massive activations (pooled values near 3000 in layers
12-28, where one float32 ulp is 2.4e-4). Two computations of the same function
that run GEMMs of different shapes (a merged weight vs base + B A x, a batch padded
to another width) round differently, so a 1e-4 absolute bound is below float32
resolution there: each layer is compared with ``max(1e-4, 1e-6 x the layer's
largest magnitude)``, as in test_smollm2_glue.py. On a tiny random Llama (unit
tests) 1e-4 holds absolutely.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from loralens.tasks import sources as TS
from loralens.training import batches as B
from loralens.study.config import load_config
from loralens.analysis.drift.stage import LAYER_COLUMNS, run_drift
from loralens.analysis.drift.measures import MEASURES
from loralens.analysis.extract import load_pooled, pooled_hidden_states, run_extract, sample_split
from loralens.models.classifier import build_classifier
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json, read_json
from loralens.tasks.registry import get_task
from loralens.models.saving import load_trained

N = 16


def assert_layers_close(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.shape == b.shape
    for layer in range(a.shape[1]):
        diff = float(np.abs(a[:, layer] - b[:, layer]).max())
        tol = max(1e-4, 1e-6 * float(np.abs(a[:, layer]).max()))
        assert diff <= tol, f"{what}: layer {layer} differs by {diff:.3g} > {tol:.3g}"


def fake_job(cfg, run, smollm2, method: str, seed: int = 42) -> dict:
    """A finished job of ``method`` in the real on-disk format (weights, validation logits,
    metrics.json last), without training it or scoring the validation split.

    Training and scoring RTE's 277 validation rows took 94 s of CI time; the stages here
    read only the files, and ``train_job`` writing them is tested by the end-to-end smoke
    run and test_cli_train. The trainable weights move a little (LoRA's B from zero by
    N(0, 0.015), a trained SmolLM2 B's scale; full fine-tuning every weight by 1e-3 of its
    mean magnitude), so every adapted layer differs from the base model. The logits are
    random but real-shaped, so the example-level tests read the split's real labels.
    """
    from loralens.models.classifier import apply_method
    from loralens.models.methods import get_method
    from loralens.models.saving import save_trained
    from loralens.training.job import majority_baseline

    model = apply_method(build_classifier(smollm2.backbone(), 2, seed=seed), method, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                scale = 0.015 if "lora_B" in name else 1e-3 * float(p.abs().mean())
                p.add_(torch.randn(p.shape, generator=g) * scale)
    spec = get_task("rte")
    save_trained(model, method, run.weights_dir("rte", method, seed,
                                                adapter=get_method(method, cfg).is_adapter))
    val = TS.load_split(spec, "validation", cfg.data.glue_dir).labels
    train = TS.load_split(spec, "train", cfg.data.glue_dir).labels
    logits = np.random.default_rng(seed + len(method)).normal(size=(len(val), 2))
    np.save(run.val_logits_path("rte", method, seed), logits.astype(np.float32))
    acc = float((logits.argmax(1) == val).mean())
    metrics = {"task": "rte", "method": method, "seed": seed, "model": smollm2.name,
               "model_note": smollm2.note, "selection_metric": "accuracy", "score": acc,
               "validation": {"accuracy": acc, "f1": 0.5, "n": len(val)},
               "majority_baseline": majority_baseline(train, val, 2)}
    atomic_write_json(run.metrics_path("rte", method, seed), metrics)
    return metrics


@pytest.fixture(scope="module")
def study(tmp_path_factory, glue_dir, smollm2):
    cfg = load_config(overrides={
        "tasks": ["rte"], "seeds": [42], "methods": ["lora", "full"],
        "data": {"glue_dir": str(glue_dir), "max_length": 128}})
    run = RunDir(tmp_path_factory.mktemp("run"))
    run.bind_config(cfg)
    for method in ("lora", "full"):
        fake_job(cfg, run, smollm2, method)
    res = run_extract(cfg, run, n_examples=N, seed=0, base=smollm2, progress=False)
    return cfg, run, res


def test_extract_on_smollm2(study, glue_dir):
    cfg, run, res = study
    assert [(r["key"], r["status"]) for r in res] == [
        ("base", "extracted"), ("full-seed42", "extracted"), ("lora-seed42", "extracted")]
    folder = run.root / "extract" / "rte"
    man = read_json(folder / "manifest.json")
    assert man["n_examples"] == N and man["requested"] == N and man["split_rows"] == 277
    arrays = {}
    for key, entry in man["models"].items():
        hidden, ids, meta = load_pooled(folder / entry["file"])
        assert hidden.shape == (N, 31, 576) and hidden.dtype == np.float32  # 30 layers + embeddings
        assert ids.tolist() == man["example_ids"] and np.isfinite(hidden).all()
        arrays[key] = hidden
    np.testing.assert_array_equal(arrays["lora-seed42"][:, 0], arrays["base"][:, 0])
    assert not np.array_equal(arrays["full-seed42"][:, 5], arrays["base"][:, 5])
    # The published code's "750 samples" were 277 on RTE: the whole split, counted.
    val = TS.load_split(get_task("rte"), "validation", glue_dir)
    assert len(sample_split(val, 750, 0)) == 277


def test_resume_skips(study, smollm2):
    cfg, run, _ = study
    res = run_extract(cfg, run, n_examples=N, seed=0, base=smollm2, progress=False)
    assert {r["status"] for r in res} == {"skipped"}


def test_lora_separate_merged_and_padding_agree(study, smollm2, tokenizer):
    """Adapter separate vs merged, and pads, on SmolLM2 (tolerance: module docstring)."""
    cfg, run, _ = study
    folder = run.root / "extract" / "rte"
    ids = read_json(folder / "manifest.json")["example_ids"]
    split = TS.load_split(get_task("rte"), "validation", cfg.data.glue_dir)
    split.examples = [split.examples[i] for i in ids]
    enc = B.encode_split(tokenizer, split, cfg.data.max_length)
    pad = tokenizer.pad_token_id

    model = load_trained(run.job_dir("rte", "lora", 42), smollm2.backbone(), 2)
    # The stored file is what this model gives on the stored examples.
    stored, _, _ = load_pooled(folder / "lora-seed42.npz")
    separate = pooled_hidden_states(model, enc, pad, 32)
    np.testing.assert_array_equal(separate, stored)
    # After one step the adapter is nearly zero; make it matter before comparing.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    separate = pooled_hidden_states(model, enc, pad, 32)
    assert np.abs(separate[:, 10] - stored[:, 10]).max() > 1e-2
    merged = pooled_hidden_states(model.merge_and_unload(), enc, pad, 32)
    assert_layers_close(separate, merged, "LoRA separate vs merged")

    # Pooling ignores pads: one example per batch, mixed-length batches, padding to 384.
    base = build_classifier(smollm2.backbone(), 2, seed=0).eval()
    few = B.Encoded(enc.input_ids[:4], enc.labels[:4], enc.ids[:4])
    alone = pooled_hidden_states(base, few, pad, 1)
    assert_layers_close(alone, pooled_hidden_states(base, few, pad, 4, group_by_length=False),
                        "batched")
    assert_layers_close(alone, pooled_hidden_states(base, few, pad, 4, pad_to=384), "pad to 384")


def test_drift_on_smollm2(study):
    cfg, run, _ = study
    out = run_drift(cfg, run, n_resamples=1000)
    d = run.root / "drift"
    rows = list(csv.DictReader(open(d / "layers.csv")))
    assert len(rows) == 2 * 31 and tuple(rows[0]) == LAYER_COLUMNS
    for r in rows:
        assert r["n_examples"] == str(N) and r["task"] == "rte"
        assert all(r[m] != "" for m in MEASURES), r
    lora0 = next(r for r in out["layers"] if r["model"] == "lora-seed42" and r["layer"] == 0)
    assert lora0["cka"] == pytest.approx(1.0) and lora0["procrustes"] == pytest.approx(0, abs=1e-9)

    t4 = read_json(d / "table4.json")
    (e,) = t4["tasks"]
    assert e["n_examples"] == N and e["n_layers"] == 31 and e["seeds"] == {"lora": [42],
                                                                          "full": [42]}
    for measure in ("cka", "cka_debiased", "cosine"):
        c = e["measures"][measure]
        assert c["lora"]["per_seed"] and c["full"]["per_seed"]
        assert c["p"] is None and "at least 2 paired seeds" in c["note"]   # one seed
        assert len(e["per_layer"][measure]) == 31
    assert t4["model_note"] and "Q4_1" in t4["model_note"]
    assert any("paired seeds" in n for n in t4["notes"])

    t3 = read_json(d / "table3.json")
    (a,) = t3["tasks"]
    metrics = read_json(run.job_dir("rte", "lora", 42) / "metrics.json")
    assert a["metrics"]["accuracy"]["lora"]["per_seed"] == [metrics["validation"]["accuracy"]]
    assert a["n_validation"] == [277] and a["majority_baseline"] == metrics["majority_baseline"]
    assert json.loads((d / "layers.json").read_text())["rows"][0]["n_examples"] == N
