"""Test families declared from the config alone; Holm beside Bonferroni; undefined tests stay
in their family; contrasts true by construction are stated, not tested."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ttest_rel

from loralens.analysis import families as F
from loralens.analysis.stats import adjust_p, bonferroni, holm
from loralens.core.config import StudyConfig, merge
from loralens.core.errors import ConfigError


def cfg_of(**over) -> StudyConfig:
    return merge(StudyConfig, StudyConfig(), over)


# --------------------------------------------------------------------------- Holm

def test_holm_hand_computed():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running
    # max 0.02, 0.03, 0.06, 0.06; back in input order:
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(adjust_p([0.01, 0.04, 0.03, 0.005], "bonferroni"),
                               [0.04, 0.16, 0.12, 0.02])
    # capped at 1; a declared m larger than the p-values given (the rest count as p = 1)
    np.testing.assert_allclose(holm([0.5, 0.2]), [0.5, 0.4])
    np.testing.assert_allclose(holm([0.01, 0.02], n_tests=4), [0.04, 0.06])


def test_holm_never_above_bonferroni():
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.uniform(0, 0.2, size=6)
        assert np.all(holm(p) <= bonferroni(p) + 1e-15)


def test_undefined_p_counts_in_m_and_stays_undefined():
    out = holm([0.01, math.nan, 0.03])
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], [0.03, 0.06])  # m = 3, not 2
    out = adjust_p([0.02, math.nan], "bonferroni")
    assert out[0] == pytest.approx(0.04) and math.isnan(out[1])
    with pytest.raises(ValueError, match="correction must be one of"):
        adjust_p([0.1], "sidak")


def test_config_key_validated():
    assert StudyConfig().stats.correction == "holm"
    assert cfg_of(stats={"correction": "bonferroni"}).stats.correction == "bonferroni"
    with pytest.raises(ConfigError, match=r"stats\.correction: 'sidak' is not one of"):
        cfg_of(stats={"correction": "sidak"})


# --------------------------------------------------------------------------- declarations

def test_families_declared_from_the_config():
    cfg = cfg_of(tasks=["mrpc", "rte"], seeds=[1, 2], weights={"forgetting": False})
    fams = F.declare(cfg, states=[1, 2])
    assert fams["table3"].members == ("mrpc f1", "rte accuracy")
    # Table 4: one family per measure, as per layer
    assert fams["table4 cka_debiased"].members == ("mrpc cka_debiased", "rte cka_debiased")
    assert fams["table4 cosine"].size == 2
    assert fams["per_layer cka"].members == ("mrpc cka state 1", "mrpc cka state 2",
                                             "rte cka state 1", "rte cka state 2")
    assert fams["examples"].size == 4
    assert fams["weights intruders"].members == ("mrpc intruders", "rte intruders")
    assert "weights forgetting" not in fams  # weights.forgetting off: no such test
    assert all(f.correction == "holm" for f in fams.values())
    b = F.declare(cfg_of(tasks=["rte"], stats={"correction": "bonferroni"}))
    assert b["table3"].correction == "bonferroni" and b["table3"].members == ("rte accuracy",)


def test_by_construction_contrasts_are_not_members():
    cfg = cfg_of(tasks=["rte"], lora={"r": 16})
    w = F.weight_families(cfg)
    assert w["effective_rank"].members == () and w["rank90"].members == ()
    assert "rank <= 16 by construction" in w["effective_rank"].stated[0]
    assert w["rel_change"].members == ("rte rel_change",)
    more = F.method_weight_families(cfg_of(tasks=["rte"], methods=["pissa", "dora", "head",
                                                                   "full"]))
    # PiSSA's change B A - B0 A0 has rank <= 2r; DoRA rescales columns (no bound): tested
    assert more["effective_rank"].members == ("rte dora effective_rank",)
    assert any("rank <= 16" in s for s in more["effective_rank"].stated)
    # a head-only method changes no backbone weight: no member in any family
    assert more["intruders"].members == ("rte pissa intruders", "rte dora intruders")


def test_a_member_outside_the_family_is_refused():
    fam = F.Family("x", ("a", "b"), "")
    with pytest.raises(ValueError, match="not members of the declared family"):
        fam.adjust({"c": 0.01})


# --------------------------------------------------------------------------- zero spread

P_TASK = ttest_rel([0.22, 0.33, 0.44], [0.20, 0.30, 0.40]).pvalue  # diffs 2, 3, 4 (x0.01)


def test_zero_spread_stays_in_the_family():
    assert 0.025 < P_TASK < 0.05  # significant alone, not after doubling
    fam = F.Family("weights rel_change", ("mrpc rel_change", "rte rel_change"), "")
    adj = fam.adjust({"mrpc rel_change": None, "rte rel_change": P_TASK})
    assert adj["mrpc rel_change"] is None
    assert adj["rte rel_change"] == pytest.approx(2 * P_TASK)  # m = 2, not 1
    # the old rule (family = the tests that turned out defined) made it significant
    assert bonferroni(P_TASK, 1) < 0.05 <= adj["rte rel_change"]


def _result(task, method, seed, rel):
    mats = [{"group": "common", "intruders": {"0.5": 1}, "rel_change": rel,
             "effective_rank": 8.0 if method == "lora" else 90.0 + seed, "rank90": 4}]
    return {"task": task, "method": method, "seed": seed, "matrices": mats}


def test_weights_stage_reports_zero_spread_as_undefined():
    from loralens.analysis.weights.analyzer import summarize
    from loralens.report.significance import p_cells

    seeds = (1, 2, 3)
    lora = {"mrpc": [0.5, 0.6, 0.7], "rte": [0.22, 0.33, 0.44]}
    full = {"mrpc": [0.4, 0.5, 0.6], "rte": [0.20, 0.30, 0.40]}  # mrpc: every diff 0.1
    results = [_result(t, m, s, v[t][i]) for t in lora for m, v in (("lora", lora),
                                                                    ("full", full))
               for i, s in enumerate(seeds)]
    cfg = cfg_of(tasks=["mrpc", "rte"], seeds=list(seeds), weights={"forgetting": False},
                 stats={"correction": "bonferroni"})
    s = summarize(results, ["mrpc", "rte"], cfg)
    mrpc = s["tasks"][0]["measures"]["rel_change"]["test"]
    rte = s["tasks"][1]["measures"]["rel_change"]["test"]
    assert mrpc["zero_spread"] and mrpc["p_adjusted"] is None and not mrpc["significant"]
    assert mrpc["p_text"] == "undefined (zero spread)"
    assert p_cells(mrpc)[0] == "undefined (zero spread)"
    assert rte["n_tests"] == 2 and rte["p"] == pytest.approx(P_TASK)
    assert rte["p_adjusted"] == pytest.approx(2 * P_TASK) and rte["significant"] is False
    # effective rank: stated (LoRA's update has rank <= 8), not tested
    er = s["tasks"][1]["measures"]["effective_rank"]["test"]
    assert er["tested"] is False and "rank <= 8" in er["by_construction"]
    assert p_cells(er)[0] == "not tested"
    assert s["families"]["rel_change"]["members"] == ["mrpc rel_change", "rte rel_change"]


def test_drift_tests_corrected_within_their_declared_family():
    """Table 4: one family per measure; a zero-spread task stays in it (m = 2), so the
    other task's p = 0.0351 becomes 0.0702 (Holm and Bonferroni agree with one defined p):
    not significant, where a family of the defined tests alone (m = 1) called it so."""
    from loralens.analysis.drift.stats import correct_drift, families

    fam = families(["mrpc", "rte"], [1, 2, 3], [1], 0.05, "holm")
    zero = {"tested": True, "p": None, "zero_spread": True, "significant": False}
    real = {"tested": True, "p": P_TASK, "zero_spread": False, "significant": True}
    layer = {"layer": 1, "in_drift": True, "tested": True, "p": 0.01, "zero_spread": False}
    table4 = [{"task": "mrpc", "measures": {"cka": dict(zero)}, "per_layer": {}},
              {"task": "rte", "measures": {"cka": dict(real), "cosine": dict(real)},
               "per_layer": {"cka": [dict(layer)]}}]
    correct_drift(fam, [], table4)
    mrpc, rte = table4[0]["measures"]["cka"], table4[1]["measures"]["cka"]
    assert mrpc["p_adjusted"] is None and mrpc["p_text"] == "undefined (zero spread)"
    assert rte["n_tests"] == 2 and rte["test_family"] == "table4 cka"
    assert rte["p_adjusted"] == pytest.approx(2 * P_TASK) and rte["significant"] is False
    # cosine's family has the same two members; mrpc's cosine not computed counts as p = 1
    assert table4[1]["measures"]["cosine"]["p_adjusted"] == pytest.approx(2 * P_TASK)
    # per layer: 1 state x 2 tasks, Holm: 0.01 x 2
    assert table4[1]["per_layer"]["cka"][0]["p_adjusted"] == pytest.approx(0.02)


def test_a_test_outside_the_declared_family_is_not_called():
    """An example-level test of a seed the config does not list (trained by hand) is shown
    uncorrected, never called significant, and does not grow the family."""
    from loralens.analysis.drift.stats import correct_drift, families

    fam = families(["rte"], [1], None, 0.05, "holm")
    t3 = [{"task": "rte", "selection_metric": "accuracy", "metrics": {},
           "example_level": [{"seed": 1, "p": 0.01}, {"seed": 7, "p": 0.001}]}]
    correct_drift(fam, t3, [])
    one, seven = t3[0]["example_level"]
    assert one["p_adjusted"] == pytest.approx(0.01) and one["significant"] is True
    assert seven["p_adjusted"] is None and seven["significant"] is None
    assert "not in the declared family examples" in seven["note"]
