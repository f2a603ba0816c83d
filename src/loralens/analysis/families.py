"""The test families, declared from the config alone, before any number is computed.

A family-wise correction is only honest when the family is fixed before the data are
seen. Every family here is a function of the resolved config (tasks, seeds, methods, the
LoRA rank, ``drift.layers``' state count, ``weights.forgetting``, ``stats.correction``):

- ``table3``: the study metric of each configured task (paired t-test by seed).
- ``table4 <measure>``: one family per drift measure, members the configured tasks. The
  per-layer families are one per measure too (``per_layer <measure>``: states x tasks), so
  a drift measure's column is corrected alike in Table 4 and per layer, and one measure's
  correction does not depend on how many other measures are shown beside it.
- ``examples``: tasks x seeds (exact McNemar over validation examples).
- ``weights <measure>``: one family per weight-space measure (Table 7/8), members the
  configured tasks; a contrast that is true by construction is *stated, not tested*
  (:func:`by_construction`) and is not a member.
- ``weights-methods <measure>``: in a study of more methods, each method but the
  reference x tasks, less the contrasts true by construction.

A test that turns out undefined (zero spread of the paired differences) stays in its
family, counted in ``m``, with an undefined adjusted p; a member not computed (too few
paired seeds, a task not run yet) counts as p = 1. Neither ever shrinks ``m``
(:meth:`Family.adjust`). The correction is ``stats.correction``: Holm (default) or
Bonferroni (:func:`loralens.analysis.stats.adjust_p`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from loralens.analysis import stats
from loralens.analysis.drift.measures import DRIFT_MEASURES
from loralens.models.methods import get_method
from loralens.tasks.registry import get_task

# the weights stage's measures (analysis/weights/analyzer.py, model_summary)
WEIGHT_MEASURES = ("intruders", "rel_change", "effective_rank", "rank90", "forgetting")
# measures of the change's rank: bounded by a low-rank update's rank by construction
RANK_MEASURES = ("effective_rank", "rank90")
UNDEFINED = "undefined (zero spread)"


@dataclass(frozen=True)
class Family:
    """One declared family: its member tests, the correction and the level."""

    name: str
    members: tuple[str, ...]
    description: str
    correction: str = "holm"
    alpha: float = 0.05
    stated: tuple[str, ...] = field(default=())  # true by construction: not members

    @property
    def size(self) -> int:
        return len(self.members)

    def adjust(self, p: dict[str, float | None]) -> dict[str, float | None]:
        """Adjusted p of each member given in ``p`` (None or NaN: undefined, stays in the
        family and comes back None); members not given count as p = 1. ``ValueError`` for
        a test that is not a member (a family is never grown after the fact)."""
        extra = sorted(set(p) - set(self.members))
        if extra:
            raise ValueError(f"{self.name}: {extra} are not members of the declared family")
        keys = list(p)
        values = [math.nan if p[k] is None else float(p[k]) for k in keys]
        if not keys:
            return {}
        adjusted = stats.adjust_p(values, self.correction, max(self.size, 1))
        return {k: (None if math.isnan(a) else float(a)) for k, a in zip(keys, adjusted)}

    @classmethod
    def from_dict(cls, d: dict) -> "Family":
        """The family as :meth:`to_dict` stored it (a run directory's JSON)."""
        return cls(d["name"], tuple(d["members"]), d.get("description", ""),
                   d.get("correction", "bonferroni"), float(d.get("alpha", 0.05)),
                   tuple(d.get("stated_not_tested") or ()))

    def to_dict(self) -> dict:
        n = max(self.size, 1)
        return {"name": self.name, "size": self.size, "members": list(self.members),
                "description": self.description, "correction": self.correction,
                "alpha": self.alpha, "alpha_per_test": self.alpha / n,
                "stated_not_tested": list(self.stated)}


def apply(family: Family, tests: dict[str, dict]) -> None:
    """Correct ``tests`` (member -> a comparison dict of :func:`stats.compare_methods` or
    ``drift.stats.compare``) within ``family``, in place: ``correction``, ``n_tests`` (the
    declared m), ``p_adjusted``, ``significant`` (``p_adjusted < alpha``) and
    ``test_family`` (its name). Zero spread: ``p_adjusted`` None, not significant,
    ``p_text`` says "undefined (zero spread)". A comparison with ``tested`` False is left
    out."""
    tested = {k: c for k, c in tests.items() if c.get("tested", True) is not False}
    adjusted = family.adjust({k: (None if c.get("zero_spread") else c.get("p"))
                              for k, c in tested.items()})
    for k, c in tested.items():
        c["test_family"] = family.name  # "family" is a method's family in methods rows
        c["correction"] = family.correction
        c["n_tests"] = family.size
        c["p_adjusted"] = adjusted[k] if c.get("p") is not None else None
        if c.get("zero_spread"):
            c["p_text"] = UNDEFINED
            c["significant"] = False
        elif c["p_adjusted"] is not None:
            c["significant"] = bool(c["p_adjusted"] < family.alpha)


# --------------------------------------------------------------------------- by construction

def update_rank_bound(method) -> int | None:
    """The rank a method's weight update cannot exceed, by construction (None: no bound).

    A LoRA-type update is ``B A`` with inner dimension ``r``: rank <= r. With PiSSA/OLoRA
    initialisation the base is moved by ``-B0 A0`` first, so the merged change is ``B A -
    B0 A0``: rank <= 2r. DoRA rescales whole columns (no low-rank bound); IA3 and full
    fine-tuning have none."""
    if not method.is_lora_type or method.peft.get("use_dora"):
        return None
    r = method.peft.get("r")
    if r is None:
        return None
    init = method.peft.get("init_lora_weights", True)
    return 2 * int(r) if isinstance(init, str) and init in ("pissa", "olora") else int(r)


def by_construction(cfg, method_name: str, measure: str) -> str | None:
    """Why ``method_name`` vs the reference on weight ``measure`` holds by construction
    (stated, not tested), or None where it is a real test. Decided from the config alone."""
    m = get_method(method_name, cfg)
    if m.family == "head":
        return (f"{method_name} trains the head only: its backbone is the base model's, so "
                f"its {measure} is that of no change, by construction")
    bound = update_rank_bound(m)
    if bound is not None and measure in RANK_MEASURES:
        return (f"{method_name}'s update has rank <= {bound} by construction (r = "
                f"{m.peft.get('r')}), so its {measure} cannot exceed {bound}")
    return None


# --------------------------------------------------------------------------- declarations

def drift_families(tasks: Sequence[str], seeds: Sequence[int],
                   states: Sequence[int] | int | None, alpha: float = 0.05,
                   correction: str = "holm") -> dict[str, Family]:
    """Table 3, Table 4 (one family per measure), per-layer (one per measure: states x
    tasks) and the example-level families, from the configured tasks and seeds and the
    states ``drift.layers`` selects (the indices, or their number: 0..n-1; from the
    config and the model's architecture, not from data)."""
    tasks = list(tasks)
    states = list(range(states)) if isinstance(states, int) else list(states or [])
    n_states = len(states)
    out = {"table3": Family("table3", tuple(f"{t} {get_task(t).metric}" for t in tasks),
                            "the study metric of each configured task (accuracy; F1 for "
                            "MRPC), paired t-test by seed", correction, alpha),
           "examples": Family("examples", tuple(f"{t} seed {s}" for t in tasks for s in seeds),
                              "configured tasks x seeds, exact McNemar test over validation "
                              "examples", correction, alpha)}
    for measure, label in DRIFT_MEASURES.items():
        out[f"table4 {measure}"] = Family(
            f"table4 {measure}", tuple(f"{t} {measure}" for t in tasks),
            f"{label}: configured tasks, paired t-test by seed (one family per measure, "
            "as per layer)", correction, alpha)
        if n_states:
            out[f"per_layer {measure}"] = Family(
                f"per_layer {measure}",
                tuple(f"{t} {measure} state {i}" for t in tasks for i in states),
                f"{label}: {n_states} states of drift.layers x configured tasks, paired "
                "t-test by seed", correction, alpha)
    return out


def weight_families(cfg, alpha: float = 0.05) -> dict[str, Family]:
    """The weights stage's families (LoRA vs full fine-tuning): one per measure, members
    the configured tasks, less the contrasts true by construction; forgetting only where
    ``weights.forgetting`` measures it."""
    from loralens.models.methods import PAIR

    out = {}
    for measure in weight_measures(cfg):
        why = by_construction(cfg, PAIR[0], measure)
        out[measure] = Family(
            f"weights {measure}", () if why else tuple(f"{t} {measure}" for t in cfg.tasks),
            f"{measure}: LoRA vs full fine-tuning over configured tasks, paired t-test by "
            "seed", cfg.stats.correction, alpha, (why,) if why else ())
    return out


def method_weight_families(cfg, alpha: float = 0.05) -> dict[str, Family]:
    """A study of more methods: per measure, every method but the reference x tasks, less
    the contrasts true by construction (head-only methods; rank measures of low-rank
    updates)."""
    out = {}
    ref = cfg.reference_method
    for measure in weight_measures(cfg):
        members, stated = [], []
        for m in cfg.methods:
            if m == ref:
                continue
            why = by_construction(cfg, m, measure)
            if why:
                stated.append(why)
            else:
                members += [f"{t} {m} {measure}" for t in cfg.tasks]
        out[measure] = Family(f"weights-methods {measure}", tuple(members),
                              f"{measure}: each method but {ref} vs {ref} over configured "
                              "tasks, paired t-test by seed", cfg.stats.correction, alpha,
                              tuple(stated))
    return out


def weight_measures(cfg) -> tuple[str, ...]:
    return tuple(m for m in WEIGHT_MEASURES if m != "forgetting" or cfg.weights.forgetting)


def declare(cfg, states: Sequence[int] | int | None = None,
            alpha: float = 0.05) -> dict[str, Family]:
    """Every family of the study, by name, from the config alone (``states``: the states
    ``drift.layers`` selects in the model, for the per-layer families)."""
    out = dict(drift_families(cfg.tasks, cfg.seeds, states, alpha, cfg.stats.correction))
    out.update({f.name: f for f in weight_families(cfg, alpha).values()})
    return out
