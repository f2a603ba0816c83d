"""The intervention sweep in the report: Tables 7c (each arm's measurements) and 7d (intruder
arm minus control, with its test) and Figure 9, from ``weightspace/sweep.json`` (the weights
stage with ``weights.sweep``, :mod:`loralens.analysis.weights.intruder_sweep`)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from loralens.report.formatting import DASH, Table, d_, finite, g, pm, pval, yesno
from loralens.report.run_data import RunData, read_optional

PANELS = (("score", "validation score (task metric)"), ("drift", "drift (1 − debiased CKA)"),
          ("forgetting", "forgetting (nats/token)"))
ARMS = (("intruder", "intruder directions"), ("control", "control directions"))
MEASURE_NAMES = {"score": "score", "drift": "drift", "forgetting": "forgetting"}


def sweep_data(d: RunData) -> dict | None:
    """weightspace/sweep.json, read once (None when missing or of the format before the
    control arm, which has no ``arm`` in its rows)."""
    if "sweep" not in d.cache:
        s = read_optional(d.run.weightspace_sweep_json, d.problems)
        if isinstance(s, dict) and s.get("rows") and not all("arm" in r for r in s["rows"]):
            d.problems.append(f"{d.run.weightspace_sweep_json.name} "
                              f"({d.run.weightspace_sweep_json.parent}) predates the control "
                              "arm and is not shown: rerun `loralens weights`")
            s = None
        d.cache["sweep"] = s
    s = d.cache["sweep"]
    return s if isinstance(s, dict) and s.get("rows") else None


def _by_task_arm_lambda(rows: list[dict], d: RunData) -> dict[str, dict]:
    out: dict = {}
    for task in d.tasks:
        for r in rows:
            if r["task"] == task:
                out.setdefault(task, {}).setdefault(r["arm"], {}).setdefault(
                    float(r["lambda"]), []).append(r)
    return out


def _stat(rows: list[dict], key: str) -> tuple[float | None, float | None]:
    v = [r[key] for r in rows if finite(r.get(key))]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def _signed(x) -> str:
    return f"{x:+.3g}" if finite(x) else DASH


def table7c(d: RunData) -> Table | None:
    """Per task, arm and lambda: directions rescaled, score, drift and forgetting (mean ±
    sd over seeds) with their changes from the unchanged model, truncation, intruders left."""
    s = sweep_data(d)
    if s is None:
        return None
    rows = []
    for task, by_arm in _by_task_arm_lambda(s["rows"], d).items():
        for arm, _ in ARMS:
            for lam in sorted(by_arm.get(arm, {}), reverse=True):
                rs = by_arm[arm][lam]
                rows.append([task, arm, f"{lam:g}", str(len(rs)), f"{rs[0]['metric']}",
                             pm(*_stat(rs, "score")), _signed(_stat(rs, "score_change")[0]),
                             pm(*_stat(rs, "drift"), g), _signed(_stat(rs, "drift_change")[0]),
                             pm(*_stat(rs, "forgetting"), g),
                             _signed(_stat(rs, "forgetting_change")[0]),
                             g(_stat(rs, "directions")[0]), g(_stat(rs, "rescaled_sigma")[0]),
                             g(_stat(rs, "truncated")[0]), g(_stat(rs, "intruders_after")[0])])
    st = s.get("settings") or {}
    n_eval = sorted({r["n_eval"] for r in s["rows"]})
    n_drift = sorted({r["n_drift"] for r in s["rows"]})
    notes = [
        "Intruder arm: each adapted matrix's intruder directions (the top "
        f"{st.get('top_k', 10)} singular directions of W0 + ΔW whose largest |cos| with a base "
        f"left singular vector is below {st.get('epsilon', 0.5)}) rescaled by λ, as PEFT's "
        "reduce_intruder_dimension does (λ = 1: unchanged, 0: removed). Control arm: "
        f"{st.get('control', 'as many non-intruder directions')}, rescaled by the same λ in the "
        "same matrices. Both rebuild the update as a rank-r adapter from its top r singular "
        "triplets (Truncated: the share of the rebuilt update's squared norm the truncation "
        "dropped); the head is the trained one and LoRA dropout is off.",
        "Score: the task's metric on "
        + ("the whole validation split" if st.get("eval_examples") is None else
           f"a fixed subset of {st.get('eval_examples')} validation rows")
        + f" ({', '.join(map(str, n_eval))} rows). Drift: 1 − debiased linear CKA to the base "
        f"on the extract stage's rows ({', '.join(map(str, n_drift))}), averaged over the states "
        f"of drift.layers ({st.get('drift_layers', DASH)}). Forgetting: as Table 8. Δ: minus "
        "the unchanged model's value, mean over seeds.",
        "Rescaled: directions per model (summed over the adapted matrices); σ: sqrt of the sum "
        "of their squared singular values (the size of what each arm rescales, to compare the "
        "arms); left: the weights stage's own intruder count (ε = 0.5) in the result. Mean ± "
        "sd over the seeds swept (weights.sweep_seeds).",
        "Per model and hidden state: `weightspace/sweep.json`, `sweep.csv`, `sweep/`."]
    return Table("table-7c-intervention-sweep", "Table 7c: the intervention sweep, rescaling "
                 "intruder directions and a matched control",
                 ["Task", "Arm", "λ", "Seeds", "Metric", "Score", "Δ score", "Drift", "Δ drift",
                  "Forgetting", "Δ forgetting", "Rescaled", "σ rescaled", "Truncated",
                  "Intruders left"], rows, notes=notes)


def table7d(d: RunData) -> Table | None:
    """Per task, lambda and measure: intruder arm minus control arm, per seed and mean, with
    the paired t-test across seeds and its Bonferroni correction."""
    s = sweep_data(d)
    c = (s or {}).get("contrasts")
    if not c or not c.get("rows"):
        return None
    rows = []
    for task in d.tasks:
        for r in c["rows"]:
            if r["task"] != task:
                continue
            if not r.get("tested"):
                p_cells = ["not tested (same model)", DASH, DASH, DASH]
            elif r.get("zero_spread"):
                p_cells = ["undefined (zero spread)", DASH, DASH, "no (p undefined)"]
            elif r.get("p") is None:
                p_cells = [f"undefined ({len(r.get('seeds') or [])} seeds)", DASH, DASH,
                           "no (p undefined)"]
            else:
                p_cells = [pval(r["p"]), pval(r["p_bonferroni"]), d_(r.get("cohens_d")),
                           yesno(r.get("significant"))]
            rows.append([task, f"{r['lambda']:g}", MEASURE_NAMES.get(r["measure"], r["measure"]),
                         str(len(r.get("seeds") or [])),
                         ", ".join(_signed(x) for x in r.get("intruder_change") or []) or DASH,
                         ", ".join(_signed(x) for x in r.get("control_change") or []) or DASH,
                         _signed(r.get("mean_difference")), *p_cells])
    test = c.get("test", "two-sided paired t-test, paired by seed")
    notes = ["Intruder minus control: the intruder arm's change from the unchanged model minus "
             f"the control arm's, per seed (in seed order); {test}."]
    for m, fam in (c.get("families") or {}).items():
        detect = fam.get("detectable_dz_80")
        notes.append(
            f"{MEASURE_NAMES.get(m, m).capitalize()}: Bonferroni family of {fam['size']} tests "
            f"(every configured task × λ < 1), p (Bonf.) = min(1, p × {fam['size']}), "
            f"significant when below {fam.get('alpha', 0.05)}"
            + (f"; with {fam['n_seeds']} seeds the test has 80% power only for a mean "
               f"difference of {detect:.3g} standard deviations of the per-seed differences "
               "(d_z) or more" if finite(detect) else "") + ".")
    notes.append("At λ = 1 both arms are the same model (rescaling by 1 changes nothing): "
                 "their difference is 0 by construction, not tested. A significant difference "
                 "says the intruder directions matter more (or less) than as many of the "
                 "largest other directions rescaled the same way; it does not say why.")
    return Table("table-7d-intruder-minus-control", "Table 7d: intruder directions minus the "
                 "matched control", ["Task", "λ", "Measure", "Seeds", "Δ intruder (per seed)",
                                     "Δ control (per seed)", "Mean difference", "p",
                                     "p (Bonf.)", "d", "Significant"], rows, notes=notes)


def fig_intruder_sweep(d: RunData) -> Figure | str:
    s = sweep_data(d)
    if s is None:
        return "needs weightspace/sweep.json (the weights stage with weights.sweep=true)"
    data = _by_task_arm_lambda(s["rows"], d)
    fig = Figure(figsize=(11, 3.2), layout="constrained")
    axes = fig.subplots(1, 3)
    for i, (task, by_arm) in enumerate(data.items()):
        colour = f"C{i}"
        for arm, style in (("intruder", "-"), ("control", "--")):
            by_lam = by_arm.get(arm, {})
            lams = sorted(by_lam)
            for ax, (key, title) in zip(axes, PANELS):
                ys = [_stat(by_lam[lam], key)[0] for lam in lams]
                pts = [(x, y) for x, y in zip(lams, ys) if y is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3.5, lw=1.3, ls=style, color=colour,
                            label=f"{task}, {arm}")
                ax.set_title(title)
                ax.set_xlabel("λ (1 = unchanged, 0 = directions removed)")
    axes[0].legend(loc="best", fontsize="small")
    return fig
