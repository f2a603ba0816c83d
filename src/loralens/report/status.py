"""Which stages have run: one :class:`Stage` per stage, with what is missing and how to make it.

:func:`stage_status` compares what the run directory holds (:class:`RunData`) with what
the config asks for (tasks x methods x seeds); :func:`table_status` shows the result.
"""

from __future__ import annotations

from dataclasses import dataclass

from loralens.report.formatting import Table, short_list
from loralens.report.run_data import RunData


@dataclass
class Stage:
    name: str
    state: str        # "done", "partial", "not run", "disabled"
    detail: str
    hint: str = ""    # what to run when something is missing


def rerun_hint(stage: str) -> str:
    return f"run `loralens run` (it resumes) or `loralens run --stages {stage}`"


def stage_status(d: RunData) -> list[Stage]:
    pairs = [(t, m) for t in d.tasks for m in d.methods]
    return [_sanity(d, pairs), _search(d, pairs), _train(d, pairs), _extract(d), _drift(d),
            _weights(d), _bench(d)]


def table_status(stages: list[Stage]) -> Table:
    rows = [[s.name, s.state, s.detail] for s in stages]
    return Table("table-status", "Stages of this run", ["Stage", "Status", "Details"], rows)


# --------------------------------------------------------------------------- per stage

def _sanity(d: RunData, pairs: list[tuple[str, str]]) -> Stage:
    done = {(r.get("task"), r.get("method")) for r in d.sanity}
    failed = [f"{r.get('task')}/{r.get('method')}" for r in d.sanity if not r.get("passed")]
    miss = [f"{t}/{m}" for t, m in pairs if (t, m) not in done]
    state = "done" if not miss and d.sanity else "partial" if d.sanity else "not run"
    detail = f"{len(d.sanity)} of {len(pairs)} checks stored"
    if failed:
        detail += f"; FAILED: {', '.join(failed)}"
    if miss and d.sanity:
        detail += f"; missing {', '.join(miss)}"
    return Stage("sanity", state, detail, rerun_hint("sanity") if miss else "")


def _search(d: RunData, pairs: list[tuple[str, str]]) -> Stage:
    if not d.search_enabled:
        return Stage("search", "disabled", "search.enabled is false: training used the "
                                           "config's hyperparameters")
    miss = [f"{t}/{m}" for t, m in pairs if (t, m) not in d.search]
    state = "done" if not miss else "partial" if d.search else "not run"
    detail = f"{len(pairs) - len(miss)} of {len(pairs)} task-method searches" + (
        f"; missing {', '.join(miss)}" if miss and d.search else "")
    return Stage("search", state, detail, rerun_hint("search") if miss else "")


def _train(d: RunData, pairs: list[tuple[str, str]]) -> Stage:
    want = [(t, m, s) for t, m in pairs for s in d.seeds]
    miss = [f"{t}/{m}/seed{s}" for t, m, s in want if (t, m, s) not in d.jobs]
    state = "done" if want and not miss else "partial" if d.jobs else "not run"
    detail = f"{len(want) - len(miss)} of {len(want)} jobs finished" + (
        f"; missing {short_list(miss)}" if miss and d.jobs else "")
    return Stage("train", state, detail, rerun_hint("train") if miss or not want else "")


def _extract(d: RunData) -> Stage:
    miss_t = [t for t in d.tasks if t not in d.extract]
    unextracted = [f"{t}/{m}-seed{s}" for t, m, s in d.jobs
                   if t in d.extract and f"{m}-seed{s}" not in d.extract[t].get("models", {})]
    state = ("not run" if not d.extract else
             "done" if not miss_t and not unextracted else "partial")
    detail = ", ".join(f"{t}: {len(man.get('models', {}))} models on {man.get('n_examples', '?')}"
                       f" examples" for t, man in d.extract.items()) or "nothing extracted"
    if d.extract and miss_t:
        detail += f"; tasks not extracted: {', '.join(miss_t)}"
    if unextracted:
        detail += f"; finished jobs not extracted: {short_list(unextracted)}"
    return Stage("extract", state, detail,
                 rerun_hint("extract") if miss_t or unextracted else "")


def _drift(d: RunData) -> Stage:
    if d.table4 is None and d.table3 is None:
        return Stage("drift", "not run", "no drift/table3.json or drift/table4.json",
                     rerun_hint("drift"))
    have = {e.get("task") for e in (d.table4 or {}).get("tasks", [])}
    miss = [t for t in d.tasks if t not in have]
    stale = _stale_drift(d)
    detail = f"drift for {len(have)} of {len(d.tasks)} tasks" + (
        f"; missing {', '.join(miss)}" if miss else "") + (f"; {stale}" if stale else "")
    return Stage("drift", "partial" if miss or stale else "done", detail,
                 rerun_hint("drift") if miss or stale else "")


def _stale_drift(d: RunData) -> str:
    """Jobs finished after the drift tables were computed (they are not in them)."""
    counted = set()
    for e in (d.table3 or {}).get("tasks", []):
        for c in (e.get("metrics") or {}).values():
            for m, seeds in (c.get("all_seeds") or {}).items():
                counted |= {(e.get("task"), m, int(s)) for s in seeds}
            break
    from loralens.report.methods_report import is_multi, method_results

    if is_multi(d):  # the other methods' drift: drift/methods.json
        for r in (method_results(d)["drift"] or {}).get("rows") or []:
            counted |= {(r.get("task"), r.get("method"), int(s)) for s in r.get("per_seed") or {}}
    if d.table3 is None:
        return ""
    later = [f"{t}/{m}/seed{s}" for (t, m, s) in d.jobs if (t, m, s) not in counted]
    return f"jobs finished after the drift tables: {short_list(later)}" if later else ""


def _weights(d: RunData) -> Stage:
    from loralens.report.weight_tables import weight_data

    rows = weight_data(d)["layers"]
    if rows is None:
        return Stage("weights", "not run", "no weightspace/layers.json", rerun_hint("weights"))
    have = {(r.get("task"), r.get("method"), r.get("seed")) for r in rows}
    miss = [f"{t}/{m}/seed{s}" for t, m, s in d.jobs if (t, m, s) not in have]
    detail = f"{len(have)} of {len(d.jobs)} trained models analysed" + (
        f"; missing {short_list(miss)}" if miss else "")
    return Stage("weights", "partial" if miss else "done", detail,
                 rerun_hint("weights") if miss else "")


def _bench(d: RunData) -> Stage:
    if d.serving is None:
        return Stage("bench", "not run", "no bench/serving.json", rerun_hint("bench"))
    have = set((d.serving.get("tasks") or {}))
    miss = [t for t in d.tasks if t not in have]
    checks = d.serving.get("checks") or {}
    bad = [k for k, ok in checks.items() if not ok]
    detail = f"{len(have)} of {len(d.tasks)} tasks benchmarked" + (
        f"; missing {', '.join(miss)}" if miss else "") + (
        f"; {len(checks) - len(bad)}/{len(checks)} equality checks passed" if checks else "")
    if bad:
        detail += f" (FAILED: {'; '.join(bad)})"
    return Stage("bench", "partial" if miss else "done", detail,
                 rerun_hint("bench") if miss else "")
