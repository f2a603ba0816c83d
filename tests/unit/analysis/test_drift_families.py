"""The drift stage's claims: the layers it averages, the families it corrects over, zero
spread, example-level tests and the seed-noise floor (synthetic arrays; one tiny model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats
import torch

from loralens.core.errors import ConfigError
from loralens.study.config import load_config
from loralens.analysis.drift.stage import run_drift
from loralens.analysis.drift.measures import drift_states, state_label, states_text
from loralens.analysis.extract import BASE_KEY, job_fingerprint, model_key
from loralens.core.files import atomic_write_json, read_json
from tests.helpers.drift_run import SEEDS, synthetic_run


# --------------------------------------------------------------------------- states

def test_states_blocks_all_and_explicit():
    assert drift_states("blocks", 31) == list(range(1, 31))      # SmolLM2: 30 blocks
    assert drift_states("blocks", 23) == list(range(1, 23))      # TinyLlama: 22 blocks
    assert drift_states("all", 4) == [0, 1, 2, 3]
    assert drift_states("3,1-2", 4) == [1, 2, 3]
    with pytest.raises(ValueError, match=r"state\(s\) \[7\] do not exist"):
        drift_states("1,7", 4)
    assert [state_label(i, 4) for i in range(4)] == [
        "embeddings", "block 1", "block 2", "block 3, after the final norm"]
    assert states_text([1, 2, 3, 7]) == "1–3, 7"
    assert states_text(list(range(1, 31)), 31) == "1–30 (30 = block 30 after the final norm)"
    with pytest.raises(ConfigError, match="drift.layers"):
        load_config(overrides=["drift.layers=last"])
    assert load_config(overrides=["drift.layers=12"]).drift.layers == "12"
    assert load_config().drift.layers == "blocks"


def test_last_hidden_state_comes_after_the_final_norm(tiny_backbone):
    """What the labels claim: transformers' hidden_states[-1] is norm(block L's output),
    hidden_states[0] the embedding output (so LoRA on q/v never moves it)."""
    captured = {}
    last = tiny_backbone.layers[-1]
    hook = last.register_forward_hook(
        lambda mod, args, out: captured.__setitem__("h", out[0] if isinstance(out, tuple)
                                                    else out))
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    with torch.no_grad():
        out = tiny_backbone(input_ids=ids, output_hidden_states=True)
    hook.remove()
    hs = out.hidden_states
    assert len(hs) == len(tiny_backbone.layers) + 1
    torch.testing.assert_close(hs[0], tiny_backbone.embed_tokens(ids))
    with torch.no_grad():
        torch.testing.assert_close(hs[-1], tiny_backbone.norm(captured["h"]))
    assert (hs[-1] - captured["h"]).abs().max() > 1e-3  # the norm changes it


def test_drift_layers_choose_the_average(tmp_path):
    cfg, run, truth = synthetic_run(tmp_path, tasks=("sst2",), layers=4)
    blocks = run_drift(cfg, run, n_resamples=200)
    every = run_drift(load_config(overrides={"tasks": ["sst2"], "seeds": list(SEEDS),
                                             "drift": {"layers": "all"}}), run, n_resamples=200)
    two = run_drift(load_config(overrides={"tasks": ["sst2"], "seeds": list(SEEDS),
                                           "drift": {"layers": "2,3"}}), run, n_resamples=200)
    rows = {(r["model"], r["layer"]): r["drift"] for r in blocks["layers"]}
    for out, states in ((blocks, [1, 2, 3]), (every, [0, 1, 2, 3]), (two, [2, 3])):
        (e,) = out["table4"]
        assert e["layers"] == states and out["drift_layers"]["states"] == states
        want = np.mean([rows[("lora-seed42", i)] for i in states])
        assert e["measures"]["cka"]["lora"]["per_seed"][0] == pytest.approx(want)
        # per-state tests: the family is the chosen states x tasks
        assert out["families"]["per_layer"]["size"] == len(states)
        tested = [p["layer"] for p in e["per_layer"]["cka"] if p["tested"]]
        assert tested == states
        assert len(out["layers"]) == 6 * 4   # layers.csv keeps every state
    # the embedding output enters only with "all"
    assert [r["in_drift"] for r in every["layers"][:4]] == [True] * 4
    assert [r["in_drift"] for r in two["layers"][:4]] == [False, False, True, True]


# --------------------------------------------------------------------------- families

def test_selecting_a_task_keeps_the_families(tmp_path):
    cfg, run, _ = synthetic_run(tmp_path, tasks=("sst2", "rte"))
    full = run_drift(cfg, run, n_resamples=200)
    one = run_drift(cfg, run, tasks=["sst2"], n_resamples=200)
    assert one["families"] == full["families"]
    # one family per drift measure (as per layer): its members are the 2 configured tasks
    assert one["families"]["table4"]["size"] == 2
    assert one["families"]["table4 cka"]["members"] == ["sst2 cka", "rte cka"]
    assert one["families"]["table3"]["members"] == ["sst2 accuracy", "rte accuracy"]
    a = next(e for e in full["table4"] if e["task"] == "sst2")["measures"]["cka"]
    b = one["table4"][0]["measures"]["cka"]
    assert b["p_bonferroni"] == pytest.approx(a["p_bonferroni"])
    assert b["p_bonferroni"] == pytest.approx(min(1.0, 2 * b["p"]))
    # Holm (the default) with rte not computed counts it as p = 1: sst2 gets the largest
    # multiplier, 2, never less than the full run's adjusted p
    assert b["correction"] == "holm" and b["p_adjusted"] == pytest.approx(min(1.0, 2 * b["p"]))
    assert b["p_adjusted"] >= a["p_adjusted"] - 1e-12
    t3a = next(e for e in full["table3"] if e["task"] == "sst2")["metrics"]["accuracy"]
    t3b = one["table3"][0]["metrics"]["accuracy"]
    assert t3b["n_tests"] == t3a["n_tests"] == 2
    assert any("computed for sst2 only" in n for n in one["notes"])
    # the stored files say so too
    t4 = read_json(run.drift_path("table4.json"))
    assert t4["tasks_computed"] == ["sst2"] and t4["tasks_configured"] == ["sst2", "rte"]


def test_mrpc_tests_f1_and_shows_accuracy_beside(tmp_path):
    cfg, run, _ = synthetic_run(tmp_path, tasks=("mrpc", "rte"))
    out = run_drift(cfg, run, n_resamples=200)
    t3 = {e["task"]: e for e in out["table3"]}
    assert list(t3["mrpc"]["metrics"]) == ["f1", "accuracy"]
    assert list(t3["rte"]["metrics"]) == ["accuracy"]          # no F1 for RTE
    f1, acc = t3["mrpc"]["metrics"]["f1"], t3["mrpc"]["metrics"]["accuracy"]
    assert f1["tested"] is True and f1["n_tests"] == 2 and f1["p"] is not None
    assert acc["tested"] is False and acc["p"] is None and acc["significant"] is None
    assert "not mrpc's study metric" in acc["note"]
    assert out["families"]["table3"]["members"] == ["mrpc f1", "rte accuracy"]


def _set_scores(run, task, scores: dict, n=20):
    """Rewrite metrics.json with these accuracies (and the extraction's fingerprints)."""
    for (method, seed), acc in scores.items():
        path = run.metrics_path(task, method, seed)
        m = read_json(path)
        m["validation"].update({"accuracy": acc, "f1": acc, "n": n})
        atomic_write_json(path, m)
    man_path = run.extract_manifest(task)
    man = read_json(man_path)
    for key, e in man["models"].items():
        if e["kind"] == "trained":
            e["metrics_sha256"] = job_fingerprint(run.job_dir(task, e["method"], e["seed"]))
    atomic_write_json(man_path, man)


def test_zero_spread_is_never_significant(tmp_path):
    """Accuracies on a 1/20 grid, LoRA one example ahead at every seed: p = 0 before."""
    cfg, run, _ = synthetic_run(tmp_path, tasks=("sst2",))
    scores = {}
    for s, k in zip(SEEDS, (12, 14, 16)):
        scores[("lora", s)], scores[("full", s)] = k / 20, (k - 1) / 20
    _set_scores(run, "sst2", scores)
    out = run_drift(cfg, run, n_resamples=200)
    c = out["table3"][0]["metrics"]["accuracy"]
    assert c["zero_spread"] is True and c["significant"] is False
    assert c["p"] is None and c["p_bonferroni"] is None and c["cohens_d"] is None
    assert c["difference"] == pytest.approx(0.05)


def test_drift_zero_spread_when_nothing_moves(tmp_path):
    """A method whose drift is 0 at every seed (both methods identical to the base)."""
    cfg, run, truth = synthetic_run(tmp_path, tasks=("sst2",), seeds=(1, 2))
    folder = run.extract_dir("sst2")
    from loralens.analysis.extract import load_pooled, save_pooled

    for key in ("lora-seed1", "lora-seed2", "full-seed1", "full-seed2"):
        _, ids, meta = load_pooled(folder / f"{key}.npz")
        save_pooled(folder / f"{key}.npz", truth["sst2"][BASE_KEY], ids, meta)
    out = run_drift(cfg, run, n_resamples=100)
    c = out["table4"][0]["measures"]["cka"]
    assert c["zero_spread"] is True and c["significant"] is False and c["p"] is None
    assert c["delta_percent"] is None  # drift full = 0: Delta% undefined
    assert any("zero spread" in n for n in out["notes"])


# --------------------------------------------------------------------------- seed floor

def test_seed_floor_is_zero_for_identical_seeds(tmp_path):
    cfg, run, truth = synthetic_run(tmp_path, tasks=("sst2",))
    from loralens.analysis.extract import load_pooled, save_pooled

    folder = run.extract_dir("sst2")
    same = truth["sst2"][model_key("full", 42)]
    for s in (1337, 2024):
        _, ids, meta = load_pooled(folder / f"full-seed{s}.npz")
        save_pooled(folder / f"full-seed{s}.npz", same, ids, meta)
    out = run_drift(cfg, run, n_resamples=100)
    floor = out["table4"][0]["seed_floor"]
    for measure in ("cka", "cka_debiased", "cosine"):
        assert floor[measure]["full"]["n_pairs"] == 3
        assert floor[measure]["full"]["max"] == pytest.approx(0.0, abs=1e-6)
        assert floor[measure]["lora"]["min"] > 1e-3  # LoRA's seeds differ
    rows = read_json(run.drift_path("table4.json"))["tasks"][0]["measures"]["cka"]
    assert rows["seed_floor"]["full"]["mean"] == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- per example

def _glue_and_logits(tmp_path, run, task="sst2", n=20, seeds=SEEDS):
    """A GLUE dir with the task's validation labels, and each job's val_logits.npy and
    accuracy made from chosen per-example correctness."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, size=n)
    root = tmp_path / "glue"
    (root / "SST-2").mkdir(parents=True)
    with open(root / "SST-2" / "dev.tsv", "w") as f:
        f.write("sentence\tlabel\n")
        for i, y in enumerate(labels):
            f.write(f"sentence number {i}\t{y}\n")
    right = {}
    scores = {}
    for si, s in enumerate(seeds):
        # full right on 12 + si rows; LoRA right on a partly different set
        r_full = np.zeros(n, bool)
        r_full[: 12 + si] = True
        r_lora = r_full.copy()
        r_lora[[0, 1]] = False            # c = 2: full right, LoRA wrong
        r_lora[15 + si:19] = True         # b = 4 - si: LoRA right, full wrong
        for method, r in (("lora", r_lora), ("full", r_full)):
            pred = np.where(r, labels, 1 - labels)
            logits = np.zeros((n, 2), np.float32)
            logits[np.arange(n), pred] = 1.0
            np.save(run.val_logits_path(task, method, s), logits)
            right[(method, s)] = r
            scores[(method, s)] = float(r.mean())
    _set_scores(run, task, scores, n)
    return root, right


def test_example_level_mcnemar_and_wilson(tmp_path, monkeypatch):
    monkeypatch.delenv("LORALENS_GLUE_DIR", raising=False)
    cfg, run, _ = synthetic_run(tmp_path, tasks=("sst2",))
    root, right = _glue_and_logits(tmp_path, run)
    cfg = load_config(overrides={"tasks": ["sst2"], "seeds": list(SEEDS),
                                 "data": {"glue_dir": str(root)}})
    out = run_drift(cfg, run, n_resamples=100)
    ex = out["table3"][0]["example_level"]
    assert [e["seed"] for e in ex] == list(SEEDS)
    assert out["families"]["examples"]["size"] == 3  # 1 task x 3 seeds
    for e in ex:
        rl, rf = right[("lora", e["seed"])], right[("full", e["seed"])]
        b, c = int(np.sum(rl & ~rf)), int(np.sum(~rl & rf))
        assert (e["lora_right_full_wrong"], e["lora_wrong_full_right"]) == (b, c)
        assert c == 2 and b == 4 - SEEDS.index(e["seed"])
        ref = scipy.stats.binomtest(b, b + c, 0.5).pvalue
        assert e["p"] == pytest.approx(ref, rel=1e-12)
        assert e["p_bonferroni"] == pytest.approx(min(1.0, 3 * ref))
        assert e["significant"] is False
        for m, r in (("lora", rl), ("full", rf)):
            ci = scipy.stats.binomtest(int(r.sum()), 20).proportion_ci(0.95, "wilson")
            assert e[m]["correct"] == int(r.sum())
            assert e[m]["ci"] == pytest.approx([ci.low, ci.high], abs=1e-12)
        assert "labels from" in e["labels"]
    # without labels (no GLUE dir), a binary task's b and c follow from the accuracies
    cfg2 = load_config(overrides={"tasks": ["sst2"], "seeds": list(SEEDS)})
    ex2 = run_drift(cfg2, run, n_resamples=100)["table3"][0]["example_level"]
    for e, e2 in zip(ex, ex2):
        assert (e2["lora_right_full_wrong"], e2["lora_wrong_full_right"], e2["p"]) == \
            (e["lora_right_full_wrong"], e["lora_wrong_full_right"], e["p"])
        assert e2["labels"].startswith("derived")
    json.dumps(ex2, allow_nan=False)


def test_example_level_notes_missing_logits(tmp_path, monkeypatch):
    monkeypatch.delenv("LORALENS_GLUE_DIR", raising=False)
    cfg, run, _ = synthetic_run(tmp_path, tasks=("sst2",))
    out = run_drift(cfg, run, n_resamples=100)
    assert out["table3"][0]["example_level"] == []
    assert any("no val_logits.npy" in n for n in out["notes"])
