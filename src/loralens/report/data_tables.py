"""The data and search tables: datasets and the rows actually used (Table 1), the
hyperparameter search spaces (Table 2a) and the chosen hyperparameters (Table 2b).

Table 1 shows the selection rows of the run's selection protocol
(:attr:`RunData.protocol`); Table 2b names the split its search scores come from.
"""

from __future__ import annotations

from typing import Any

from loralens.report.formatting import DASH, METHODS, Table, f, finite, g, label_counts
from loralens.report.run_data import RunData


def _data_for(d: RunData, task: str) -> dict | None:
    if isinstance(d.data, dict) and isinstance(d.data.get(task), dict):
        return d.data[task]
    for (t, _, _), m in d.jobs.items():
        if t == task and isinstance(m.get("data"), dict):
            return m["data"]
    return None


def _selection_cells(d: RunData, task: str, st: dict) -> list[str]:
    """Selection rows (split), their labels and the early-stopping rows of one task.

    An older data.json has no "selection" entry; its run selected on the validation
    split, whose own rows are then shown.
    """
    sel = st.get("selection") if isinstance(st.get("selection"), dict) else None
    es = str((sel or {}).get("early_stop_rows", st.get("early_stop_rows", DASH)))
    if sel:
        split = {"train": "train slice", "validation": "validation split"}.get(
            sel.get("split"), str(sel.get("split", DASH)))
        return [f"{sel.get('rows', DASH)} ({split})",
                label_counts(task, sel.get("label_counts")), es]
    va = st.get("validation") or {}
    if st and d.protocol and d.protocol.task_protocol(task) == "validation":
        return [f"{va.get('rows', DASH)} (validation split)",
                label_counts(task, va.get("label_counts")), es]
    return [DASH, DASH, es]


def _table1_protocol_notes(d: RunData) -> list[str]:
    pr = d.protocol
    if pr is None:
        return []
    by: dict[str, list[str]] = {}
    for task in d.tasks:
        by.setdefault(pr.task_protocol(task), []).append(task)
    texts = {"train_slice": "Train rows exclude the selection slice: a stratified slice held "
                            "out of the training split (data.selection_fraction, at least "
                            "data.selection_min rows, seed data.subset_seed) that search "
                            "trials are scored on, pruning reads and early stopping "
                            "evaluates (early-stop rows: the part scored at each "
                            "evaluation, data.early_stop_size); no model trains on it, and "
                            "the validation rows are only scored once per finished model.",
             "validation": "Selection rows are the validation split itself (data.selection: "
                           "validation, the published protocol): search, pruning and early "
                           "stopping read the rows Table 3 reports."}
    notes = [(f"{', '.join(tasks)}: " if len(by) > 1 else "") + texts.get(name, name)
             for name, tasks in by.items()]
    inferred = [t for t in by.get("validation", []) if t not in pr.recorded
                and _data_for(d, t)]
    if inferred:
        notes.append(f"{', '.join(inferred)}: data.json predates its \"selection\" entry; the "
                     "selection columns show the validation split's own rows.")
    return notes


def table1(d: RunData) -> Table | None:
    """Dataset statistics with the rows actually used, the selection rows and the extraction
    sample."""
    rows = []
    for task in d.tasks:
        st = _data_for(d, task) or {}
        tr, va = st.get("train") or {}, st.get("validation") or {}
        tok = st.get("mean_tokens") or {}
        man = d.extract.get(task) or {}
        serv = ((d.serving or {}).get("tasks") or {}).get(task) or {}
        trial_rows = ""
        for m in d.methods:
            tri = [t for t in (d.search.get((task, m)) or {}).get("trials", [])
                   if (t.get("user_attrs") or {}).get("train_rows")]
            if tri:
                ua = tri[0]["user_attrs"]
                trial_rows = f"{ua.get('train_rows')} / {ua.get('eval_rows', DASH)}"
                break
        if man:
            n, req = man.get("n_examples"), man.get("requested")
            sample = f"{n} of {req} requested" + (" (whole split)" if finite(n) and finite(req)
                                                  and n < req else "")
        else:
            sample = "not extracted"
        if not st and not man and not serv:
            rows.append([task] + [DASH] * 8 + [sample, DASH])
            continue
        rows.append([task, str(tr.get("rows", DASH)), label_counts(task, tr.get("label_counts")),
                     *_selection_cells(d, task, st), str(va.get("rows", DASH)),
                     f"{f(tok.get('train'), 1)} / {f(tok.get('validation'), 1)}",
                     trial_rows or DASH, sample,
                     str(serv.get("examples", DASH))])
    if not any(any(c not in (DASH, "not extracted") for c in r[1:]) for r in rows):
        return None
    notes = ["Rows are those actually used (fixed subsets drawn with data.subset_seed); "
             "mean tokens after tokenization with the model's tokenizer, "
             f"truncated at max_length {d.cfg('data', 'max_length', default='?')}."]
    notes += _table1_protocol_notes(d)
    for task, man in d.extract.items():
        if finite(man.get("n_examples")) and finite(man.get("requested")) \
                and man["n_examples"] < man["requested"]:
            notes.append(f"{task}: drift uses {man['n_examples']} validation examples, the whole "
                         f"split, not the {man['requested']} requested.")
    return Table("table-1-data", "Table 1: datasets and the rows actually used",
                 ["Task", "Train rows", "Train labels", "Selection rows (split)",
                  "Selection labels", "Early-stop rows", "Validation rows",
                  "Mean tokens (train / val)", "Search rows per trial (train / eval)",
                  "Drift sample (validation)", "Serving requests"], rows, notes=notes)


def _space_text(spec: Any) -> str:
    if not isinstance(spec, (list, tuple)) or not spec:
        return str(spec)
    kind, *args = spec
    if kind == "categorical" and args:
        return "{" + ", ".join(map(str, args[0])) + "}"
    if len(args) == 2:
        return f"{kind} [{g(args[0])}, {g(args[1])}]"
    return f"{kind} {args}"


def table2_spaces(d: RunData) -> Table | None:
    spaces: dict[str, dict] = {}
    for (t, m), r in d.search.items():
        spaces.setdefault(m, r.get("space") or {})
    if not spaces:
        return None
    methods = [m for m in d.methods if m in spaces] + [m for m in spaces if m not in d.methods]
    params = []
    for m in methods:
        params += [p for p in spaces[m] if p not in params]
    rows = [[p] + [_space_text(spaces[m][p]) if p in spaces[m] else "fixed" for m in methods]
            for p in params]
    notes = []
    any_r = next(iter(d.search.values()))
    samp = any_r.get("sampler") or {}
    notes.append(f"Optuna {samp.get('name', 'TPE')}, {samp.get('startup_trials', '?')} random "
                 f"start-up trials, one persistent study per task and method; LoRA rank fixed "
                 f"at 8" + (f"; trials train with seed {any_r['trial_seed']}, not a training "
                            "seed" if any_r.get("trial_seed") is not None else "") + ".")
    return Table("table-2-spaces", "Table 2a: hyperparameter search spaces",
                 ["Parameter"] + [METHODS.get(m, m) for m in methods], rows, notes=notes)


def _params_text(params: dict | None) -> str:
    if not params:
        return DASH
    return ", ".join(f"{k} {g(v) if isinstance(v, float) else v}" for k, v in params.items())


def table2(d: RunData) -> Table | None:
    """Chosen hyperparameters and their validation score (search), or the config's values."""
    rows = []
    for task in d.tasks:
        for m in d.methods:
            r = d.search.get((task, m))
            if r:
                best = r.get("best") or {}
                c = r.get("counts") or {}
                rows.append([task, METHODS.get(m, m), r.get("metric", d.metric(task)),
                             f(best.get("value")), str(best.get("number", DASH)),
                             f"{c.get('COMPLETE', 0)} / {c.get('PRUNED', 0)} / {c.get('FAIL', 0)}",
                             _params_text(best.get("params"))])
                continue
            used = next((mm.get("hyperparameters") for (t, mm_, _), mm in d.jobs.items()
                         if t == task and mm_ == m and mm.get("hyperparameters")), None)
            if used:
                keep = {k: used[k] for k in ("lr", "batch_size", "epochs", "warmup_ratio",
                                              "weight_decay") if k in used}
                if isinstance(used.get("lora"), dict):
                    keep.update({k: used["lora"][k] for k in ("r", "alpha", "dropout")
                                 if k in used["lora"]})
                how = "search disabled" if not d.search_enabled else "no search result"
                rows.append([task, METHODS.get(m, m), d.metric(task), DASH, how, DASH,
                             _params_text(keep) + " (used in training)"])
    if not rows:
        return None
    notes = [_search_score_note(d) + " Trials: complete / pruned / failed."]
    return Table("table-2-search", "Table 2b: chosen hyperparameters",
                 ["Task", "Method", "Metric", "Search score", "Best trial",
                  "Trials (C/P/F)", "Chosen hyperparameters"], rows, notes=notes)


def _search_score_note(d: RunData) -> str:
    """Which rows the search scores came from: the search results' own record, else the
    protocol."""
    splits = {r.get("selection") or (d.protocol.task_protocol(t) if d.protocol else None)
              for (t, _), r in d.search.items()}
    if splits == {"train_slice"}:
        return ("Search score: the selection metric of the best trial on the selection slice "
                "held out of the training split (rows per trial: Table 1), never on the "
                "validation split.")
    if splits == {"validation"}:
        return ("Search score: the selection metric of the best trial on the validation "
                "split (rows per trial: Table 1), the split Table 3 reports: optimistic.")
    return ("Search score: the selection metric of the best trial on the search's "
            "selection rows (rows per trial: Table 1).")
