"""Which protocol a run follows, and where it deliberately differs from the published study.

One source for the report's header and provenance section and for the paper preset's
comments (a test checks that every difference listed here is named there).
"""

from __future__ import annotations

import dataclasses

from loralens.core.config import SEARCHED_BY, StudyConfig
from loralens.core.config_load import load_config

PUBLISHED = ("the study selected on the GLUE validation split, for the search objective and "
             "for early stopping with the best state restored, and reported that same split")


def selection_protocol(cfg: StudyConfig) -> dict:
    """What selects (search, pruning, early stopping) and what is reported."""
    d = cfg.data
    if d.selection == "validation":
        return {"name": "validation", "selects_on": "validation split",
                "reports_on": "validation split", "optimistic": True,
                "text": "published protocol (data.selection: validation): the search "
                        "objective, pruning and early stopping read the validation split that "
                        "the tables report, so reported scores are optimistic"}
    return {"name": "train_slice", "selects_on": "selection slice of the training split",
            "reports_on": "validation split", "optimistic": False,
            "text": f"held-out selection (data.selection: train_slice): a stratified "
                    f"{d.selection_fraction:.0%} slice of each training split (at least "
                    f"{d.selection_min} rows where the split allows; seed "
                    f"{d.subset_seed}), never trained on, is the search objective, the pruning "
                    "signal and the early-stopping split; the validation split is scored once "
                    "per finished model and nothing selects on it"}


def differences(cfg: StudyConfig) -> list[tuple[str, str]]:
    """(key, what differs and why) for each deliberate difference from the published study
    that ``cfg`` makes: first the protocol rows the config switches on
    (:func:`protocol_differences`), then its settings that differ from the paper preset
    (:func:`config_differences`)."""
    return protocol_differences(cfg) + config_differences(cfg)


def _slice_text(cfg: StudyConfig) -> str:
    d = cfg.data
    return (f"a stratified max({d.selection_fraction:.0%}, {d.selection_min} rows) slice of "
            "each training split (never more than half of it)")


def protocol_differences(cfg: StudyConfig) -> list[tuple[str, str]]:
    """The protocol's differences from the published study, each only where it applies:
    the selection slice (``data.selection: train_slice``), the search's seed, sampler
    seeding and persistent study (``search.enabled``), and the early-stopping cadence
    (unless it is the study's: once per epoch)."""
    out = []
    if cfg.data.selection == "train_slice":
        out.append(("selection slice", "model selection reads " + _slice_text(cfg)
                    + f" (seed {cfg.data.subset_seed}), held out and never trained on, "
                    "instead of the validation split, so the reported validation scores are "
                    "not selected on (" + PUBLISHED + ")"))
    if cfg.search.enabled:
        out.append(("search seed", f"search trials train with seed {cfg.search.seed}, outside "
                    "the training seeds, so no reported seed replays a trial (the study "
                    "trained trials with seed 42, a training seed)"))
        out.append(("sampler seeding", "each trial's TPE sampler is seeded from the study "
                    "seed, task, method and the trial's position, so workers and resumed runs "
                    "never draw a configuration again (the study seeded one sampler per trial "
                    "from Python's salted hash())"))
        out.append(("one persistent study", "all trials of a task and method report to one "
                    "Optuna study in a database (the study created a fresh in-memory study per "
                    "trial, so TPE never modelled)"))
    cadence = cadence_text(cfg)
    if cadence:
        out.append(("early-stopping cadence", cadence))
    if cfg.stats.correction == "holm":
        out.append(("Holm correction", "each declared family of tests is corrected with "
                    "Holm's step-down procedure (stats.correction: holm): the same family-wise "
                    "error rate as Bonferroni, never less power (the study used Bonferroni; "
                    "stats.correction: bonferroni restores it)"))
    return out


def cadence_text(cfg: StudyConfig) -> str | None:
    """How often early stopping evaluates and whether ``train.patience`` can stop a model
    early, or None where the cadence is the study's (once per epoch).

    Patience ``p`` stops training after ``p`` evaluations in a row without a better
    selection loss; the first evaluation always sets the best, so stopping needs at least
    ``p + 2`` evaluations to end a run before its last one.
    """
    tc = cfg.train
    if not tc.eval_every and tc.evals_per_epoch == 1:
        return None
    searched = cfg.search.searches("epochs")
    epochs = sorted(cfg.search.epochs) if searched else [tc.epochs]
    span = (f"{epochs[0]} epoch{'s' if epochs[0] != 1 else ''}" if len(epochs) == 1
            or epochs[0] == epochs[-1] else f"{epochs[0]}-{epochs[-1]} epochs")
    span += " (search.epochs)" if searched else " (train.epochs)"
    study = " (the study evaluated once per epoch: patience 3 never fired)"
    if tc.patience == 0:
        return ((f"evaluated every {tc.eval_every} optimizer steps" if tc.eval_every else
                 f"evaluated {tc.evals_per_epoch} times per epoch")
                + ", patience 0: no early stopping, the best evaluated state is restored"
                + study)
    if tc.eval_every:
        return (f"evaluated every {tc.eval_every} optimizer steps with patience "
                f"{tc.patience} over {span}: whether patience can stop a model early depends "
                f"on its step count (it needs at least {tc.patience + 2} evaluations; the "
                "fit table shows where it fired)" + study)
    lo, hi = epochs[0] * tc.evals_per_epoch, epochs[-1] * tc.evals_per_epoch
    n = f"{lo}" if lo == hi else f"{lo}-{hi}"
    need = tc.patience + 2
    if lo >= need:
        verdict = "so patience can stop a model early"
    elif hi >= need:
        verdict = f"so patience can stop a model early only with at least {need} of them"
    else:
        verdict = (f"so patience cannot act (stopping early needs at least {need}); the "
                   "best evaluated state is still restored")
    return (f"evaluated {tc.evals_per_epoch} times per epoch with patience {tc.patience}: "
            f"{n} evaluations over {span}, {verdict}" + study)


# Keys of how a run executes or where it reports, not what the study is: never a difference
OPERATIONAL = ("preset", "task_defs", "data.glue_dir", "search.storage",
               "search.heartbeat_interval", "search.grace_period", "search.max_retry",
               "train.threads", "train.compile", "train.eval_batch_size", "extract.batch_size",
               "train.checkpoint_every",  # where a killed job resumes from, not what it learns
               "weights.batch_size", "tracking", "run")
# Keys the protocol rows above state (against the published study, not the preset)
PROTOCOL_KEYS = ("data.selection", "data.selection_fraction", "data.selection_min",
                 "data.subset_seed", "search.seed", "search.sampler_seed", "train.eval_every",
                 "train.evals_per_epoch", "train.patience")
# What a training-row count means under each selection protocol
TRAIN_ROW_KEYS = ("data.train_size", "data.train_size_per_task")


def _flat(cfg: StudyConfig) -> dict[str, tuple[object, str]]:
    """``{dotted key: (value, doc)}`` of every leaf of ``cfg``."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                out[f"{f.name}.{g.name}"] = (getattr(value, g.name), g.metadata.get("doc", ""))
        else:
            out[f.name] = (value, f.metadata.get("doc", ""))
    return out


def _skipped(key: str, cfg: StudyConfig) -> bool:
    if key in PROTOCOL_KEYS or any(key == k or key.startswith(k + ".") for k in OPERATIONAL):
        return True
    if cfg.search.enabled:
        return any(cfg.search.searches(d) for d, keys in SEARCHED_BY.items() if key in keys)
    return key.startswith("search.") and key != "search.enabled"


def show(value: object) -> str:
    """A config value as YAML writes it: null, true, [1, 2], {sst2: 640}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


def config_differences(cfg: StudyConfig, paper: StudyConfig | None = None
                       ) -> list[tuple[str, str]]:
    """(key, "paper preset: X; this run: Y (what the key does)") for each setting of
    ``cfg`` that differs from the paper preset (``presets/paper.yaml`` resolved by the
    config loader), leaving out operational keys (:data:`OPERATIONAL`), the keys the
    protocol rows state (:data:`PROTOCOL_KEYS`), the search space when the search is off
    and the hyperparameters each search's best trial replaces when it is on
    (:data:`SEARCHED_BY`: those of ``search.params`` when it names some)."""
    if paper is None:
        paper = load_config(preset="paper")
    ours, theirs = _flat(cfg), _flat(paper)
    out = []
    for key, (value, doc) in ours.items():
        if _skipped(key, cfg) or key not in theirs or theirs[key][0] == value:
            continue
        text = f"paper preset: {show(theirs[key][0])}; this run: {show(value)}"
        if key in TRAIN_ROW_KEYS and cfg.data.selection == "train_slice":
            doc = (f"training rows per task, drawn from the rest of each training split "
                   f"after the selection slice of max({cfg.data.selection_fraction:.0%}, "
                   f"{cfg.data.selection_min} rows) is held out; null or {{}} = all of that "
                   "rest")
        out.append((key, text + (f" ({doc})" if doc else "")))
    return out


def device_difference(hardware: dict | None, precisions: list[str], precision: str = "auto",
                      checkpointing: str = "auto", serving_dtype: str | None = None
                      ) -> tuple[str, str] | None:
    """("device and dtype", ...) where the run trained without a GPU (env.json's hardware),
    which the published study used with bf16 autocast, gradient checkpointing and 8-bit
    paged AdamW for full fine-tuning; None on a GPU or when the hardware is unknown.
    ``precisions``: the dtypes the jobs recorded (fit.precision: fp32, bf16);
    ``precision``, ``checkpointing``: train.precision and train.gradient_checkpointing;
    ``serving_dtype``: what the serving benchmark recorded (None: not run yet)."""
    if not isinstance(hardware, dict) or hardware.get("cuda") in (None, True):
        return None
    cpu = hardware.get("cpu_model") or hardware.get("processor") or "CPU"
    dtypes = ", ".join(dict.fromkeys(precisions)) or "a dtype not recorded yet"
    serving = serving_dtype or ("bfloat16" if precision == "bf16" else "float32")
    return ("device and dtype", f"paper: a GPU, bf16 autocast, gradient checkpointing, 8-bit "
            f"paged AdamW for full fine-tuning, bf16 serving; this run: the CPU ({cpu}), "
            f"training in {dtypes} (train.precision {precision}), gradient checkpointing "
            f"{'on' if checkpointing == 'on' else 'off'}, torch AdamW, {serving} serving")
