"""The accuracy tables: LoRA vs full fine-tuning per task (Table 3), per seed paired by
validation example (Table 3c), and the training jobs' early stopping (Table 3b).

Table 3 says which split it reports and whether anything was selected on it, from the
selection protocol (:attr:`RunData.protocol`).
"""

from __future__ import annotations

from loralens.report.formatting import (
    DASH, METHODS, Table, ci, f, finite, per_seed, pm, pval, seconds, short_list, yesno,
)
from loralens.report.run_data import RunData
from loralens.report.significance import (
    corrected_cell, declared_family, family_note, p_cells, report_families,
)


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
        from loralens.analysis.drift.stats import accuracy_table, correct_drift

        tasks = [t for t in d.tasks if any(k[0] == t for k in d.jobs)]
        entries = accuracy_table(d.run, tasks, family_tasks=d.tasks or tasks,
                                 family_seeds=d.seeds or None,
                                 glue_dir=d.cfg("data", "glue_dir"))
        # corrected as the drift stage corrects it: within the families declared from the
        # config, with the run's stats.correction (never a fallback of its own)
        correct_drift(report_families(d, tasks), entries, [])
        return entries, ("computed from metrics.json for this report: the drift stage has "
                         "not written drift/table3.json yet")
    except Exception as e:  # noqa: BLE001 - a report shows what it can
        return [], f"could not compute Table 3 from metrics.json: {e}"


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
                         learned_cell(d, task) if metric == sel else DASH,
                         pm(lo.get("mean"), lo.get("sd")), per_seed(seeds.get("lora")),
                         pm(fu.get("mean"), fu.get("sd")), per_seed(seeds.get("full")),
                         f"{c['difference']:+.4f}" if finite(c.get("difference")) else DASH,
                         *p_cells(c)])
    tested_n = sorted({c.get("n_tests") for c in comparisons if finite(c.get("n_tests"))})
    notes = ["* the task's study metric (accuracy; F1 for MRPC), the only one tested; "
             "accuracy beside MRPC's F1 is descriptive. Mean ± sd (ddof 1) over seeds on the "
             "whole validation split; p: two-sided paired t-test by seed.",
             family_note(declared_family(d.table3, "table3", d), "the study metric of each "
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
    notes += [n for n in [learned_note(d)] if n]
    return Table("table-3-accuracy", f"Table 3: accuracy and F1 ({_table3_split(d, entries)})",
                 ["Task", "Metric", "n", "Majority", "Not above the majority class",
                  "LoRA mean ± sd", "LoRA per seed",
                  "Full FT mean ± sd", "Full FT per seed", "LoRA − full", "p", "p (corrected)",
                  "d", "Significant"], rows, notes=notes)


def learned_cell(d: RunData, task: str, methods=None) -> str:
    """Table 3's "Not above the majority class" cell: the task's models not above it (of
    ``methods`` only, where given: a row of the N-method Table 3), "none" where every model
    checked is above it."""
    keys = [k for k in not_learned(d, task) if methods is None or k[1] in methods]
    if keys:
        return f"{_models_text(keys)} {MARK}"
    checked = [v for k, v in model_verdicts(d).items() if k[0] == task
               and (methods is None or k[1] in methods)]
    return "none" if checked and all(v.get("above_majority") for v in checked) else (
        "not checked (Table 3d)" if checked else DASH)


def table3_examples(d: RunData) -> Table | None:
    """Per seed, LoRA vs full fine-tuning on the same validation examples (exact McNemar)
    and a Wilson interval on each accuracy: the evaluation set's own uncertainty."""
    entries, _ = accuracy_entries(d)
    rows, how = [], set()
    for e in entries:
        for x in e.get("example_level") or []:
            lo, fu = x.get("lora") or {}, x.get("full") or {}
            how.add(str(x.get("labels", "")).split(" (")[0])
            rows.append([mark_task(d, e.get("task", DASH)), str(x.get("seed", DASH)),
                         str(x.get("n", DASH)),
                         f(lo.get("accuracy")) + " " + ci(lo.get("ci"), f),
                         f(fu.get("accuracy")) + " " + ci(fu.get("ci"), f),
                         str(x.get("lora_right_full_wrong", DASH)),
                         str(x.get("lora_wrong_full_right", DASH)),
                         pval(x.get("p")), corrected_cell(x),
                         yesno(x.get("significant"))])
    if not rows:
        return None
    notes = ["Per seed, the LoRA and full fine-tuning models of that seed scored on the same "
             "validation examples (val_logits.npy): exact McNemar test (two-sided binomial "
             "test of the discordant examples, p = 1/2) and a 95% Wilson interval on each "
             "accuracy, the evaluation set's own uncertainty, which Table 3's seed "
             "statistics do not show. It compares accuracy, for MRPC too.",
             family_note(declared_family(d.table3, "examples", d), "configured tasks × seeds")]
    if any(h.startswith("derived") for h in how):
        notes.append("Where no GLUE files were at hand, the discordant counts are derived: "
                     "with binary labels two different predictions have exactly one right, "
                     "so b + c = disagreements and b − c = n × (accuracy LoRA − accuracy "
                     "full) from metrics.json.")
    notes += _notes_about(d.table3, "val_logits", "example-level")
    notes += [n for n in [learned_note(d)] if n]
    return Table("table-3c-examples", "Table 3c: LoRA vs full fine-tuning per seed, paired "
                 "by validation example",
                 ["Task", "Seed", "n", "LoRA accuracy [95% CI]", "Full FT accuracy [95% CI]",
                  "LoRA right, full wrong", "LoRA wrong, full right", "p (McNemar)",
                  "p (corrected)", "Significant"], rows, notes=notes)


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


# --------------------------------------------------------------------------- learned or not

NOT_LEARNED = "not above the majority class"
MARK = "‡"


def model_verdicts(d: RunData) -> dict[tuple, dict]:
    """``{(task, method, seed): analysis.learned.verdict(...)}`` for every finished job: the
    study metric's 95% interval on the validation split against the majority class
    (Wilson for accuracy; for F1 and MCC a bootstrap over the examples of val_logits.npy,
    with the labels from the GLUE files)."""
    if "verdicts" not in d.cache:
        d.cache["verdicts"] = _model_verdicts(d)
    return d.cache["verdicts"]


def _model_verdicts(d: RunData) -> dict[tuple, dict]:
    from loralens.analysis.learned import PROPORTIONS, verdict

    out, labels = {}, {}
    for (task, method, seed), m in d.jobs.items():
        metric = d.metric(task)
        val = m.get("validation") if isinstance(m.get("validation"), dict) else {}
        base = m.get("majority_baseline") if isinstance(m.get("majority_baseline"), dict) else {}
        value, n = val.get(metric), val.get("n")
        pred = lab = None
        num_labels = 2
        if metric not in PROPORTIONS and finite(n):
            path = d.run.val_logits_path(task, method, seed)
            if path.is_file():
                try:
                    import numpy as np

                    pred = np.load(path).argmax(axis=1)
                except (OSError, ValueError):
                    pred = None
                if task not in labels:
                    labels[task] = _labels(d, task, int(n))
                lab, num_labels = labels[task]
        try:
            out[(task, method, seed)] = verdict(
                metric, value if finite(value) else None, int(n) if finite(n) else None,
                base.get(metric) if finite(base.get(metric)) else None, pred, lab, num_labels)
        except ValueError as e:  # logits and labels of different lengths, a bad count
            out[(task, method, seed)] = {"metric": metric, "value": value, "ci": None,
                                         "majority": base.get(metric), "interval": "",
                                         "above_majority": None, "why": str(e)}
    return out


def _labels(d: RunData, task: str, n: int) -> tuple:
    """The validation labels in split order and the task's number of labels; ``None``
    labels where the GLUE files are not at hand."""
    try:
        from loralens.analysis.drift.stats import validation_labels
        from loralens.tasks.registry import get_task

        labels, _ = validation_labels(task, d.cfg("data", "glue_dir"), n)
        return labels, get_task(task).num_labels
    except Exception:  # noqa: BLE001 - no labels: the cell says there is no interval
        return None, 2


def not_learned(d: RunData, task: str | None = None) -> list[tuple]:
    """``(task, method, seed)`` of the models not above the majority class, in study order."""
    v = model_verdicts(d)
    keys = [k for k in v if v[k].get("above_majority") is False and (task is None or
                                                                    k[0] == task)]
    order = {t: i for i, t in enumerate(d.tasks)}
    morder = {m: i for i, m in enumerate(d.methods)}
    return sorted(keys, key=lambda k: (order.get(k[0], 99), morder.get(k[1], 99), str(k[1]),
                                       k[2]))


def marked_tasks(d: RunData) -> set:
    return {k[0] for k in not_learned(d)}


def _models_text(keys: list[tuple]) -> str:
    """"LoRA seeds 42, 1337 and full FT seed 2024"."""
    by: dict[str, list] = {}
    for _, m, s in keys:
        by.setdefault(m, []).append(s)
    parts = [f"{METHODS.get(m, m)} seed{'s' if len(ss) > 1 else ''} "
             f"{', '.join(map(str, ss))}" for m, ss in by.items()]
    return " and ".join(parts) if len(parts) < 3 else ", ".join(parts[:-1]) + " and " + parts[-1]


def task_learned_sentence(d: RunData, task: str) -> str:
    """One sentence for a task where some model is not above the majority class; ``""``
    where every model is (or none could be checked)."""
    keys = not_learned(d, task)
    if not keys:
        return ""
    v = model_verdicts(d)[keys[0]]
    maj = v.get("majority")
    return (f"{task}: {_models_text(keys)} {'is' if len(keys) == 1 else 'are'} {NOT_LEARNED} "
            f"(95% interval of {v.get('metric')} reaching down to the majority class's "
            f"{f(maj) if finite(maj) else '?'} or below): not shown to have learned the task, "
            "so comparisons on this task involve models that may not have learned it.")


def learned_note(d: RunData, what: str = "row") -> str:
    """A table's note on its marked tasks (``""`` where none is marked)."""
    tasks = [t for t in d.tasks if not_learned(d, t)]
    if not tasks:
        return ""
    return (f"{MARK} {NOT_LEARNED}: a {what} of a task where some model's 95% validation "
            "interval reaches down to the majority-class score (Table 3d), so it compares "
            "models not shown to have learned the task: "
            + "; ".join(f"{t}: {_models_text(not_learned(d, t))}" for t in tasks) + ".")


def mark_task(d: RunData, task: str) -> str:
    """The task's name, with the mark where some of its models did not beat the majority."""
    return f"{task} {MARK}" if task in marked_tasks(d) else str(task)


def figure_learned_line(d: RunData) -> str:
    """A caption line naming the models not above the majority class (``""`` if none)."""
    keys = not_learned(d)
    if not keys:
        return ""
    tasks = list(dict.fromkeys(k[0] for k in keys))
    return (f" Not above the majority class ({MARK}, Table 3d; not shown to have learned the "
            "task, so their drift compares models that may not have learned it): "
            + "; ".join(f"{t}: {_models_text([k for k in keys if k[0] == t])}" for t in tasks)
            + ".")


def _interval_cell(v: dict) -> str:
    if v.get("ci"):
        return ci(v["ci"], f)
    return v.get("why") or DASH


def table3_learned(d: RunData) -> Table | None:
    """Table 3d: each model's study metric, its 95% interval and the majority class."""
    v = model_verdicts(d)
    if not v:
        return None
    order = {t: i for i, t in enumerate(d.tasks)}
    morder = {m: i for i, m in enumerate(d.methods)}
    rows = []
    for key in sorted(v, key=lambda k: (order.get(k[0], 99), morder.get(k[1], 99), str(k[1]),
                                        k[2])):
        x = v[key]
        verdict = {True: "above", False: NOT_LEARNED + " " + MARK, None: "not checked"}[
            x.get("above_majority")]
        rows.append([key[0], METHODS.get(key[1], key[1]), str(key[2]), str(x.get("metric")),
                     f(x.get("value")) if finite(x.get("value")) else DASH, _interval_cell(x),
                     f(x.get("majority")) if finite(x.get("majority")) else DASH, verdict])
    notes = ["Each model's study metric on the validation split with its 95% interval: Wilson "
             "score interval for accuracy; for F1 and MCC a percentile bootstrap over the "
             "validation examples (val_logits.npy, fixed seed). A model whose interval's lower "
             f"bound is at or below the majority-class score is {NOT_LEARNED} ({MARK}): not "
             "shown to have learned the task (this includes models below the majority). "
             "Every comparison involving such a model carries the mark."]
    return Table("table-3d-majority", "Table 3d: each model against the majority class",
                 ["Task", "Method", "Seed", "Metric", "Score", "95% interval", "Majority",
                  "Verdict"], rows, notes=notes)
