"""The weight-space tables: intruder dimensions and the change's spectrum (Table 7, 7b) and
forgetting (Table 8), from ``weightspace/`` (the weights stage, :mod:`loralens.analysis.weights.stage`).
"""

from __future__ import annotations

from loralens.models.methods import PAIR
from loralens.report.accuracy_tables import learned_note, mark_task
from loralens.report.formatting import DASH, METHODS, Table, f, finite, g, pm
from loralens.report.run_data import RunData, read_optional
from loralens.report.significance import p_cells

MEASURE_NAMES = {"intruders": "intruder dimensions (sum over matrices)",
                 "rel_change": "‖W − W0‖F / ‖W0‖F (mean over matrices)",
                 "effective_rank": "effective rank of W − W0 (mean)",
                 "rank90": "rank holding 90% of W − W0's energy (mean)"}


def weight_data(d: RunData) -> dict:
    """``summary``, ``layers`` (rows) and ``forgetting`` (rows) of weightspace/, read once
    (each None when missing)."""
    if "weightspace" not in d.cache:
        run, p = d.run, d.problems
        layers = read_optional(run.weightspace_layers_json, p)
        forget = read_optional(run.weightspace_forgetting_json, p)
        d.cache["weightspace"] = {
            "summary": read_optional(run.weightspace_summary_json, p),
            "layers": layers.get("rows") if isinstance(layers, dict) else None,
            "forgetting": forget.get("rows") if isinstance(forget, dict) else None}
    return d.cache["weightspace"]


def own_sets(d: RunData) -> dict[str, list[str]]:
    """Method -> the matrices of its own set in layers.csv (group ``common``), sorted."""
    out: dict[str, set] = {}
    for r in weight_data(d)["layers"] or []:
        if r.get("group") == "common":
            out.setdefault(r["method"], set()).add(r["matrix"])
    return {m: sorted(v) for m, v in out.items()}


def matrices_note(d: RunData) -> str:
    """Which matrices each method was analysed on, how comparisons pick theirs, and which
    further ones full FT has in layers.csv."""
    rows = weight_data(d)["layers"] or []
    sets = own_sets(d)
    extra = sorted({r["matrix"] for r in rows if r.get("group") == "extra"})
    extra_layers = sorted({r["layer"] for r in rows if r.get("group") == "extra"})
    order = [m for m in d.methods if m in sets] + sorted(set(sets) - set(d.methods))
    per = "; ".join(f"{METHODS.get(m, m)}: {', '.join(sets[m])}" for m in order)
    text = (f"Matrices analysed, of every layer, per method: {per or DASH} (each adapter "
            "method on its own target matrices, merged into the base weight first; full "
            "fine-tuning and head only on the union of the configured methods' targets). "
            "A comparison uses the matrices both methods were analysed on (a method vs full "
            "fine-tuning: the method's own set), named in each row's measure.")
    if extra:
        text += (f" Full fine-tuning changes every linear layer: {', '.join(extra)} are also "
                 f"analysed in layers {', '.join(map(str, extra_layers))} only (a cheap "
                 "subset, `weights.full_extra` / `weights.extra_layers`), listed in "
                 "`weightspace/layers.csv` with group = extra and left out of these tables.")
    return text


def table7(d: RunData) -> Table | None:
    """Intruder dimensions and the change's spectrum per task and method (mean ± sd over
    seeds), with the paired tests of the weights stage."""
    s = weight_data(d)["summary"]
    if not s or not s.get("tasks"):
        return None
    rows, eps = [], s.get("epsilon", 0.5)
    for e in s["tasks"]:
        for key, name in MEASURE_NAMES.items():
            c = (e.get("measures") or {}).get(key)
            if not c:
                continue
            fmt = g
            test = c.get("test") or {}
            label = name + (f", ε = {eps:g}" if key == "intruders" else "") + (
                f", on {e['matrix_set']}" if e.get("matrix_set") else "")
            rows.append([mark_task(d, e.get("task", DASH)), label,
                         pm(c["lora"].get("mean"), c["lora"].get("sd"), fmt),
                         pm(c["full"].get("mean"), c["full"].get("sd"), fmt),
                         *(p_cells(test) if test else [DASH] * 4)])
    if not rows:
        return None
    notes = [matrices_note(d),
             "Intruder dimension (Shuttleworth et al., 2024): one of the top "
             "k = 10 left singular vectors of the tuned matrix whose largest |cosine| with "
             f"every left singular vector of the base matrix is below ε (here {eps:g}); the "
             "counts equal PEFT's own detection in reduce_intruder_dimension. Float64: the "
             "base's thin SVD, the tuned matrix's top vectors and the change's singular values "
             "from the smaller Gram matrix's eigenproblem (the same values).",
             "Effective rank: exp of the entropy of the normalised singular values of W − W0 "
             "(Roy & Vetterli, 2007). Rank at 90%: the fewest singular directions holding 90% "
             "of ‖W − W0‖F² (Biderman et al., 2024). LoRA's change has rank ≤ r.",
             "Mean ± sd over seeds; p: two-sided paired t-test by seed (LoRA − full). "
             + _weights_family_note(s),
             "Per layer and every ε from 0.1 to 0.9: `weightspace/layers.csv`.",
             learned_note(d)]
    notes = [n for n in notes if n]
    return Table("table-7-weights", "Table 7: intruder dimensions and the weight change's "
                 "spectrum", ["Task", "Measure", "LoRA mean ± sd", "Full FT mean ± sd", "p",
                              "p (corrected)", "d", "Significant"], rows, notes=notes)


def table7b(d: RunData) -> Table | None:
    """Intruder dimensions over ε: per task and method, the mean over seeds of the count
    summed over the method's own matrices (named in the Matrices column)."""
    rows_in = [r for r in weight_data(d)["layers"] or [] if r.get("group") == "common"]
    if not rows_in:
        return None
    eps = sorted({k[len("intruders_"):] for r in rows_in for k in r if k.startswith("intruders_")},
                 key=float)
    rows, sets = [], own_sets(d)
    for task in d.tasks:
        for m in d.methods:
            mine = [r for r in rows_in if r["task"] == task and r["method"] == m]
            seeds = sorted({r["seed"] for r in mine})
            if not seeds:
                continue
            cells = []
            for e in eps:
                totals = [sum(r[f"intruders_{e}"] for r in mine if r["seed"] == s) for s in seeds]
                cells.append(g(sum(totals) / len(totals)))
            rows.append([task, METHODS.get(m, m), ", ".join(sets.get(m, [])) or DASH,
                         str(len(seeds)), *cells])
    return Table("table-7b-intruders", "Table 7b: intruder dimensions at each threshold ε",
                 ["Task", "Method", "Matrices", "Seeds", *[f"ε = {e}" for e in eps]], rows,
                 notes=["Intruders among the top 10 left singular vectors, summed over the "
                        "method's own matrices (the Matrices column: sums over different sets "
                        "are not comparable across rows), mean over seeds. A larger ε counts "
                        "more vectors as intruders (ε = 0.5: Table 7)."])


def table8(d: RunData) -> Table | None:
    """Forgetting: LM cross-entropy of the general-text sample through the base's LM head,
    before (base) and after fine-tuning."""
    wd = weight_data(d)
    rows_in, s = wd["forgetting"] or [], wd["summary"] or {}
    if not rows_in:
        return None
    tests = {e.get("task"): ((e.get("measures") or {}).get("forgetting") or {}).get("test")
             for e in s.get("tasks") or []}
    rows, sources = [], {}
    for task in d.tasks:
        mine = [r for r in rows_in if r["task"] == task]
        if not mine:
            continue
        sources[task] = mine[0].get("source", DASH)
        cells = []
        for m in PAIR:
            v = [r["forgetting"] for r in mine if r["method"] == m and finite(r.get("forgetting"))]
            cells.append(_mean_sd(v))
        base = mine[0].get("ce_base")
        rows.append([mark_task(d, task), f(base), str(mine[0].get("n_tokens", DASH)), *cells,
                     *(p_cells(tests[task]) if tests.get(task) else [DASH] * 4)])
    notes = ["Forgetting = cross-entropy after fine-tuning − before (nats per predicted token; "
             "positive: the backbone predicts general text worse), with the base model's LM "
             "head (tied to its input embedding where the model ties them) on the fine-tuned "
             "backbone's final hidden states (after the final norm). Mean ± sd over seeds; "
             "p: paired t-test by seed (LoRA − full); its family and correction as Table 7's.",
             "Text used: " + "; ".join(f"{t}: {src}" for t, src in sources.items()) + "."]
    notes += [n for n in [learned_note(d)] if n]
    return Table("table-8-forgetting", "Table 8: forgetting of general text",
                 ["Task", "Base CE (nats/token)", "Tokens", "LoRA forgetting",
                  "Full FT forgetting", "p", "p (corrected)", "d", "Significant"], rows,
                 notes=notes)


def _mean_sd(v: list[float]) -> str:
    if not v:
        return DASH
    mean = sum(v) / len(v)
    sd = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else None
    return f"{mean:+.4f}" + (f" ± {sd:.4f}" if finite(sd) else "")


def _weights_family_note(s: dict) -> str:
    """The weights stage's families: one per measure (declared from the config), or, in a
    summary.json written before, the tests it made on measures × tasks."""
    if "correction" not in s:
        return (f"Bonferroni family: the {s.get('n_tests', '?')} tests made on measures × "
                "tasks of the weights stage (an older weights stage: zero-spread rows were "
                "left out of the family).")
    how = ("Holm (step-down; p (Holm) in the corrected column)"
           if s["correction"] == "holm" else "Bonferroni (p × m)")
    stated = "; ".join(s.get("stated_not_tested") or [])
    return (f"Families declared from the config: one per measure, each the {s.get('n_tests')} "
            f"configured task(s) (forgetting's is Table 8's), corrected by {how}; a "
            "zero-spread test stays in its family, shown undefined."
            + (f" Stated, not tested (true by construction): {stated}." if stated else ""))
