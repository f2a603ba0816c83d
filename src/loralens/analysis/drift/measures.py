"""Drift measures: the states ``drift.layers`` selects, every model's similarity to the
base model per hidden state, variance shares, and the seed-noise floor.

Plain arrays in, plain dicts out; the drift stage (:mod:`loralens.analysis.drift.stage`) reads the
extracted arrays and writes the files.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from loralens.analysis import similarity
from loralens.core.errors import ConfigError
from loralens.core.config import parse_layers
from loralens.models.methods import PAIR  # the two-method study's methods, its tables' keys

# Per-layer measures (similarity to the base model).
MEASURES = ("cka", "cka_debiased", "cka_std", "cka_std_debiased", "cosine", "procrustes",
            "cka_rbf")
# Drift measures of Table 4 that are tested (the family: these x tasks).
DRIFT_MEASURES = {"cka": "1 - linear CKA (biased)", "cka_debiased": "1 - linear CKA (debiased)",
                  "cosine": "1 - mean cosine of paired examples"}
# Shown beside them, descriptive (not tested, in no family).
STD_MEASURES = {"cka_std": "1 - linear CKA of features standardised per dimension (biased)",
                "cka_std_debiased": "1 - linear CKA of features standardised per dimension "
                                    "(debiased)"}
TOP_KS = (1, 5)
DRIFT_SIGN = "full - lora"   # Cohen's d and t of drift: positive when full FT drifts more
SCORE_SIGN = "lora - full"   # of scores: positive when LoRA scores higher


# --------------------------------------------------------------------------- states

def drift_states(spec: str, n_states: int) -> list[int]:
    """Hidden-state indices that ``drift.layers`` selects for a model with ``n_states``
    states (the embedding output and one per block): blocks = 1..n_states-1."""
    parsed = parse_layers(spec)
    if parsed == "blocks":
        if n_states < 2:
            raise ValueError(f"drift.layers blocks: the arrays hold {n_states} state(s), "
                             "no block output")
        return list(range(1, n_states))
    if parsed == "all":
        return list(range(n_states))
    bad = [i for i in parsed if i >= n_states]
    if bad:
        raise ConfigError(f"drift.layers {spec!r}: state(s) {bad} do not exist; the model has "
                          f"states 0..{n_states - 1} (0 = embedding output, {n_states - 1} = "
                          "the last block after the final norm)", "drift.layers")
    return list(parsed)


def state_label(i: int, n_states: int) -> str:
    """What hidden state ``i`` is: transformers' ``hidden_states`` are the embedding
    output, the outputs of blocks 1..L-1, and block L's output after the final norm."""
    last = n_states - 1
    if i == 0:
        return "embeddings"
    return f"block {i}, after the final norm" if i == last else f"block {i}"


def states_text(states: Sequence[int], n_states: int | None = None) -> str:
    """``[1, 2, 3, 7]`` -> "1–3, 7"; with ``n_states`` the meaning of the ends in words."""
    runs, start = [], None
    for i, s in enumerate(states):
        if start is None:
            start = s
        if i + 1 == len(states) or states[i + 1] != s + 1:
            runs.append(f"{start}" if s == start else f"{start}–{s}")
            start = None
    text = ", ".join(runs)
    if n_states is None:
        return text
    last = n_states - 1
    parts = []
    if 0 in states:
        parts.append("0 = embedding output")
    if last in states:
        parts.append(f"{last} = block {last} after the final norm")
    return f"{text} ({'; '.join(parts)})" if parts else text


# --------------------------------------------------------------------------- per layer

def layer_similarities(base: np.ndarray, models: dict[str, np.ndarray],
                       notes: list[str] | None = None, label: str = "") -> dict[str, dict]:
    """Every measure, every state, every model against the base: ``{key: {measure: [S]}}``.

    Args:
        base: ``[n, states, d]`` pooled states of the base model.
        models: ``{key: [n, states, d]}`` of the compared models (same examples, order).
        notes: list that receives one line per value that could not be computed (the
            value is then NaN).

    Returns:
        For each key a dict of float64 arrays ``[states]``: ``cka`` and
        ``cka_debiased`` (linear CKA, via :func:`similarity.cka_against_base`),
        ``cka_std`` and ``cka_std_debiased`` (the same on features z-scored per
        dimension), ``cosine``, ``procrustes`` (a distance: 0 = same up to rotation and
        scale) and ``cka_rbf`` (Gaussian kernel, biased).
    """
    notes = notes if notes is not None else []
    keys = list(models)
    n_states = base.shape[1]
    out = {k: {} for k in keys}
    for name, debiased, std in (("cka", False, False), ("cka_debiased", True, False),
                                ("cka_std", False, True), ("cka_std_debiased", True, True)):
        try:
            table = similarity.cka_against_base(base, models, debiased=debiased,
                                                standardize=std)
        except ValueError as e:
            notes.append(f"{label}{name}: {e}; computed pair by pair instead")
            table = _cka_pair_by_pair(base, models, debiased, std, notes, label, name)
        for j, k in enumerate(keys):
            out[k][name] = np.asarray(table[j], dtype=np.float64)
    pairwise = {"cosine": similarity.cosine_similarity,
                "procrustes": similarity.procrustes_distance, "cka_rbf": similarity.rbf_cka}
    for k in keys:
        for name, fn in pairwise.items():
            out[k][name] = np.array([
                _safe(lambda: fn(base[:, i], models[k][:, i]), notes,
                      f"{label}{k} layer {i} {name}") for i in range(n_states)])
    return out


def _cka_pair_by_pair(base: np.ndarray, models: dict[str, np.ndarray], debiased: bool,
                      standardize: bool, notes: list[str], label: str,
                      name: str) -> np.ndarray:
    """``[models, states]`` linear CKA one pair at a time (NaN, with a note, where undefined)."""
    n_states = base.shape[1]
    return np.array([[_safe(lambda: similarity.linear_cka(base[:, i], models[k][:, i],
                                                          debiased=debiased,
                                                          standardize=standardize),
                            notes, f"{label}{k} layer {i} {name}")
                      for i in range(n_states)] for k in models]).reshape(len(models), n_states)


def variance_profile(hidden: np.ndarray, notes: list[str], what: str) -> list[dict | None]:
    """Per state, :func:`similarity.variance_shares` of ``hidden [n, states, d]`` (None,
    with a note, where a state does not vary)."""
    out = []
    for i in range(hidden.shape[1]):
        try:
            out.append(similarity.variance_shares(hidden[:, i], TOP_KS))
        except ValueError as e:
            notes.append(f"{what} layer {i}: variance shares undefined ({e})")
            out.append(None)
    return out


def _safe(fn, notes: list[str], what: str) -> float:
    try:
        return float(fn())
    except ValueError as e:
        notes.append(f"{what}: undefined ({e})")
        return math.nan


def seed_floor(arrays: dict[str, np.ndarray], entries: dict, states: list[int],
               notes: list[str], label: str = "") -> dict:
    """Drift between two models of one method that differ only in seed: the noise floor.

    For each drift measure and method, every pair of its seeds ``(s, s')`` gives
    ``1 - similarity(model s, model s')`` per selected state and its mean over them.

    Returns:
        ``{measure: {method: {"pairs": [{"seeds": [s, s'], "mean": v, "per_layer":
        [...]}], "mean", "min", "max" (over pairs of the layer means, None without
        a pair), "per_layer_mean": [...]}}}``.
    """
    out: dict = {m: {} for m in DRIFT_MEASURES}
    for method in PAIR:
        keys = sorted((k for k in arrays if entries[k]["method"] == method),
                      key=lambda k: entries[k]["seed"])
        sub = {k: arrays[k][:, states] for k in keys}
        pair_values: dict[str, list] = {m: [] for m in DRIFT_MEASURES}
        for i, k1 in enumerate(keys[:-1]):
            others = {k2: sub[k2] for k2 in keys[i + 1:]}
            sims = drift_measures_only(sub[k1], others, notes, f"{label}{k1} vs ")
            for k2 in others:
                for m in DRIFT_MEASURES:
                    per = 1.0 - sims[k2][m]
                    pair_values[m].append({"seeds": [entries[k1]["seed"], entries[k2]["seed"]],
                                           "mean": finite_or_none(np.mean(per)),
                                           "per_layer": [finite_or_none(v) for v in per]})
        for m in DRIFT_MEASURES:
            pairs = pair_values[m]
            means = [p["mean"] for p in pairs if p["mean"] is not None]
            per_layer = np.array([[np.nan if v is None else v for v in p["per_layer"]]
                                  for p in pairs]) if pairs else np.empty((0, len(states)))
            out[m][method] = {
                "pairs": pairs, "n_pairs": len(pairs),
                "mean": float(np.mean(means)) if means else None,
                "min": float(np.min(means)) if means else None,
                "max": float(np.max(means)) if means else None,
                "per_layer_mean": [finite_or_none(v) for v in np.nanmean(per_layer, axis=0)]
                if len(pairs) else None}
    return out


def drift_measures_only(base: np.ndarray, models: dict[str, np.ndarray],
                              notes: list[str], label: str) -> dict[str, dict]:
    """The drift measures only (CKA biased and debiased, cosine) of ``models`` against
    ``base``, per state: ``{key: {measure: [S]}}``."""
    out = {k: {} for k in models}
    for name, debiased in (("cka", False), ("cka_debiased", True)):
        try:
            table = similarity.cka_against_base(base, models, debiased=debiased)
        except ValueError as e:
            notes.append(f"{label}{name}: {e}; computed pair by pair instead")
            table = _cka_pair_by_pair(base, models, debiased, False, notes, label, name)
        for j, k in enumerate(models):
            out[k][name] = np.asarray(table[j], dtype=np.float64)
    for k, arr in models.items():
        out[k]["cosine"] = np.array([
            _safe(lambda: similarity.cosine_similarity(base[:, i], arr[:, i]), notes,
                  f"{label}{k} layer {i} cosine") for i in range(base.shape[1])])
    return out


def finite_or_none(x) -> float | None:
    """``x`` as a float, or None where it is NaN or infinite (JSON and CSV hold no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None
