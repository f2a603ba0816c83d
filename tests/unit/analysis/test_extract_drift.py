"""Extraction (tiny random Llamas) and the drift stage (synthetic arrays, no model)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import scipy.stats
import torch

from loralens.tasks import sources as TS
from loralens.training import batches as B
from loralens.analysis import similarity as S
from loralens.analysis import stats as T
from loralens.core.config import StudyConfig
from loralens.study.config import load_config
from loralens.analysis.drift.stage import LAYER_COLUMNS, TABLE3_COLUMNS, TABLE4_COLUMNS, run_drift
from loralens.analysis.drift.stats import compare
from loralens.analysis.extract import (
    BASE_KEY, job_fingerprint, load_pooled, load_task, model_key, pooled_hidden_states,
    run_extract, sample_split,
)
from loralens.models.classifier import apply_method, build_classifier
from loralens.models.saving import save_trained
from loralens.models.tiny import tiny_llama_config
from loralens.core.errors import RunDirError
from loralens.core.run_dir import RunDir

from tests.helpers.drift_run import SEEDS, synthetic_run, write_metrics

EOS = 2


# --------------------------------------------------------------------------- helpers

def tiny_factory():
    from transformers import AutoModel

    def make():
        torch.manual_seed(0)  # the "pretrained" weights: the same every call
        return AutoModel.from_config(tiny_llama_config(), dtype=torch.float32).eval()
    return make


def tiny_encoded(n=12, seed=0, lo=2, hi=25):
    rng = np.random.default_rng(seed)
    ids = [[int(t) for t in rng.integers(10, 4000, size=rng.integers(lo, hi))] for _ in range(n)]
    return B.Encoded(ids, np.array([sum(x) % 2 for x in ids]), np.arange(n))


def randomize_lora(model, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def write_glue(root, sst2_rows=30, rte_rows=10):
    (root / "SST-2").mkdir(parents=True)
    (root / "RTE").mkdir(parents=True)
    words = "the cat sat on a mat while dogs ran far away from home today".split()
    rng = np.random.default_rng(0)

    def sentence():
        return " ".join(rng.choice(words, size=rng.integers(2, 12)))
    with open(root / "SST-2" / "dev.tsv", "w") as f:
        f.write("sentence\tlabel\n")
        for i in range(sst2_rows):
            f.write(f"{sentence()}\t{i % 2}\n")
    with open(root / "RTE" / "dev.tsv", "w") as f:
        f.write("index\tsentence1\tsentence2\tlabel\n")
        for i in range(rte_rows):
            f.write(f"{i}\t{sentence()}\t{sentence()}\t"
                    f"{'entailment' if i % 3 else 'not_entailment'}\n")
    return root


def make_job(run, task, method, seed, make_backbone, cfg):
    model = apply_method(build_classifier(make_backbone(), 2, seed), method, cfg)
    if method == "lora":
        randomize_lora(model, seed)
    else:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save_trained(model, method, run.job_dir(task, method, seed) /
                 ("adapter" if method == "lora" else "model"))
    write_metrics(run, task, method, seed, accuracy=0.5 + seed / 100)


@pytest.fixture
def tiny_study(tmp_path, tiny_base):
    glue = write_glue(tmp_path / "glue")
    cfg = load_config(overrides={"tasks": ["sst2", "rte"], "seeds": [1],
                                 "model": {"name": "tiny-random"},
                                 "data": {"glue_dir": str(glue), "max_length": 64}})
    run = RunDir(tmp_path / "run")
    run.bind_config(cfg)
    for task in cfg.tasks:
        for method in ("lora", "full"):
            make_job(run, task, method, 1, tiny_base.backbone, cfg)
    return cfg, run, tiny_base


# --------------------------------------------------------------------------- pooling

def test_pooling_ignores_pads_and_batching(tiny_backbone):
    model = build_classifier(tiny_backbone, 2, seed=0).eval()
    enc = tiny_encoded(10)
    alone = pooled_hidden_states(model, enc, EOS, batch_size=1)  # no padding at all
    assert alone.shape == (10, 3, 32) and alone.dtype == np.float32
    # The definition, computed by hand: each example alone, mean over its positions.
    with torch.no_grad():
        for i, ids in enumerate(enc.input_ids):
            out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                        output_hidden_states=True)
            want = torch.stack([h[0].mean(0) for h in out.hidden_states]).numpy()
            np.testing.assert_allclose(alone[i], want, atol=1e-5, rtol=0)
    variants = [dict(batch_size=10), dict(batch_size=4, group_by_length=False),
                dict(batch_size=3, pad_to=64)]
    for kw in variants:
        np.testing.assert_allclose(pooled_hidden_states(model, enc, EOS, **kw), alone,
                                   atol=1e-5, rtol=0, err_msg=str(kw))
    # Pad ids are masked: whatever id fills the pads, the arrays are the same.
    np.testing.assert_allclose(pooled_hidden_states(model, enc, 777, batch_size=10), alone,
                               atol=1e-5, rtol=0)
    # Naive pooling over every position (the published code) would differ.
    ids, mask = B.collate(enc.input_ids, EOS)
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    assert np.abs(h.mean(1).numpy() - alone[:, -1]).max() > 1e-3


def test_bare_backbone_and_order(tiny_backbone):
    enc = tiny_encoded(7, seed=3)
    a = pooled_hidden_states(tiny_backbone, enc, EOS, batch_size=3)
    model = build_classifier(tiny_backbone, 2, seed=0)
    np.testing.assert_allclose(pooled_hidden_states(model, enc, EOS, batch_size=3), a,
                               atol=1e-6, rtol=0)
    # Rows follow the Encoded order, whatever the length-sorted batch order.
    rev = B.Encoded(enc.input_ids[::-1], enc.labels[::-1], enc.ids[::-1])
    np.testing.assert_allclose(pooled_hidden_states(tiny_backbone, rev, EOS, batch_size=3),
                               a[::-1], atol=1e-5, rtol=0)


def test_lora_separate_and_merged_agree(tiny_backbone):
    model = apply_method(build_classifier(tiny_backbone, 2, seed=0), "lora", StudyConfig())
    randomize_lora(model)
    model.eval()
    enc = tiny_encoded(9, seed=1)
    separate = pooled_hidden_states(model, enc, EOS, batch_size=4)
    merged_model = model.merge_and_unload()
    merged = pooled_hidden_states(merged_model, enc, EOS, batch_size=4)
    assert np.abs(separate - merged).max() <= 1e-4
    # ... and the adapter does change the states (the test is not vacuous).
    base = pooled_hidden_states(build_classifier(tiny_factory()(), 2, 0), enc, EOS, 4)
    assert np.abs(separate[:, 1:] - base[:, 1:]).max() > 1e-2
    np.testing.assert_array_equal(separate[:, 0], base[:, 0])  # embeddings untouched by LoRA


# --------------------------------------------------------------------------- stage

def test_sample_is_fixed_and_short_split_is_whole(tmp_path):
    from loralens.tasks.registry import get_task

    glue = write_glue(tmp_path / "glue")
    split = TS.load_split(get_task("sst2"), "validation", glue)
    a, b = sample_split(split, 12, 0), sample_split(split, 12, 0)
    assert [e.id for e in a.examples] == [e.id for e in b.examples]
    assert [e.id for e in a.examples] == sorted(e.id for e in a.examples)
    assert len(a) == 12 and [e.id for e in sample_split(split, 12, 1).examples] != \
        [e.id for e in a.examples]
    assert len(sample_split(split, 750, 0)) == 30


def test_run_extract_files_manifest_and_resume(tiny_study):
    cfg, run, base = tiny_study
    res = run_extract(cfg, run, n_examples=12, seed=0, batch_size=4, base=base, progress=False)
    assert [(r["task"], r["key"], r["status"]) for r in res] == [
        (t, k, "extracted") for t in ("sst2", "rte") for k in ("base", "full-seed1",
                                                               "lora-seed1")]
    for task, real in (("sst2", 12), ("rte", 10)):
        folder = run.root / "extract" / task
        man = json.loads((folder / "manifest.json").read_text())
        # The real count is recorded: RTE's 10 rows are fewer than the 12 requested.
        assert man["requested"] == 12 and man["n_examples"] == real and man["seed"] == 0
        assert len(man["example_ids"]) == real and man["split_rows"] == (30 if task == "sst2"
                                                                          else 10)
        assert set(man["models"]) == {"base", "full-seed1", "lora-seed1"}
        arrays = {}
        for key, entry in man["models"].items():
            hidden, ids, meta = load_pooled(folder / entry["file"])
            # The same examples, in the same order, for every model.
            assert ids.tolist() == man["example_ids"]
            assert hidden.shape == (real, 3, 32) and hidden.dtype == np.float32
            assert meta["n_examples"] == real and meta["requested"] == 12
            arrays[key] = hidden
        assert man["models"]["lora-seed1"]["metrics_sha256"] == job_fingerprint(
            run.job_dir(task, "lora", 1))
        np.testing.assert_array_equal(arrays["lora-seed1"][:, 0], arrays["base"][:, 0])
        assert np.abs(arrays["lora-seed1"][:, 2] - arrays["base"][:, 2]).max() > 1e-3
        assert np.abs(arrays["full-seed1"][:, 0] - arrays["base"][:, 0]).max() > 1e-3
        # No token-level tensors on disk: three pooled files and a manifest.
        assert sorted(p.name for p in folder.iterdir()) == [
            "base.npz", "full-seed1.npz", "lora-seed1.npz", "manifest.json"]
    # The sample equals the documented draw.
    from loralens.tasks.registry import get_task
    want = sample_split(TS.load_split(get_task("sst2"), "validation", cfg.data.glue_dir), 12, 0)
    assert load_task(run, "sst2")[0]["example_ids"] == [e.id for e in want.examples]

    # Resume: everything finished is skipped, files untouched.
    f = run.root / "extract" / "sst2" / "lora-seed1.npz"
    mtime = f.stat().st_mtime_ns
    again = run_extract(cfg, run, n_examples=12, base=base, progress=False)
    assert {r["status"] for r in again} == {"skipped"} and f.stat().st_mtime_ns == mtime

    # Killed after the file was renamed in but before the manifest was updated: adopted.
    man_path = run.root / "extract" / "sst2" / "manifest.json"
    man = json.loads(man_path.read_text())
    del man["models"]["lora-seed1"]
    man_path.write_text(json.dumps(man))
    (run.root / "extract" / "sst2" / "full-seed1.npz").unlink()
    again = run_extract(cfg, run, tasks=["sst2"], n_examples=12, base=base, progress=False)
    assert {r["key"]: r["status"] for r in again} == {
        "base": "skipped", "full-seed1": "extracted", "lora-seed1": "skipped"}
    assert "lora-seed1" in json.loads(man_path.read_text())["models"]

    # Never silently overwritten: another sample, or a retrained job, is an error.
    with pytest.raises(RunDirError, match="another sample"):
        run_extract(cfg, run, tasks=["sst2"], n_examples=8, base=base, progress=False)
    write_metrics(run, "sst2", "lora", 1, accuracy=0.9)
    with pytest.raises(RunDirError, match="earlier version"):
        run_extract(cfg, run, tasks=["sst2"], n_examples=12, base=base, progress=False)
    with pytest.raises(RunDirError, match="earlier version"):
        run_drift(cfg, run, tasks=["sst2"])
    res = run_extract(cfg, run, tasks=["sst2"], n_examples=12, base=base, overwrite=True,
                      progress=False)
    assert {r["status"] for r in res} == {"extracted"}


def test_extract_then_drift_single_seed(tiny_study):
    """One seed (the smoke preset): drift runs, paired statistics are null with a note."""
    cfg, run, base = tiny_study
    run_extract(cfg, run, n_examples=12, batch_size=4, base=base, progress=False)
    out = run_drift(cfg, run, n_resamples=200)
    t4 = {e["task"]: e for e in out["table4"]}
    assert set(t4) == {"sst2", "rte"} and t4["rte"]["n_examples"] == 10
    c = t4["sst2"]["measures"]["cka"]
    assert c["t"] is None and c["p"] is None and c["cohens_d"] is None
    assert c["delta_percent_ci"] is None and c["lora"]["sd"] is None
    assert c["note"] and "at least 2 paired seeds" in c["note"]
    assert c["delta_percent"] == pytest.approx(
        100 * (c["full"]["mean"] - c["lora"]["mean"]) / c["full"]["mean"])
    assert any("at least 2 paired seeds" in n for n in out["notes"])
    assert any("rte: 10 examples" in n for n in out["notes"])
    t3 = {e["task"]: e for e in out["table3"]}
    assert t3["sst2"]["metrics"]["accuracy"]["p"] is None
    assert t3["sst2"]["metrics"]["accuracy"]["lora"]["per_seed"] == [0.51]
    for name in ("layers.csv", "layers.json", "table3.csv", "table3.json", "table4.csv",
                 "table4.json"):
        assert (run.root / "drift" / name).is_file()
    rows = list(csv.DictReader(open(run.root / "drift" / "table4.csv")))
    assert {r["p"] for r in rows} == {""} and {r["n_examples"] for r in rows} == {"12", "10"}


# --------------------------------------------------------------------------- drift (synthetic)

def test_drift_outputs_match_similarity_and_stats(tmp_path):
    cfg, run, truth = synthetic_run(tmp_path)
    out = run_drift(cfg, run, n_resamples=2000, ci_seed=7)

    # layers.csv / .json: every field, values equal direct calls to similarity.py.
    rows = list(csv.DictReader(open(run.root / "drift" / "layers.csv")))
    assert tuple(rows[0]) == LAYER_COLUMNS
    assert len(rows) == 2 * 6 * 4 == len(out["layers"])
    for r in out["layers"]:
        arrays = truth[r["task"]]
        X = arrays[BASE_KEY][:, r["layer"]]
        Y = arrays[r["model"]][:, r["layer"]]
        assert r["n_examples"] == 20 and r["requested"] == 25
        # float32 pooled states: drift uses float32 Gram products (exact float64 centering
        # after them), linear_cka float64 throughout; documented agreement 1e-6
        assert r["cka"] == pytest.approx(S.linear_cka(X, Y), abs=1e-6)
        assert r["cka_debiased"] == pytest.approx(S.linear_cka(X, Y, debiased=True), abs=1e-6)
        assert r["cosine"] == pytest.approx(S.cosine_similarity(X, Y), abs=1e-12)
        assert r["procrustes"] == pytest.approx(S.procrustes_distance(X, Y), abs=1e-12)
        assert r["cka_rbf"] == pytest.approx(S.rbf_cka(X, Y), abs=1e-12)
        assert r["drift"] == pytest.approx(1 - r["cka"], abs=1e-15)
        # standardised CKA: plain CKA of z-scored columns (numpy, written out)
        Xz, Yz = [(A - A.mean(0)) / A.std(0) for A in (X.astype(np.float64),
                                                      Y.astype(np.float64))]
        assert r["cka_std"] == pytest.approx(S.linear_cka(Xz, Yz), abs=1e-6)
        assert r["cka_std_debiased"] == pytest.approx(S.linear_cka(Xz, Yz, debiased=True),
                                                      abs=1e-6)
        # variance shares of the top 1 and 5 dimensions, numpy written out
        for A, suffix in ((Y, ""), (X, "_base")):
            v = np.sort(A.astype(np.float64).var(axis=0))[::-1]
            assert r[f"var_top1{suffix}"] == pytest.approx(v[0] / v.sum(), rel=1e-9)
            assert r[f"var_top5{suffix}"] == pytest.approx(v[:5].sum() / v.sum(), rel=1e-9)
    layers_json = json.loads((run.root / "drift" / "layers.json").read_text())
    assert layers_json["rows"][0].keys() == set(LAYER_COLUMNS)

    # Every state stays in layers.csv, labelled; the blocks (1..3) are the drift set.
    assert [(r["layer"], r["state"], r["in_drift"]) for r in out["layers"][:4]] == [
        (0, "embeddings", False), (1, "block 1", True), (2, "block 2", True),
        (3, "block 3, after the final norm", True)]

    # Table 4: the layer-averaged drift, tested against scipy and hand formulas.
    assert tuple(next(csv.DictReader(open(run.root / "drift" / "table4.csv")))) == \
        TABLE4_COLUMNS
    t4 = json.loads((run.root / "drift" / "table4.json").read_text())
    # families: one per drift measure, the 2 configured tasks (per state: 3 states x 2 tasks)
    assert t4["n_tests"] == 2 and t4["alpha_per_test"] == pytest.approx(0.05 / 2)
    assert t4["families"]["table4"]["size"] == 2
    assert t4["families"]["per_layer"]["size"] == 3 * 2
    assert t4["drift_layers"]["states"] == [1, 2, 3]
    holm_by_measure: dict = {}
    for e in t4["tasks"]:
        arrays = truth[e["task"]]
        assert e["n_examples"] == 20 and e["requested"] == 25 and e["n_layers"] == 4
        assert e["layers"] == [1, 2, 3]
        for measure, fn in (("cka", S.linear_cka),
                            ("cka_debiased", lambda X, Y: S.linear_cka(X, Y, debiased=True)),
                            ("cosine", S.cosine_similarity)):
            per = {m: [np.mean([1 - fn(arrays[BASE_KEY][:, li], arrays[model_key(m, s)][:, li])
                                for li in (1, 2, 3)]) for s in SEEDS] for m in ("lora", "full")}
            c = e["measures"][measure]
            # CKA: float32 Gram products in drift (agreement 1e-6), see above
            tol = 1e-6 if measure.startswith("cka") else 1e-12
            np.testing.assert_allclose(c["lora"]["per_seed"], per["lora"], rtol=0, atol=tol)
            np.testing.assert_allclose(c["full"]["per_seed"], per["full"], rtol=0, atol=tol)
            assert c["lora"]["sd"] == pytest.approx(np.std(per["lora"], ddof=1), abs=tol)
            mf, ml = np.mean(per["full"]), np.mean(per["lora"])
            assert c["delta_percent"] == pytest.approx(100 * (mf - ml) / mf, rel=1e-4)
            assert c["delta_percent_ci"] == pytest.approx(list(T.bootstrap_reduction_ci(
                per["full"], per["lora"], n_resamples=2000, seed=7)), rel=1e-4)
            assert c["bootstrap_distinct_resamples"] == 10  # C(5, 3) for 3 seeds
            # d and t of full - lora: positive when full fine-tuning drifts more (the paper)
            ref = scipy.stats.ttest_rel(per["full"], per["lora"])
            assert c["t"] == pytest.approx(ref.statistic, rel=1e-4)
            assert c["p"] == pytest.approx(ref.pvalue, rel=1e-4)
            assert c["p_bonferroni"] == pytest.approx(min(1.0, 2 * ref.pvalue), rel=1e-4)
            holm_by_measure.setdefault(measure, []).append((ref.pvalue, c))
            diff = np.subtract(per["full"], per["lora"])
            assert c["cohens_d"] == pytest.approx(diff.mean() / diff.std(ddof=1), rel=1e-4)
            assert c["cohens_d"] > 0 and c["sign"] == "full - lora"
            assert c["seeds"] == sorted(SEEDS) and c["note"] is None
            # Per state: the same statistics on one state's drift, family 3 states x 2 tasks.
            assert [p["layer"] for p in e["per_layer"][measure]] == [0, 1, 2, 3]
            layer0 = e["per_layer"][measure][0]
            assert layer0["tested"] is False and layer0["p"] is None  # outside drift.layers
            layer = e["per_layer"][measure][3]
            lo = [1 - fn(arrays[BASE_KEY][:, 3], arrays[model_key("lora", s)][:, 3])
                  for s in SEEDS]
            fu = [1 - fn(arrays[BASE_KEY][:, 3], arrays[model_key("full", s)][:, 3])
                  for s in SEEDS]
            ref = scipy.stats.ttest_rel(fu, lo)
            assert layer["t"] == pytest.approx(ref.statistic, rel=1e-4)
            assert layer["p_bonferroni"] == pytest.approx(min(1, 6 * ref.pvalue), rel=1e-4)
            assert layer["correction"] == "holm" and layer["n_tests"] == 6
            assert layer["delta_percent"] == pytest.approx(
                100 * (np.mean(fu) - np.mean(lo)) / np.mean(fu), rel=1e-4)
            # Seed floor: 1 - similarity between two seeds of one method, averaged over 1..3.
            floor = e["seed_floor"][measure]["full"]
            pairs = [(42, 1337), (42, 2024), (1337, 2024)]
            want = [np.mean([1 - fn(arrays[model_key("full", a)][:, li],
                                    arrays[model_key("full", b)][:, li]) for li in (1, 2, 3)])
                    for a, b in pairs]
            assert [p["seeds"] for p in floor["pairs"]] == [list(p) for p in pairs]
            np.testing.assert_allclose([p["mean"] for p in floor["pairs"]], want, atol=tol)
            assert floor["mean"] == pytest.approx(np.mean(want), abs=tol)
            assert c["seed_floor"]["full"]["mean"] == floor["mean"]
        # Standardised CKA beside them, descriptive (not tested, in no family).
        for measure in ("cka_std", "cka_std_debiased"):
            c = e["measures"][measure]
            assert c["tested"] is False and c["p"] is None and c["significant"] is None
        # LoRA (smaller perturbation) drifts less in this synthetic set-up.
        assert e["measures"]["cka"]["delta_percent"] > 0
    # Holm within each measure's family of 2 (the default stats.correction), by hand: the
    # smaller p x 2, the larger x 1 but never below the smaller's adjusted value
    for measure, pcs in holm_by_measure.items():
        (pa, ca), (pb, cb) = sorted(pcs, key=lambda x: x[0])
        first = min(1.0, 2 * pa)
        assert ca["p_adjusted"] == pytest.approx(first, rel=1e-4)
        assert cb["p_adjusted"] == pytest.approx(max(first, pb), rel=1e-4)
        assert ca["significant"] == (first < 0.05)

    # Table 3: the study metric of each task (accuracy for SST-2 and RTE), by hand.
    assert tuple(next(csv.DictReader(open(run.root / "drift" / "table3.csv")))) == \
        TABLE3_COLUMNS
    t3 = json.loads((run.root / "drift" / "table3.json").read_text())
    assert t3["families"]["table3"]["size"] == 2
    assert t3["families"]["table3"]["members"] == ["sst2 accuracy", "rte accuracy"]
    for e in t3["tasks"]:
        assert e["majority_baseline"]["accuracy"] == 0.51 and e["n_validation"] == [20]
        assert list(e["metrics"]) == ["accuracy"]  # F1 of SST-2/RTE is not a study metric
        vals = {m: [json.loads((run.job_dir(e["task"], m, s) / "metrics.json").read_text())
                    ["validation"]["accuracy"] for s in SEEDS] for m in ("lora", "full")}
        c = e["metrics"]["accuracy"]
        assert c["lora"]["per_seed"] == vals["lora"]
        assert c["full"]["mean"] == pytest.approx(np.mean(vals["full"]))
        assert c["full"]["sd"] == pytest.approx(np.std(vals["full"], ddof=1))
        diff = np.subtract(vals["lora"], vals["full"])
        t = diff.mean() / (diff.std(ddof=1) / np.sqrt(3))
        p = 2 * scipy.stats.t.sf(abs(t), df=2)
        assert c["t"] == pytest.approx(t) and c["p"] == pytest.approx(p)
        assert c["p_bonferroni"] == pytest.approx(min(1.0, 2 * p))
        assert c["cohens_d"] == pytest.approx(diff.mean() / diff.std(ddof=1))
        assert c["difference"] == pytest.approx(np.mean(vals["lora"]) - np.mean(vals["full"]))
    # The real count is shown: 20 of 25 requested is called out.
    assert any("20 examples" in n and "25 requested" in n for n in out["notes"])


def test_drift_rejects_different_evaluation_examples(tmp_path):
    cfg, run, _ = synthetic_run(tmp_path, tasks=("sst2",), ids_override=np.arange(20) + 500)
    with pytest.raises(RunDirError, match="same for every model"):
        run_drift(cfg, run, n_resamples=100)


def test_drift_notes_missing_extraction_and_unextracted_jobs(tmp_path):
    cfg, run, _ = synthetic_run(tmp_path, tasks=("sst2",))
    write_metrics(run, "sst2", "lora", 7)       # a job finished after extraction
    cfg2 = load_config(overrides={"tasks": ["sst2", "rte"]})
    out = run_drift(cfg2, run, n_resamples=100)
    assert any("rte: not extracted" in n for n in out["notes"])
    assert any("lora-seed7" in n and "not extracted" in n for n in out["notes"])
    assert [e["task"] for e in out["table4"]] == ["sst2"]


def test_compare_one_method_or_seed():
    c = compare({1: 0.2}, {}, n_tests=3)
    assert c["full"] is None and c["p"] is None and "only LoRA" in c["note"]
    c = compare({1: 0.2, 2: 0.3}, {1: 0.4, 2: 0.6}, n_tests=3, n_resamples=100)
    assert c["p"] is not None and c["alpha_per_test"] == pytest.approx(0.05 / 3)
    # zero spread (both differences -0.2): undefined, never significant
    c = compare({1: 0.2, 2: 0.3}, {1: 0.4, 2: 0.5}, n_tests=3, n_resamples=100)
    assert c["p"] is None and c["significant"] is False and c["zero_spread"] is True
    assert "zero spread" in c["note"]
    c = compare({1: 0.2, 2: 0.3}, {2: 0.5, 3: 0.4}, n_tests=3)
    assert c["seeds"] == [2] and c["t"] is None and c["unpaired_seeds"] == {"lora": [1],
                                                                           "full": [3]}
