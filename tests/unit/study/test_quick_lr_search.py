"""The quick preset's learning rates are the committed search's, by the rule its header
states: per method, the median of the three tasks' best learning rates; the search read
selection rows held out of the training split (never the validation split), trained on the
quick preset's own rows, and searched the learning rate alone."""

from __future__ import annotations

import json
import statistics
from importlib import resources

import pytest

from loralens.core.config_load import load_config

RESULTS = resources.files("loralens.presets").joinpath("quick-lr-search")


def results() -> dict[tuple[str, str], dict]:
    out = {}
    for f in RESULTS.iterdir():
        if f.name.endswith(".json"):
            r = json.loads(f.read_text())
            out[(r["task"], r["method"])] = r
    return out


def test_one_result_per_task_and_method_from_selection_rows_only():
    quick = load_config("quick")
    res = results()
    assert sorted(res) == sorted((t, m) for t in quick.tasks for m in quick.methods)
    rows = {"mrpc": 384, "rte": 384, "sst2": 1152}  # the preset's training rows
    for (task, method), r in res.items():
        assert r["selection"] == "train_slice" and r["trial_seed"] == 0
        assert list(r["space"]) == ["lr"]
        lo, hi = quick.search.lr_full if method == "full" else quick.search.lr_lora
        assert r["space"]["lr"] == ["loguniform", lo, hi]
        assert r["counts"]["COMPLETE"] + r["counts"]["PRUNED"] == quick.search.trials
        for t in r["trials"]:
            attrs = t["user_attrs"]
            assert attrs["eval_split"] == "train" and attrs["eval_rows"] == 128, (task, t)
            assert attrs["train_rows"] == rows[task], (task, t)
        best = max((t for t in r["trials"] if t["state"] == "COMPLETE"),
                   key=lambda t: (t["value"], -t["number"]))
        assert r["best"]["number"] == best["number"]


@pytest.mark.parametrize("method, key", [("lora", "lr_lora"), ("full", "lr_full")])
def test_the_presets_rate_is_the_median_of_the_tasks_best(method, key):
    res = results()
    best = [r["best"]["params"]["lr"] for (_, m), r in res.items() if m == method]
    assert len(best) == 3
    # the preset writes it to 2 significant digits
    assert getattr(load_config("quick").train, key) == pytest.approx(statistics.median(best),
                                                                     rel=0.05)


def test_both_methods_train_the_head_at_one_rate():
    assert load_config("quick").train.lr_head == 1e-3
