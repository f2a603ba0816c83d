"""The cost-of-the-run tables: wall time per stage, and training throughput with FLOPs
utilisation per task and method (from metrics.json "fit").
"""

from __future__ import annotations

import json
import statistics
from typing import Any

from loralens.report.formatting import DASH, METHODS, Table, finite, pct, rate, seconds, short_list
from loralens.report.run_data import STAGES, RunData


def read_plan(d: RunData) -> dict | None:
    """The run directory's ``plan.json`` (the dry-run plan stored by ``loralens run
    --plan``), None when there is none or it cannot be read (a problem noted)."""
    run = getattr(d, "run", None)
    path = getattr(run, "plan_path", None)
    if path is None or not path.exists():
        return None
    try:
        with open(path) as fh:
            plan = json.load(fh)
    except (OSError, ValueError) as e:
        d.problems.append(f"{path.name} ({path.parent}) could not be read: {e}")
        return None
    return plan if isinstance(plan, dict) and isinstance(plan.get("stages"), dict) else None


def _estimate_cells(est: Any, actual: Any) -> tuple[str, str]:
    """(estimate, actual / estimate) of one stage: a range "low – high" where early
    stopping may cut the work (its ratio likewise: actual / high – actual / low); "not
    estimated" for stages the plan gives seconds to (drift, report) and "off" for those it
    does not run."""
    if not isinstance(est, dict):
        return DASH, DASH
    if est.get("off"):
        return "off", DASH
    high, low = est.get("seconds"), est.get("low_seconds")
    if not finite(high):
        return ("not estimated (seconds)" if est.get("cheap") else DASH), DASH
    ranged = finite(low) and low < high
    cell = f"{seconds(low)} – {seconds(high)}" if ranged else seconds(high)
    if not finite(actual) or high <= 0:
        return cell, DASH
    ratio = (f"{actual / high:.2f} – {actual / low:.2f}" if ranged and low > 0
             else f"{actual / high:.2f}")
    return cell, ratio


def _plan_note(plan: dict) -> str:
    where = f"measured on {plan['cpu']}" if plan.get("cpu") else "measured where it ran"
    target = ""
    if finite(plan.get("peak_target")) and finite(plan.get("peak_here")):
        target = (f", planned for another machine (float32 model-shape peak "
                  f"{plan['peak_target'] / 1e9:.0f} GFLOP/s vs {plan['peak_here'] / 1e9:.0f} "
                  "measured)")
    busy = plan.get("contention")
    load = (f"; other processes used {busy:.0%} of the CPU while it measured"
            if finite(busy) and busy > 0.1 else "")
    return (f"Estimate: the dry-run plan stored before the run (plan.json, "
            f"{plan.get('created') or 'undated'}; {where}{target}{load}). A range is the "
            "work with every fit stopped at the earliest point it can stop (early stopping; "
            "the sanity check's loss threshold, after one epoch) – every fit run to its end; Actual / estimate is the wall time over the estimate (over each "
            "end of a range). Timings add up over a run directory's invocations; the plan "
            "is the first invocation's.")


def table_timings(d: RunData) -> Table | None:
    t = d.timings if isinstance(d.timings, dict) else {}
    train_s = sum(float((m.get("fit") or {}).get("train_seconds") or 0) for m in d.jobs.values())
    if not t and not train_s:
        return None
    plan = read_plan(d) if t else None
    order = [s for s in STAGES if s in t] + [s for s in t if s not in STAGES]
    rows = [[s, seconds(t[s])] for s in order]
    columns = ["Stage", "Wall time"]
    if plan is not None:
        columns += ["Estimate", "Actual / estimate"]
        for r in rows:
            r.extend(_estimate_cells(plan["stages"].get(r[0]), t[r[0]]))
    if t:
        total = sum(v for v in t.values() if finite(v))
        rows.append(["total (stages)", seconds(total)])
        if plan is not None:
            rows[-1].extend(_estimate_cells(
                {"seconds": plan.get("total_seconds"), "low_seconds": plan.get("total_low_seconds")},
                total))
    notes = []
    if train_s:
        notes.append(f"Training loops of the {len(d.jobs)} finished jobs: {seconds(train_s)} "
                     "in all (fit only, from metrics.json).")
    if not t:
        notes.append("No timings.json: the stages were run one by one, not by `loralens run`.")
    if plan is not None:
        notes.append(_plan_note(plan))
    elif t:
        notes.append("No estimate: the run has no plan.json (`loralens run --dry-run --plan "
                     "FILE`, then `loralens run --plan FILE`, stores one; `make run` does).")
    return Table("table-timings", "Wall time per stage", columns, rows, notes=notes)


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
    load, model_load, cpus = (fit.get("peak_load"), fit.get("peak_model_load"),
                              fit.get("peak_cpus"))
    return {"tokens_per_s": _ratio(fit.get("real_tokens"), step),
            "achieved": achieved,
            "mfu": mfu if finite(mfu) else _ratio(achieved, peak),
            "mfu_model": mfu_model if finite(mfu_model) else _ratio(achieved, peak_model),
            "peak": peak if finite(peak) else None,
            "peak_model": peak_model if finite(peak_model) else None,
            "outside_steps": None if in_steps is None else 1 - in_steps,
            "load": load if finite(load) else None,
            "model_load": model_load if finite(model_load) else None,
            "cpus": cpus if finite(cpus) else None}


def failed_utilisation(utilisation: Any, load: Any, cpus: Any) -> str | None:
    """Why a utilisation (achieved / peak, a fraction) is no utilisation, or None: above 1
    the peak it was divided by was not the machine's peak (measured while other work
    shared the cores), so the number is a failed measurement."""
    if not finite(utilisation) or utilisation <= 1:
        return None
    where = (f"peak measured under load {load:.1f} on {cpus} cores"
             if finite(load) and finite(cpus) else "peak measured under an unrecorded load")
    return f"failed measurement: utilisation {100 * utilisation:.0f}% > 100%: {where}"


# utilisation columns: job_throughput's key -> the key of the load its peak was measured under
UTILISATION_LOAD = {"mfu": "load", "mfu_model": "model_load"}
UTILISATION_NAME = {"mfu": "MFU (square-GEMM peak)", "mfu_model": "MFU (model-shape peak)"}


def _utilisation_cell(rates: list[dict], name: str, n: int) -> str:
    """:func:`_median_cell` of the utilisations at or below 100%; those above are failed
    measurements: the cell says so, in full when every job's failed."""
    load = UTILISATION_LOAD[name]
    failed = [r for r in rates if failed_utilisation(r[name], r[load], r["cpus"])]
    if not failed:
        return _median_cell([r[name] for r in rates], pct, n)
    if len(failed) == sum(finite(r[name]) for r in rates):
        worst = max(failed, key=lambda r: r[name])
        return failed_utilisation(worst[name], worst[load], worst["cpus"])
    valid = [r[name] for r in rates if r not in failed and finite(r[name])]
    k = len(failed)
    return (f"{pct(statistics.median(valid))} ({len(valid)} of {n}; {k} failed "
            f"measurement{'s' if k != 1 else ''})")


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

    rows, sizes, precision_notes, partial, failures = [], set(), {}, False, []
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
                     *(_utilisation_cell(rates, name, len(jobs)) if name in UTILISATION_LOAD
                       else _median_cell([r[name] for r in rates], fmt, len(jobs))
                       for name, fmt in THROUGHPUT_CELLS)])
        for (seed, _), r in zip(jobs, rates):
            for name in UTILISATION_LOAD:
                why = failed_utilisation(r[name], r[UTILISATION_LOAD[name]], r["cpus"])
                if why:
                    failures.append(f"{label} seed {seed}, {UTILISATION_NAME[name]}: {why}")
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
             "linear-layer shapes (model shapes), each the best of several repeats.",
             "Fit time outside steps: 1 − step seconds / fit seconds, the share of the fit "
             "loop spent outside training steps, mostly in early-stopping evaluations "
             "(fit.eval_seconds)."]
    if len(precision_notes) == 1 and len(next(iter(precision_notes.values()))) == len(rows):
        notes.append("Why this precision: " + next(iter(precision_notes)))
    else:
        notes += [f"Why this precision, {', '.join(labels)}: {text}"
                  for text, labels in precision_notes.items()]
    if failures:
        notes.append("Failed measurements (a utilisation above 100% means the peak was "
                     "measured while other work shared the cores, not the machine's peak; "
                     "peaks are the best of several repeats, before and after training, "
                     "with the 1-minute load average when measured): " + "; ".join(failures)
                     + ".")
    if older:
        notes.append(f"{len(older)} of {len(d.jobs)} finished jobs predate throughput "
                     f"recording and are not in these medians: {short_list(older)}.")
    return Table("table-throughput", "Training throughput and FLOPs utilisation",
                 ["Task", "Method", "Precision", "Jobs (seeds)", "Real tokens/s",
                  "Achieved GFLOP/s", "MFU (square-GEMM peak)", "MFU (model-shape peak)",
                  "Peak GFLOP/s (square GEMM)", "Peak GFLOP/s (model shapes)",
                  "Fit time outside steps"], rows, notes=notes)
