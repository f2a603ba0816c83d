"""Which protocol a run follows, and where it deliberately differs from the published study.

One source for the report's header and provenance section and for the paper preset's
comments (a test checks that every difference listed here is named there).
"""

from __future__ import annotations

from loralens.core.config import StudyConfig

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
    that ``cfg`` makes."""
    out = []
    if cfg.data.selection == "train_slice":
        out.append(("selection slice", "model selection reads a stratified slice held out of "
                    "the training split instead of the validation split, so the reported "
                    "validation scores are not selected on (" + PUBLISHED + ")"))
    out.append(("search seed", f"search trials train with seed {cfg.search.seed}, outside the "
                "training seeds, so no reported seed replays a trial (the study trained trials "
                "with seed 42, a training seed)"))
    out.append(("sampler seeding", "each trial's TPE sampler is seeded from the study seed, "
                "task, method and the trial's position, so workers and resumed runs never "
                "draw a configuration again (the study seeded one sampler per trial from "
                "Python's salted hash())"))
    out.append(("one persistent study", "all trials of a task and method report to one "
                "Optuna study in a database (the study created a fresh in-memory study per "
                "trial, so TPE never modelled)"))
    ev = cfg.train
    out.append(("early-stopping cadence", (f"evaluated every {ev.eval_every} optimizer steps"
                if ev.eval_every else f"evaluated {ev.evals_per_epoch} times per epoch")
                + f" with patience {ev.patience}, so patience can act within 2-4 epochs (the "
                "study evaluated once per epoch: patience 3 never fired)"))
    return out
