"""Search pruning compares trials at equal fractions of their own training, whatever their
epochs: a trial reports each evaluation at the per-mille of its optimizer steps done, and
the median is taken over the completed trials' curves at that same fraction. No model:
fake trials in an in-memory Optuna study, driven through the trial's reporting callback."""

from __future__ import annotations

import optuna
import pytest
import torch

from loralens.core.config_load import load_config
from loralens.training.loop import _cosine_schedule
from loralens.training.search import (
    REPORT_ATTR, REPORT_UNIT, FractionMedianPruner, _pruning_reporter, make_pruner,
    report_step, total_train_steps, value_at,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

# A 2-epoch trial of 8 optimizer steps, evaluated every 2 steps: at 25, 50, 75 and 100% of
# its training; its accuracy rises as its cosine schedule decays.
TWO_EPOCHS = {250: 0.60, 500: 0.80, 750: 0.85, 1000: 0.86}


def entry(k: int, step: int, acc: float) -> dict:
    return {"eval": k, "step": step, "epoch": 1, "val_accuracy": acc, "val_loss": 1.0}


def study_with(*curves: dict, pruner=None) -> optuna.Study:
    study = optuna.create_study(direction="maximize", pruner=pruner or make_pruner(
        load_config(overrides=["search.startup_trials=1"]).search))
    for curve in curves:
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, value=max(curve.values()),
            intermediate_values=curve, user_attrs={REPORT_ATTR: REPORT_UNIT}))
    return study


def run(study: optuna.Study, total_steps: int, evals: list[tuple[int, float]]) -> list[bool]:
    """Drive a running trial's reporting with (step, accuracy) evaluations; whether each one
    pruned it (it stops at the first that does)."""
    on_eval = _pruning_reporter(study.ask(), "accuracy", total_steps)
    out = []
    for k, (step, acc) in enumerate(evals, start=1):
        try:
            on_eval(entry(k, step, acc))
            out.append(False)
        except optuna.TrialPruned:
            out.append(True)
            break
    return out


def test_a_long_schedule_is_not_pruned_against_a_short_ones_later_point():
    """A 4-epoch trial (16 steps, an evaluation every 2) at 12.5% then 25% of its training.
    Keyed by evaluation index (the old reporting), its 2nd evaluation (25%) met the 2-epoch
    trial's 2nd (50%: 0.80) and it was pruned; at equal fractions it meets 0.60 at 25% and
    goes on (at 12.5% no completed curve covers it yet)."""
    four_epochs = [(2, 0.61), (4, 0.62)]
    old = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(
        n_startup_trials=1, n_warmup_steps=0))
    old.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE, value=0.86,
        intermediate_values={k: v for k, v in enumerate(TWO_EPOCHS.values(), start=1)}))
    trial, decisions = old.ask(), []
    for k, (step, acc) in enumerate(four_epochs, start=1):
        trial.report(acc, k)  # the old key: the evaluation's index
        decisions.append(trial.should_prune())
    assert decisions == [False, True]  # the counter-example: pruned at its 25% point

    assert run(study_with(TWO_EPOCHS), 16, four_epochs) == [False, False]
    # what it reported: its fractions of training, per mille
    study = study_with(TWO_EPOCHS)
    run(study, 16, four_epochs)
    assert study.trials[-1].intermediate_values == {125: 0.61, 250: 0.62}
    assert study.trials[-1].user_attrs[REPORT_ATTR] == REPORT_UNIT


def test_a_trial_worse_at_the_same_fraction_is_pruned():
    # the same 4-epoch trial, below the 2-epoch one at 25% of training (0.58 < 0.60)
    assert run(study_with(TWO_EPOCHS), 16, [(2, 0.55), (4, 0.58), (6, 0.9)]) == [False, True]
    # a 3-epoch trial (12 steps, an evaluation every 3): 25%, 50%, ...; 0.79 < 0.80 at 50%
    assert run(study_with(TWO_EPOCHS), 12, [(3, 0.65), (6, 0.79)]) == [False, True]
    assert run(study_with(TWO_EPOCHS), 12, [(3, 0.65), (6, 0.81)]) == [False, False]


def test_the_median_is_over_every_completed_curve_at_the_same_fraction():
    """At 50%: the 2-epoch curve 0.80; a 3-epoch one evaluated at 25% and 75% (0.50, 0.80)
    interpolates to 0.65; a 4-epoch one (0.55, 0.75) to 0.65: the median is 0.65."""
    curves = (TWO_EPOCHS, {250: 0.50, 750: 0.80}, {250: 0.55, 750: 0.75})
    assert value_at(curves[1], 500) == pytest.approx(0.65)
    assert run(study_with(*curves), 8, [(4, 0.66)]) == [False]
    assert run(study_with(*curves), 8, [(4, 0.64)]) == [True]
    # its best value so far counts, as in Optuna's median pruner: 0.70 earlier beats 0.65
    assert run(study_with(*curves), 8, [(2, 0.70), (4, 0.64)]) == [False, False]


def test_startup_trials_and_curves_of_the_old_reporting_are_not_counted():
    old_keys = {1: 0.9, 2: 0.95, 3: 0.97, 4: 0.99}  # eval indices: never a fraction to compare
    study = optuna.create_study(direction="maximize",
                                pruner=FractionMedianPruner(n_startup_trials=1))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE,
                                              value=0.99, intermediate_values=old_keys))
    assert run(study, 8, [(2, 0.1), (4, 0.1)]) == [False, False]
    two = study_with(TWO_EPOCHS, pruner=FractionMedianPruner(n_startup_trials=2))
    assert run(two, 8, [(2, 0.1), (4, 0.1)]) == [False, False]  # 1 of 2 start-ups done


def test_value_at_interpolates_inside_a_curve_only():
    curve = {250: 0.6, 500: 0.8, 1000: 1.0}
    assert value_at(curve, 250) == 0.6 and value_at(curve, 375) == pytest.approx(0.7)
    assert value_at(curve, 750) == pytest.approx(0.9)
    assert value_at(curve, 100) is None and value_at(curve, 1001) is None
    assert value_at({}, 500) is None


def test_report_steps_are_fractions_of_the_trials_own_schedule():
    assert [report_step(s, 16) for s in (2, 4, 16)] == [125, 250, 1000]
    assert [report_step(s, 12) for s in (3, 4, 12)] == [250, 333, 1000]
    assert report_step(5, 0) == 1000  # an empty schedule cannot report past the end


@pytest.mark.parametrize("n_rows,batch,accum,epochs,max_steps",
                         [(100, 8, 1, 2, 0), (100, 8, 1, 4, 0), (101, 16, 3, 3, 0),
                          (1000, 8, 2, 4, 50), (7, 8, 1, 2, 0)])
def test_the_total_is_the_loops_schedule_length(n_rows, batch, accum, epochs, max_steps):
    """The per-mille denominator equals the cosine schedule's total steps in the loop."""
    tc = load_config(overrides=[f"train.batch_size={batch}", f"train.grad_accum={accum}",
                                f"train.epochs={epochs}", f"train.max_steps={max_steps}"]).train
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert total_train_steps(n_rows, tc) == _cosine_schedule(opt, n_rows, tc)[1]
    # and by hand for the first case: ceil(100 / 8) = 13 steps per epoch, 2 epochs
    if (n_rows, batch, accum, epochs) == (100, 8, 1, 2):
        assert total_train_steps(n_rows, tc) == 26
