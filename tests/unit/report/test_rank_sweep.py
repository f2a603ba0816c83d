"""The rank sweep (issue 15): the ``ranks`` and ``ranks-paper`` presets, the trainable
parameter counts the figures plot, and Figures R1 (accuracy vs trainable parameters) and
R2 (drift vs rank), read back from the matplotlib artists (synthetic run data), plus one
micro run of three LoRA ranks on the tiny random model that produces both figures."""

from __future__ import annotations


import numpy as np
import pytest

from loralens.core.config import StudyConfig
from loralens.study.config import load_config
from loralens.core.config_load import preset_names
from loralens.models.methods import get_method
from loralens.report.figures import FIGURES
from loralens.report.rank_figures import (
    RANK_FIGURES, WHY_NOT, fig_accuracy_vs_params, fig_drift_vs_rank, has_rank_sweep,
)
from loralens.report.run_data import RunData
from loralens.core.run_dir import RunDir

from tests.helpers.figures import plotted

SWEEP = ["head", "lora-r1", "lora-r2", "lora-r4", "lora-r8", "lora-r16", "lora-r64",
         "rslora-r1", "rslora-r8", "rslora-r64", "lora-all-linear", "full"]
QV = ["q_proj", "v_proj"]


# --------------------------------------------------------------------------- presets

def _flat(d: dict) -> dict:
    """{"train": {"epochs": 1}} -> {"train.epochs": 1}; method_defs stays whole."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("method_defs", "task_defs"):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


# The keys each rank preset sets (resolved: defaults + preset), as literals; every other
# key must keep its default.
RANKS = {
    "tasks": ["sst2"], "methods": SWEEP, "seeds": [42, 1337],
    "model.name": "smollm2-135m", "data.max_length": 128, "data.train_size": 768,
    "data.early_stop_size": 64, "train.epochs": 1, "train.batch_size": 16,
    "train.lr_lora": 1e-3, "train.lr_full": 3e-5, "train.evals_per_epoch": 2,
    "search.enabled": False, "extract.examples": 128, "weights.forgetting": False,
    "bench.requests": 10, "bench.warmup": 2, "bench.seeds": [42],
}
RANKS_PAPER = {
    "tasks": ["sst2"], "methods": SWEEP, "seeds": [42, 1337, 2024],
    "model.name": "tinyllama-1.1b", "data.max_length": 384, "data.train_size": None,
    "data.early_stop_size": None, "train.epochs": 1, "train.grad_accum": 8,
    "train.lr_lora": 5e-4, "train.lr_full": 2e-5, "train.precision": "auto",
    "train.gradient_checkpointing": "auto", "train.optimizer_full": "auto",
    "search.enabled": False, "extract.examples": 750, "bench.seeds": [42],
}


def test_rank_presets_are_listed_and_resolve_to_their_tables():
    assert {"ranks", "ranks-paper"} <= set(preset_names())
    defaults = _flat(StudyConfig().to_dict())
    for name, want in (("ranks", RANKS), ("ranks-paper", RANKS_PAPER)):
        got = _flat(load_config(preset=name).to_dict())
        assert got["preset"] == name
        wrong = {k: (got[k], v) for k, v in want.items() if got[k] != v}
        assert not wrong, f"{name}: (got, expected): {wrong}"
        moved = {k for k in set(got) - set(want) - {"preset", "method_defs"}
                 if got[k] != defaults[k]}
        assert not moved, f"{name}: keys off their default the table does not list: {moved}"


@pytest.mark.parametrize("name", ["ranks", "ranks-paper"])
def test_rank_preset_methods_resolve(name):
    cfg = load_config(preset=name)
    methods = {m: get_method(m, cfg) for m in cfg.methods}
    assert methods["head"].family == "head" and methods["full"].family == "full"
    for r in (1, 2, 4, 8, 16, 64):
        p = methods[f"lora-r{r}"].peft
        assert methods[f"lora-r{r}"].family == "peft"
        # alpha = 2r: the update scale alpha / r is the study's (16 / 8) at every rank
        assert (p["type"], p["r"], p["alpha"], p["target_modules"]) == ("lora", r, 2.0 * r, QV)
        assert not p["use_dora"] and not p["use_rslora"] and p["init_lora_weights"] is True
    p = methods["lora-all-linear"].peft
    assert (p["r"], p["alpha"], p["target_modules"]) == (8, 16.0, "all-linear")
    # rsLoRA arms (issue 27.4c): one alpha, scale alpha / sqrt(r); at r = 8 the scale is
    # lora-r8's 16 / 8 = 2, at r = 1 2*sqrt(8) = 5.657, at r = 64 2*sqrt(8)/8 = 0.7071
    for r, scale in ((1, 5.656854), (8, 2.0), (64, 0.707107)):
        p = methods[f"rslora-r{r}"].peft
        assert (p["type"], p["r"], p["target_modules"], p["use_rslora"]) == ("lora", r, QV, True)
        assert p["alpha"] / r ** 0.5 == pytest.approx(scale, abs=1e-6)
        assert not p["use_dora"] and p["init_lora_weights"] is True


# --------------------------------------------------------------------------- parameter counts

def test_trainable_parameters_by_hand(tiny_base):
    """LoRA trains r * (d_in + d_out) per adapted matrix, plus the head (hidden x labels);
    the tiny random model: hidden 32, 4 query heads and 2 key/value heads of size 8,
    MLP 64, 2 layers, 259 byte-level tokens (tied embeddings), no biases."""
    from loralens.models.methods import make_trainable
    from loralens.models.classifier import build_classifier
    from loralens.training.job import count_parameters

    h, kv, mlp, layers, vocab, labels = 32, 16, 64, 2, 259, 2
    head = h * labels
    shapes = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, mlp),
              "up": (h, mlp), "down": (mlp, h)}
    per_rank_qv = layers * sum(a + b for a, b in (shapes["q"], shapes["v"]))     # 224
    per_rank_all = layers * sum(a + b for a, b in shapes.values())              # 1024
    full = vocab * h + layers * (sum(a * b for a, b in shapes.values()) + 2 * h) + h + head
    want = {"head": head, "full": full, "lora-all-linear": 8 * per_rank_all + head,
            **{f"lora-r{r}": r * per_rank_qv + head for r in (1, 2, 4, 8, 16, 64)}}
    assert want["lora-r1"] == 288 and want["full"] == 26944
    cfg = load_config(preset="ranks")
    for name, n in want.items():
        model = make_trainable(build_classifier(tiny_base.backbone(), labels, 0),
                               get_method(name, cfg))
        assert count_parameters(model)["trainable"] == n, name


# --------------------------------------------------------------------------- figures

# Synthetic run: per method (rank, targets or family), trainable parameters, per-seed
# scores; drift per seed comes from layers.json rows (1 - debiased CKA per state).
SEEDS = (42, 1337)
SPEC = {  # method: (trainable parameters, {seed: validation accuracy})
    "head": (1_152, {42: 0.55, 1337: 0.60}),
    "lora-r1": (1e5, {42: 0.70, 1337: 0.72}),
    "lora-r4": (4e5, {42: 0.74, 1337: 0.78}),
    "lora-r16": (1.6e6, {42: 0.80, 1337: 0.79}),
    "lora-all-linear": (2.4e6, {42: 0.81, 1337: 0.83}),
    "full": (1.35e8, {42: 0.85, 1337: 0.83}),
}
RANK = {"lora-r1": 1, "lora-r4": 4, "lora-r16": 16, "lora-all-linear": 8}
DRIFT = {  # method -> seed -> per-state drift (states 1..3; state 0 is not in drift.layers)
    "head": {42: [0.0, 0.0, 0.0], 1337: [0.0, 0.0, 0.0]},
    "lora-r1": {42: [0.01, 0.02, 0.03], 1337: [0.02, 0.02, 0.02]},
    "lora-r4": {42: [0.02, 0.04, 0.06], 1337: [0.03, 0.05, 0.04]},
    "lora-r16": {42: [0.05, 0.07, 0.09], 1337: [0.04, 0.06, 0.11]},
    "lora-all-linear": {42: [0.06, 0.08, 0.10], 1337: [0.07, 0.09, 0.08]},
    "full": {42: [0.10, 0.20, 0.30], 1337: [0.12, 0.18, 0.33]},
}


def _record(method: str) -> dict:
    if method in ("head", "full"):
        return {"name": method, "family": method, "peft": {}}
    targets = "all-linear" if method == "lora-all-linear" else QV
    return {"name": method, "family": "peft",
            "peft": {"type": "lora", "r": RANK[method], "alpha": 2.0 * RANK[method],
                     "target_modules": targets, "use_dora": False, "use_rslora": False,
                     "init_lora_weights": True}}


def synthetic(tmp_path, methods=tuple(SPEC)) -> RunData:
    d = RunData(RunDir(tmp_path / "run"))
    d.config = {"tasks": ["sst2"], "methods": list(methods), "seeds": list(SEEDS)}
    d.layers = []
    for m in methods:
        params, scores = SPEC[m]
        for s in SEEDS:
            d.jobs[("sst2", m, s)] = {
                "task": "sst2", "method": m, "seed": s, "score": scores[s],
                "validation": {"accuracy": scores[s]},
                "majority_baseline": {"accuracy": 0.509},
                "parameters": {"total": 1.35e8, "trainable": params},
                "hyperparameters": {"method": _record(m)} if m != "full" else {}}
            d.layers.append({"task": "sst2", "method": m, "seed": s, "layer": 0,
                             "in_drift": False, "cka_debiased": 0.5, "cka": 0.5,
                             "n_examples": 128})
            for i, v in enumerate(DRIFT[m][s], 1):
                d.layers.append({"task": "sst2", "method": m, "seed": s, "layer": i,
                                 "in_drift": True, "cka_debiased": 1.0 - v, "cka": 0.9,
                                 "n_examples": 128})
    return d


def test_accuracy_vs_parameters_plots_the_inputs(tmp_path):
    d = synthetic(tmp_path)
    assert has_rank_sweep(d)
    a = plotted(fig_accuracy_vs_params(d))
    for m, (params, scores) in SPEC.items():
        np.testing.assert_allclose(a[f"seeds:acc:sst2:{m}"],
                                   [[params, scores[s]] for s in sorted(SEEDS)])
        np.testing.assert_allclose(a[f"mean:acc:sst2:{m}"],
                                   [[params, np.mean(list(scores.values()))]])
    # the q/v ranks are joined in rank order; all-linear (one rank) stands alone
    qv = ["lora-r1", "lora-r4", "lora-r16"]
    np.testing.assert_allclose(a["series:acc:sst2:q_proj, v_proj"],
                               [[SPEC[m][0], np.mean(list(SPEC[m][1].values()))] for m in qv])
    assert "series:acc:sst2:all-linear" not in a
    assert a["majority:sst2"][0, 1] == pytest.approx(0.509)
    assert a["_ax"].get_xscale() == "log"


def test_drift_vs_rank_plots_the_inputs(tmp_path):
    d = synthetic(tmp_path)
    a = plotted(fig_drift_vs_rank(d))
    mean = {m: {s: np.mean(v) for s, v in by.items()} for m, by in DRIFT.items()}
    for m, r in RANK.items():
        np.testing.assert_allclose(a[f"seeds:drift:sst2:{m}"],
                                   [[r, mean[m][s]] for s in sorted(SEEDS)])
        np.testing.assert_allclose(a[f"mean:drift:sst2:{m}"],
                                   [[r, np.mean(list(mean[m].values()))]])
    np.testing.assert_allclose(
        a["series:drift:sst2:q_proj, v_proj"][:, 1],
        [np.mean(list(mean[m].values())) for m in ("lora-r1", "lora-r4", "lora-r16")])
    np.testing.assert_array_equal(a["series:drift:sst2:q_proj, v_proj"][:, 0], [1, 4, 16])
    # head and full: horizontal reference lines at their mean drift over seeds
    for m in ("head", "full"):
        np.testing.assert_allclose(a[f"ref:drift:sst2:{m}"][:, 1],
                                   np.mean(list(mean[m].values())), atol=1e-12)
    ax = a["_ax"]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "linear"  # full / r1 < 30
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "4", "8", "16"]


def test_rank_figures_skipped_without_two_ranks(tmp_path):
    for methods in (("head", "lora-r4", "full"),             # one rank
                    ("lora-r4", "lora-all-linear", "full")):  # two ranks, different targets
        d = synthetic(tmp_path, methods)
        assert not has_rank_sweep(d)
        assert fig_accuracy_vs_params(d) == WHY_NOT
        assert fig_drift_vs_rank(d) == WHY_NOT
    assert [f[0] for f in RANK_FIGURES] == [f[0] for f in FIGURES if f[0].startswith("figr")]


def test_captions_name_split_seeds_and_question(tmp_path):
    d = synthetic(tmp_path)
    acc, drift = (caption(d) for _, _, caption, _ in RANK_FIGURES)
    assert "validation split" in acc and "2 seeds" in acc
    assert "128 validation rows" in drift and "2 seeds" in drift
    assert "Does drift grow with rank toward full fine-tuning" in drift


# --------------------------------------------------------------------------- rsLoRA, Table R

RS = {"rslora-r1": (1, 1e5, {42: 0.70, 1337: 0.71}, {42: 0.03, 1337: 0.02}),
      "rslora-r16": (16, 1.6e6, {42: 0.75, 1337: 0.76}, {42: 0.02, 1337: 0.03})}


def with_rslora(tmp_path) -> RunData:
    """The synthetic run plus two rsLoRA ranks (use_rslora) on q/v."""
    d = synthetic(tmp_path)
    d.config["methods"] += list(RS)
    for m, (r, params, scores, drift) in RS.items():
        for s in SEEDS:
            d.jobs[("sst2", m, s)] = {
                "task": "sst2", "method": m, "seed": s, "score": scores[s],
                "validation": {"accuracy": scores[s]},
                "parameters": {"total": 1.35e8, "trainable": params},
                "hyperparameters": {"method": {
                    "name": m, "family": "peft",
                    "peft": {"type": "lora", "r": r, "alpha": 5.66, "target_modules": QV,
                             "use_dora": False, "use_rslora": True,
                             "init_lora_weights": True}}}}
            for i in (1, 2, 3):
                d.layers.append({"task": "sst2", "method": m, "seed": s, "layer": i,
                                 "in_drift": True, "cka_debiased": 1.0 - drift[s],
                                 "cka": 0.9, "n_examples": 128})
    return d


def test_rslora_ranks_are_a_series_of_their_own(tmp_path):
    a = plotted(fig_drift_vs_rank(with_rslora(tmp_path)))
    # plain LoRA's line is unchanged (r = 1, 4, 16); rsLoRA's joins its two ranks
    np.testing.assert_array_equal(a["series:drift:sst2:q_proj, v_proj"][:, 0], [1, 4, 16])
    np.testing.assert_allclose(a["series:drift:sst2:q_proj, v_proj (rsLoRA)"],
                               [[1, 0.025], [16, 0.025]])


def test_table_r_tests_the_trend_per_series_and_measure(tmp_path):
    from loralens.report.rank_figures import table_rank_trend

    t = table_rank_trend(with_rslora(tmp_path))
    rows = {(r[1], r[2]): r for r in t.rows}
    # plain LoRA q/v, r = 1, 4, 16: drift and score increase in both seeds: rho 1 per
    # seed; two-sided exact p = 2 / (3!)^2 = 0.0556. rsLoRA, r = 1, 16: drift down in seed
    # 42 and up in 1337 (mean rho 0, p = 1); score up in both (p = 2 / (2!)^2 = 0.5).
    # Holm over the 4 tests: 4 x 0.0556 = 0.222 (twice), then 2 x 0.5 = 1, 1.
    plain, rs = "LoRA on q_proj, v_proj", "rsLoRA on q_proj, v_proj"
    assert set(rows) == {(plain, "mean drift"), (plain, "validation score"),
                         (rs, "mean drift"), (rs, "validation score")}
    assert rows[(plain, "mean drift")][3:] == ["1, 4, 16", "2", "42: 1, 1337: 1", "1",
                                               "0.0556", "0.222"]
    assert rows[(plain, "validation score")][6:] == ["1", "0.0556", "0.222"]
    assert rows[(rs, "mean drift")][5:] == ["42: -1, 1337: 1", "0", "1", "1"]
    assert rows[(rs, "validation score")][6:] == ["1", "0.5", "1"]
    assert "Holm over the 4 tests" in " ".join(t.notes)
    # no sweep, no table
    assert table_rank_trend(synthetic(tmp_path, ("head", "lora-r4", "full"))) is None


# --------------------------------------------------------------------------- a micro run

