"""The causal test in the report: Table 7c and Figure 9, from ``weightspace/sweep.json``
(the weights stage with ``weights.sweep``, :mod:`loralens.analysis.weights.intruder_sweep`)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from loralens.report.formatting import DASH, Table, finite, g, pm
from loralens.report.run_data import RunData, read_optional

PANELS = (("score", "validation score (task metric)"), ("drift", "drift (1 − debiased CKA)"),
          ("forgetting", "forgetting (nats/token)"))


def sweep_data(d: RunData) -> dict | None:
    """weightspace/sweep.json, read once (None when missing)."""
    if "sweep" not in d.cache:
        d.cache["sweep"] = read_optional(d.run.weightspace_sweep_json, d.problems)
    s = d.cache["sweep"]
    return s if isinstance(s, dict) and s.get("rows") else None


def _by_task_lambda(rows: list[dict], d: RunData) -> dict[str, dict[float, list[dict]]]:
    out: dict = {}
    for task in d.tasks:
        for r in rows:
            if r["task"] == task:
                out.setdefault(task, {}).setdefault(float(r["lambda"]), []).append(r)
    return out


def _stat(rows: list[dict], key: str) -> tuple[float | None, float | None]:
    v = [r[key] for r in rows if finite(r.get(key))]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def table7c(d: RunData) -> Table | None:
    """Per task and lambda: PEFT's intruders, those left, score, drift, forgetting."""
    s = sweep_data(d)
    if s is None:
        return None
    rows = []
    for task, by_lam in _by_task_lambda(s["rows"], d).items():
        for lam in sorted(by_lam, reverse=True):
            rs = by_lam[lam]
            rows.append([task, f"{lam:g}", str(len(rs)), f"{rs[0]['metric']}",
                         pm(*_stat(rs, "score")), pm(*_stat(rs, "drift"), g),
                         pm(*_stat(rs, "forgetting"), g), g(_stat(rs, "peft_intruders")[0]),
                         g(_stat(rs, "intruders_after")[0])])
    st = s.get("settings") or {}
    n_eval = sorted({r["n_eval"] for r in s["rows"]})
    n_drift = sorted({r["n_drift"] for r in s["rows"]})
    notes = [
        "Each LoRA model's intruder directions rescaled by λ with PEFT's "
        f"reduce_intruder_dimension (top_k {st.get('top_k', 10)}, threshold_epsilon "
        f"{st.get('epsilon', 0.5)}; λ = 1: unchanged, 0: removed), then re-measured in float32. "
        "The new adapter's head is the trained one and LoRA dropout is off (two PEFT 0.21.2 "
        "pitfalls fixed).",
        "Score: the task's metric on "
        + ("the whole validation split" if st.get("eval_examples") is None else
           f"a fixed subset of {st.get('eval_examples')} validation rows")
        + f" ({', '.join(map(str, n_eval))} rows). Drift: 1 − debiased linear CKA to the base "
        f"on the extract stage's rows ({', '.join(map(str, n_drift))}), averaged over the states "
        f"of drift.layers ({st.get('drift_layers', DASH)}). Forgetting: as Table 8.",
        "PEFT intruders: what PEFT detected and rescaled, summed over the adapted matrices; "
        "left: the weights stage's own count (ε = 0.5) in the result. Mean ± sd over the "
        "seeds swept (weights.sweep_seeds).",
        "Per model and hidden state: `weightspace/sweep.json`, `sweep.csv`, `sweep/`."]
    return Table("table-7c-intruder-sweep", "Table 7c: the causal test, removing intruder "
                 "dimensions", ["Task", "λ", "Seeds", "Metric", "Score", "Drift", "Forgetting",
                                "PEFT intruders", "Intruders left"], rows, notes=notes)


def fig_intruder_sweep(d: RunData) -> Figure | str:
    s = sweep_data(d)
    if s is None:
        return "needs weightspace/sweep.json (the weights stage with weights.sweep=true)"
    data = _by_task_lambda(s["rows"], d)
    fig = Figure(figsize=(11, 3.2), layout="constrained")
    axes = fig.subplots(1, 3)
    for task, by_lam in data.items():
        lams = sorted(by_lam)
        for ax, (key, title) in zip(axes, PANELS):
            ys = [_stat(by_lam[lam], key)[0] for lam in lams]
            pts = [(x, y) for x, y in zip(lams, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3.5, lw=1.3, label=task)
            ax.set_title(title)
            ax.set_xlabel("λ (1 = unchanged, 0 = intruders removed)")
    axes[0].legend(loc="best")
    return fig
