"""Four methods (full, head, LoRA, DoRA) through ``loralens run --stages
train,extract,drift,weights`` on the tiny model: drift and weight-space results against the
reference method, checked by hand (methods as data: tests/unit/models/test_methods.py)."""

import json

import numpy as np
import pytest

from loralens import cli
from loralens.core.run_dir import RunDir
from tests.helpers.overrides import tiny


def _linear_cka(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_drift_and_weights_of_four_methods_against_the_reference(tmp_path, glue_dir, tiny_base):
    run = RunDir(tmp_path / "run")
    assert cli.main(["run", "--stages", "train,extract,drift,weights", "--run-dir", str(run.root),
                     "--glue-dir", str(glue_dir), "--no-progress",
                     *tiny("search.enabled=false"), "seeds=[42,7]",
                     "extract.examples=12", "methods=[full,head,lora,dora]"]) == 0
    res = json.loads((run.drift_dir / "methods.json").read_text())
    # the family: the tests made, lora and dora x 1 task x 3 measures (head's are undefined)
    assert res["reference_method"] == "full" and res["n_tests"] == 2 * 1 * 3
    rows = {(r["measure"], r["method"]): r for r in res["rows"]}
    assert {m for _, m in rows} == {"full", "head", "lora", "dora"}
    # the layer-averaged biased-CKA drift, by hand from the extracted arrays
    base = np.load(run.extract_dir("rte") / "base.npz")["hidden"].astype(np.float64)
    for method in ("lora", "dora", "head"):
        want = {}
        for seed in (42, 7):
            h = np.load(run.extract_dir("rte") / f"{method}-seed{seed}.npz")["hidden"]
            want[str(seed)] = np.mean([1 - _linear_cka(base[:, i], h[:, i].astype(np.float64))
                                       for i in range(1, base.shape[1])])
        got = rows[("cka", method)]["per_seed"]
        assert got.keys() == want.keys()
        for s in want:
            assert got[s] == pytest.approx(want[s], abs=1e-9)
    head = rows[("cka", "head")]
    assert max(abs(v) for v in head["per_seed"].values()) < 1e-9  # drift 0 by construction
    assert head["tested"] is False and head["significant"] is None and "undefined" in head["note"]
    assert rows[("cka", "full")]["note"] == "the reference method"
    # lora vs full is the same test Table 4 makes (its family is the study's, smaller)
    t4 = json.loads(run.drift_path("table4.json").read_text())
    lora_t4 = next(e for e in t4["tasks"] if e["task"] == "rte")["measures"]["cka"]
    assert rows[("cka", "lora")]["p"] == pytest.approx(lora_t4["p"])
    assert rows[("cka", "lora")]["tested"] is True

    # weights: every method's summary, the head's change 0 and untested
    w = json.loads(run.weightspace_path("methods.json").read_text())
    wrows = {(r["measure"], r["method"]): r for r in w["rows"]}
    assert {m for _, m in wrows} == {"full", "head", "lora", "dora"}
    for measure in ("rel_change", "intruders", "forgetting"):
        head = wrows[(measure, "head")]
        assert head["mean"] == 0.0 and head["test"] is None and "undefined" in head["note"]
    summary = json.loads(run.weightspace_path("summary.json").read_text())
    lora_vs_full = summary["tasks"][0]["measures"]["rel_change"]["test"]
    assert wrows[("rel_change", "lora")]["test"]["p"] == pytest.approx(lora_vs_full["p"])
    assert wrows[("rel_change", "dora")]["mean"] > 0


NEW_PEFT = ("loha", "lokr", "oft", "vera", "adalora")


def test_new_peft_methods_train_drift_weigh_and_report(tmp_path, glue_dir, tiny_base):
    """LoHa, LoKr, OFT, VeRA and AdaLoRA (PEFT's own config classes) beside full fine-tuning
    through train, extract, drift, weights and report: each has its adapter in PEFT's
    layout, a drift row, a weight-space row (PEFT merges every one of them) and its display
    name in the report."""
    from loralens.models.methods import LABELS

    run = RunDir(tmp_path / "run")
    methods = ["full", *NEW_PEFT]
    assert cli.main(["run", "--stages", "train,extract,drift,weights,report",
                     "--run-dir", str(run.root), "--glue-dir", str(glue_dir), "--no-progress",
                     *tiny("search.enabled=false"), "seeds=[42,7]", "extract.examples=12",
                     "weights.forgetting_examples=4", f"methods=[{','.join(methods)}]"]) == 0
    want_type = {"loha": "LOHA", "lokr": "LOKR", "oft": "OFT", "vera": "VERA",
                 "adalora": "ADALORA"}
    for m in NEW_PEFT:
        adapters = [RunDir.job_adapter_dir(run.job_dir("rte", m, seed)) / "adapter_config.json"
                    for seed in (42, 7)]
        assert {json.loads(a.read_text())["peft_type"] for a in adapters} == {want_type[m]}
    drift = {r["method"] for r in json.loads((run.drift_dir / "methods.json").read_text())["rows"]}
    assert drift == set(methods)
    w = json.loads(run.weightspace_path("methods.json").read_text())
    rel = {r["method"]: r for r in w["rows"] if r["measure"] == "rel_change"}
    assert set(rel) == set(methods)
    for m in NEW_PEFT:
        assert rel[m]["mean"] > 0, m  # a merged delta, not a skipped method
    md = run.report_md.read_text()
    for m in NEW_PEFT:
        assert LABELS[m] in md, m
