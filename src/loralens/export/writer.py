"""``loralens export RUN_DIR OUT_DIR [--method NAME ...] [--merge]``: every trained model of
a run (or of the methods named) as standard artifacts (:mod:`loralens.models.artifacts`) with a
model card.

``OUT_DIR/<task>/<method>/seed<seed>/`` holds a PEFT adapter (any PEFT method: LoRA, DoRA,
IA3, ..., which plain PEFT loads) or a standard sequence-classification checkpoint (full
fine-tuning; head-only training, the base with its trained head; and a PEFT method with
``--merge``), the
tokenizer and README.md: task and labels, method, hyperparameters, the validation scores
with the split and file they were measured on, the base model and its note, the loralens
version and commit that trained it, the input preprocessing. ``OUT_DIR/export.json`` lists
them. Run directories of the old layouts export too: this is also the converter.
The card carries the Hub's metadata (:mod:`loralens.models.cards`): the task's hub dataset,
its config and split, the base model's hub id and revision; ``--push-to-hub`` uploads the
artifacts (:mod:`.hub`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from loralens.core.errors import RunDirError

from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json, read_json
from loralens.tasks.registry import get_task, resolve_config_tasks


def _provenance(run: RunDir) -> tuple[str | None, str | None]:
    """(loralens version, git commit) that wrote the run, from loralens.json and env.json."""
    version = read_json(run.format_path).get("loralens") if run.format_path.is_file() else None
    commit = None
    if run.env_path.is_file():
        env = read_json(run.env_path)
        for key in ("train", "run", *env):  # the training command's record first
            if isinstance(env.get(key), dict) and env[key].get("git_commit"):
                commit = env[key]["git_commit"]
                break
    return version, commit


def job_card(run: RunDir, task: str, method: str, seed: int, cfg) -> dict:
    """What the model card says about one job, from its metrics.json and the run."""
    m = read_json(run.metrics_path(task, method, seed))
    version, commit = _provenance(run)
    source = ((m.get("data") or {}).get("validation") or {}).get("source")
    v = m.get("validation") or {}
    return {
        "task": task, "method": method, "seed": seed, "base": m.get("model"),
        "base_note": m.get("model_note"), "base_revision": cfg.model.revision,
        **get_task(task).card_dataset(),  # the Hub's name of the dataset (card metadata)
        "hyperparameters": {**(m.get("hyperparameters") or {}),
                            **({"overrides": m["overrides"]} if m.get("overrides") else {})},
        "scores": {k: v[k] for k in ("accuracy", "f1", "loss", "n") if k in v},
        "score_split": f"the validation split, {v.get('n', '?')} rows of "
                       f"{source or 'the GLUE dev file'}",
        "version": version, "commit": commit, "max_length": cfg.data.max_length,
    }


def select_methods(run: RunDir, jobs: list, methods: Sequence[str] | None) -> list:
    """The jobs of ``methods`` (all of them: None); a method the run has no finished model
    of is an error naming the methods it has."""
    if not methods:
        return jobs
    present = sorted({m for _, m, _ in jobs})
    missing = [m for m in dict.fromkeys(methods) if m not in present]
    if missing:
        raise RunDirError(f"{run.root}: no finished model of method(s) "
                          f"{', '.join(missing)} to export; the run has "
                          f"{', '.join(present) or 'none'}")
    return [j for j in jobs if j[1] in set(methods)]


def export_run(run_dir: str | Path, out_dir: str | Path, merge: bool = False,
               progress=print, methods: Sequence[str] | None = None) -> list[dict]:
    """Export every finished job of ``run_dir`` (of ``methods`` only, when given) into
    ``out_dir``; returns the manifest rows."""
    from loralens.models.artifacts import merged
    from loralens.models.methods import get_method
    from loralens.models.classifier import load_base
    from loralens.models.saving import load_trained, save_trained

    run, out = RunDir(run_dir), Path(out_dir)
    cfg = run.load_config()
    resolve_config_tasks(cfg)
    jobs = run.finished_jobs()
    if not jobs:
        raise RunDirError(f"{run.root}: no finished model to export (no models/*/*/seed*/"
                          "metrics.json)")
    jobs = select_methods(run, jobs, methods)
    if out.resolve() == run.root.resolve() or run.root.resolve() in out.resolve().parents:
        raise RunDirError(f"{out}: export into a directory outside the run directory")
    base = load_base(cfg)
    rows = []
    for task, method, seed in jobs:
        spec = get_task(task)
        card = job_card(run, task, method, seed, cfg)
        model = load_trained(run.job_dir(task, method, seed), base.backbone(), spec.num_labels)
        adapter = get_method(method, cfg).is_adapter  # any PEFT method (LoRA, DoRA, IA3...)
        as_adapter = adapter and not merge
        if adapter and merge:
            model = merged(model)
            card.update(merged=True, kind="PEFT adapter merged into a full checkpoint")
        dest = out / task / method / f"seed{seed}"
        save_trained(model, method, dest, base.tokenizer, spec.label_names, card)
        rows.append({"task": task, "method": method, "seed": seed, "path": str(dest),
                     "kind": "peft-adapter" if as_adapter else "sequence-classification",
                     "scores": card["scores"]})
        progress(f"exported {task}/{method}/seed{seed} -> {dest} ({rows[-1]['kind']})")
        del model
    atomic_write_json(out / "export.json", {"run_dir": str(run.root), "merge": merge,
                                            "methods": sorted({m for _, m, _ in jobs}),
                                            "base": base.name, "base_path": base.resolved.path,
                                            "artifacts": rows})
    return rows
