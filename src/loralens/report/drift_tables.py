"""The drift tables: representation drift to the base model (Table 4) and how much a few
dimensions decide it (Table 4b), from ``drift/table4.json``.
"""

from __future__ import annotations

from typing import Any

from loralens.report.accuracy_tables import learned_note, mark_task
from loralens.report.formatting import DASH, MEASURES, Table, ci, f, finite, g, pm, signed_pct
from loralens.report.run_data import RunData
from loralens.report.significance import declared_family, family_note, p_cells, resamples_note

# Debiased CKA leads: the biased estimator's bias depends on examples vs dimensions, so
# tasks are not comparable on it; it stays, as the published study's column.
LEAD = ("cka_debiased", "cka")
LABELS = {"cka": "1 − linear CKA (biased), the published column"}


def lead_debiased(measures: dict) -> list:
    """Measure names, debiased CKA first and biased CKA second, the rest in stored order."""
    return sorted(measures, key=lambda m: LEAD.index(m) if m in LEAD else len(LEAD))


STD_MEASURES = {"cka_std": "1 − linear CKA, standardised (biased)",
                "cka_std_debiased": "1 − linear CKA, standardised (debiased)"}


def _states_text(states: list, n_states: Any) -> str:
    """[1, ..., 30] -> "1–30"."""
    runs, start = [], None
    for i, v in enumerate(states):
        start = v if start is None else start
        if i + 1 == len(states) or states[i + 1] != v + 1:
            runs.append(str(start) if v == start else f"{start}–{v}")
            start = None
    return ", ".join(runs)


def _states_of(e: dict) -> list:
    """The states a Table 4 entry averages; an older file stored only their range."""
    if isinstance(e.get("layers"), list):
        return e["layers"]
    lay = e.get("layers_averaged") or []
    return list(range(lay[0], lay[1] + 1)) if len(lay) == 2 else []


def _floor_cell(c: dict) -> str:
    fl = c.get("seed_floor") or {}
    lo, fu = (fl.get("lora") or {}).get("mean"), (fl.get("full") or {}).get("mean")
    return DASH if not (finite(lo) or finite(fu)) else f"{g(lo)} / {g(fu)}"


def table4(d: RunData) -> Table | None:
    entries = (d.table4 or {}).get("tasks") or []
    if not entries:
        return None
    labels = {**MEASURES, **LABELS, **STD_MEASURES}
    rows, comparisons = [], []
    for e in entries:
        n, req = e.get("n_examples"), e.get("requested")
        states = _states_of(e)
        measures = e.get("measures") or {}
        for measure in lead_debiased(measures):
            c = measures[measure]
            comparisons.append(c)
            lo, fu = c.get("lora") or {}, c.get("full") or {}
            delta = signed_pct(c.get("delta_percent"))
            if ci(c.get("delta_percent_ci")):
                delta += " " + ci(c.get("delta_percent_ci"), lambda v: f"{v:.1f}")
            rows.append([mark_task(d, e.get("task", DASH)), labels.get(measure, measure),
                         f"{n} of {req}" if n != req else str(n),
                         _states_text(states, e.get("n_states")) or DASH,
                         pm(lo.get("mean"), lo.get("sd"), g),
                         pm(fu.get("mean"), fu.get("sd"), g), _floor_cell(c),
                         delta, *p_cells(c)])
    t4 = d.table4 or {}
    dl = t4.get("drift_layers") or {}
    ns = dl.get("n_states") or next((e.get("n_states") or e.get("n_layers") for e in entries),
                                    None)
    last = ns - 1 if finite(ns) else "L"
    states = dl.get("states") or _states_of(entries[0])
    which = (f"hidden states {_states_text(states, ns)} (drift.layers = {dl['spec']})"
             if dl else f"hidden states {_states_text(states, ns)} (the embedding output "
                        "included: an older drift stage averaged every state)")
    notes = [f"Drift = 1 − similarity to the base model on the same validation examples, "
             f"averaged over {which}; state 0 = embedding output, i = output of block i, "
             f"{last} = block {last} after the final norm. Mean ± sd over seeds.",
             "Δ% = 100 (drift full − drift LoRA) / drift full (positive: LoRA drifts less), "
             "with its 95% seed-paired percentile bootstrap CI "
             f"({(t4.get('bootstrap') or {}).get('n_resamples', '?')} resamples drawn). "
             "p: two-sided paired t-test by seed.",
             resamples_note(comparisons, "Δ% CI"),
             "Cohen's d = mean(full − LoRA) / sd(full − LoRA, ddof 1) of the per-seed "
             "drifts: positive when full fine-tuning drifts more (the paper's sign)."
             if t4.get("cohens_d") else "Cohen's d of the per-seed differences LoRA − full "
             "(an older drift stage: negative when full fine-tuning drifts more).",
             family_note(declared_family(t4, "table4", d), "the tested drift measures "
                         "(biased CKA, debiased CKA, cosine) × configured tasks",
                         t4.get("n_tests")),
             _per_layer_note(t4),
             "Seed floor (LoRA / full FT): drift between two models of one method that differ "
             "only in seed (1 − the same similarity between seed s and seed s′, averaged over "
             "the same states), mean over the pairs of seeds: a reference for the size of "
             "drift (how far apart two seeds' models of one method sit); it is not the "
             "uncertainty of a drift-to-base mean, which is the sd across seeds beside each "
             "mean. A "
             "LoRA-vs-full difference is judged by its test (p, Significant), never by this "
             "column.",
             "CKA forms: the biased estimator's bias grows with dimensions per example "
             f"(here {', '.join(sorted({str(e.get('n_examples')) for e in entries}))} "
             "examples against thousands of dimensions) and differs between tasks: compare "
             "tasks with the debiased rows. Standardised rows (features z-scored per "
             "dimension, so a few dimensions of huge variance cannot decide) are "
             "descriptive, not tested."]
    if any(c.get("zero_spread") for c in comparisons):
        notes.append("Zero spread: every seed's paired difference is the same, so t, p and d "
                     "are undefined; such a row is never significant.")
    notes.append(learned_note(d))
    notes = [n for n in notes if n]
    notes += [n for n in (t4.get("notes") or []) if "accuracy" not in n
              and "val_logits" not in n and "example-level" not in n]
    return Table("table-4-drift", "Table 4: representation drift to the base model",
                 ["Task", "Drift measure", "Examples", "States", "LoRA mean ± sd",
                  "Full FT mean ± sd", "Seed floor LoRA / full (reference)", "Δ% [95% CI]", "p",
                  "p (corrected)", "d", "Significant"], rows, notes=notes)


def _per_layer_note(t4: dict) -> str:
    fam = (t4.get("families") or {}).get("per_layer")
    if not fam:
        return ""
    how = "Holm" if fam.get("correction") == "holm" else "Bonferroni"
    return (f"Per-state tests (`drift/table4.json`, per_layer): one {how} family per "
            f"measure of {fam['size']} tests ({', '.join(fam.get('members') or [])}); states "
            "outside drift.layers are listed, not tested.")


def table4_outliers(d: RunData) -> Table | None:
    """Where a few dimensions decide: top-1 and top-5 variance shares per task and model,
    and drift with plain vs standardised features (debiased CKA)."""
    entries = [e for e in (d.table4 or {}).get("tasks") or [] if e.get("outliers")]
    if not entries:
        return None
    rows = []
    for e in entries:
        out, measures = e["outliers"], e.get("measures") or {}
        for who, name in (("base", "base model"), ("lora", "LoRA"), ("full", "full FT")):
            o = out.get(who)
            if not o:
                continue
            cells = []
            for k in ("top1", "top5"):
                x = o.get(k) or {}
                cells += [f(x.get("mean"), 3), f"{f(x.get('max'), 3)} (state "
                          f"{x.get('max_state', DASH)})"]
            dims = o.get("top_dims_at_max")
            if dims:
                cells[1] += f", dimension {dims[0]}"
            drift = [DASH, DASH] if who == "base" else [
                g(((measures.get(m) or {}).get(who) or {}).get("mean"))
                for m in ("cka_debiased", "cka_std_debiased")]
            rows.append([mark_task(d, e.get("task", DASH)), name, *cells, *drift])
    notes = ["Share of the pooled features' variance (summed over dimensions, across the "
             "validation examples) held by the 1 and 5 dimensions of largest variance, per "
             "hidden state of drift.layers: mean over those states, and the largest with its "
             "state (and, for a single model, which dimension); LoRA and full FT: mean over "
             "seeds.",
             "Linear CKA weighs each dimension by its variance: where one dimension holds most "
             "of it (massive activations), CKA mostly compares that dimension. Standardised "
             "CKA z-scores every dimension first (constant ones dropped), so each weighs the "
             "same: when drift with plain and standardised features disagree, a few "
             "dimensions decide the plain one. Both columns: 1 − debiased linear CKA, "
             "averaged over the same states, mean over seeds.",
             "Per state: `drift/layers.csv` (var_top1, var_top5, var_top1_base, var_top5_base, "
             "top_dim, cka_std, cka_std_debiased) and Figure 7."]
    notes += [n for n in [learned_note(d)] if n]
    return Table("table-4b-outliers", "Table 4b: how much a few dimensions decide",
                 ["Task", "Model", "Top-1 share (mean)", "Top-1 share (max)",
                  "Top-5 share (mean)", "Top-5 share (max)", "Drift, debiased CKA",
                  "Drift, debiased CKA, standardised"], rows, notes=notes)
