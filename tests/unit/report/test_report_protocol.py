"""The report states the selection protocol: header, Tables 1-3, provenance (no model).

Run directories come from ``tests.helpers.report_run.synthetic_run`` with ``data.selection`` set to
train_slice (held-out selection), validation (the published protocol) or absent (a run
written before the key existed, reported as the published protocol).
"""

from __future__ import annotations

import pytest
import yaml

from loralens.core import protocol
from loralens.study.config import config_from_dict, load_config
from loralens.report.compose import OPTIMISTIC
from loralens.report.run_data import load_run, resolve_protocol
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json, read_json
from tests.helpers.report_run import N_VAL, SEEDS, SLICE, TASKS, synthetic_run

SPLIT_NOTE = {
    "train_slice": "Reported split: validation split, 40 rows (sst2), 24 rows (rte), scored "
                   "once per finished model; nothing selected on it (protocol train_slice: "
                   "search, pruning and early stopping read a selection slice held out of the "
                   "training split, Table 1).",
    "validation": "Reported split: validation split, 40 rows (sst2), 24 rows (rte), also used "
                  "for search and early stopping: optimistic (protocol validation, the "
                  "published one: the hyperparameters and the restored best state were chosen "
                  "on these rows, so the scores overstate accuracy on unseen data"}
ASSUMED = ("config.yaml has no data.selection: the run predates the key, and older versions "
           "selected on the validation split")


def _report(root, selection, edit=None) -> tuple[RunDir, str]:
    from loralens.report import build_report

    run = synthetic_run(root, stages=("search", "train"), selection=selection)
    if edit:
        edit(run)
    build_report(run)
    return run, (run.report_dir / "report.md").read_text()


def _header(md: str) -> str:
    return md.split("\n## ")[0]


def _cfg(run: RunDir):
    return config_from_dict(yaml.safe_load(run.config_path.read_text()))


def _patience_stop(run: RunDir) -> None:
    """sst2/full/seed 1337 stopped by patience at step 3 (evaluated every 2 steps)."""
    path = run.metrics_path("sst2", "full", 1337)
    m = read_json(path)
    m["fit"].update(stopped_step=3, stopped_early=True, best_step=2,
                    history=[{"eval": 1, "step": 2}, {"eval": 2, "step": 3}])
    atomic_write_json(path, m)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    return _report(tmp_path_factory.mktemp("held_out") / "run", "train_slice", _patience_stop)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return _report(tmp_path_factory.mktemp("published") / "run", "validation")


def test_train_slice_header_names_the_slice_and_no_warning(held_out):
    run, md = held_out
    info = protocol.selection_protocol(_cfg(run))
    assert info["name"] == "train_slice"
    assert (f"**Selection protocol** — {info['text']}. Selection slice per task: "
            f"sst2 {SLICE['sst2']} rows, rte {SLICE['rte']} rows (Table 1).") in _header(md)
    assert "held-out selection (data.selection: train_slice)" in info["text"]
    assert "optimistic" not in md and OPTIMISTIC not in md


def test_train_slice_table3_says_nothing_was_selected_on_validation(held_out):
    _, md = held_out
    assert "**Table 3: accuracy and F1 (validation split, nothing selected on it)**" in md
    assert SPLIT_NOTE["train_slice"] + "  \n" in md
    assert f"Each mean rests on 3 seeds per method ({', '.join(map(str, SEEDS))})." in md
    assert ("Search score: the selection metric of the best trial on the selection slice "
            "held out of the training split") in md


def test_data_table_shows_the_selection_slice(held_out):
    _, md = held_out
    assert ("| Task | Train rows | Train labels | Selection rows (split) | Selection labels | "
            "Early-stop rows | Validation rows |") in md
    assert ("| sst2 | 640 | negative 320 (50%), positive 320 (50%) | 256 (train slice) | "
            "negative 128 (50%), positive 128 (50%) | 128 | 40 |") in md
    assert ("| rte | 64 | entailment 32 (50%), not_entailment 32 (50%) | 32 (train slice) | "
            "entailment 16 (50%), not_entailment 16 (50%) | 32 | 24 |") in md


def test_provenance_lists_every_difference_and_the_protocol(held_out):
    run, md = held_out
    cfg = _cfg(run)
    diffs = protocol.differences(cfg)
    assert [k for k, _ in diffs][0] == "selection slice"
    for key, text in diffs:
        assert f"| {key} | {text} |" in md, key
    assert f"| Selection protocol | {protocol.selection_protocol(cfg)['text']} |" in md
    assert "**Deliberate differences from the published study**" in md


def test_fit_table_shows_eval_cadence_and_patience_stop(held_out):
    _, md = held_out
    assert "| sst2 | full FT | 1337 | 1 | 4 | 2 | 2 steps | 2 | at step 3 | 30.0 s |" in md
    assert "| sst2 | full FT | 42 | 1 | 4 | 0 | 2 steps | 4 | no | 30.0 s |" in md


def test_validation_protocol_warns_in_header_and_table3(published):
    run, md = published
    info = protocol.selection_protocol(_cfg(run))
    assert info["optimistic"]
    assert f"> ⚠ {OPTIMISTIC}Selection protocol — {info['text']}. Table 3 reports" \
           in _header(md)
    assert "**Table 3: accuracy and F1 (validation split, also selected on: optimistic)**" in md
    assert SPLIT_NOTE["validation"] + ")." in md
    assert "| sst2 | 640 | negative 320 (50%), positive 320 (50%) | 40 (validation split) |" in md
    assert "| selection slice |" not in md  # not a difference under the published protocol
    assert "Search score: the selection metric of the best trial on the validation split" in md


def test_old_run_is_reported_as_the_validation_protocol(tmp_path):
    def old_key(run: RunDir) -> None:  # a key the current schema no longer knows
        data = yaml.safe_load(run.config_path.read_text())
        data["data"]["val_size"] = 100
        run.config_path.write_text(yaml.safe_dump(data, sort_keys=False))

    run, md = _report(tmp_path / "run", None, old_key)
    assert "selection:" not in run.config_path.read_text()
    pr = load_run(run).protocol
    assert pr.name == "validation" and pr.optimistic and pr.assumed == ASSUMED
    assert len(pr.dropped) == 1 and pr.dropped[0].startswith("unknown key 'data.val_size'")
    head = _header(md)
    assert OPTIMISTIC in head and f"Assumed: {ASSUMED}." in head
    assert SPLIT_NOTE["validation"] + f"; {ASSUMED})." in md
    assert ("config.yaml lacks data.selection, data.selection_fraction, data.selection_min, "
            "search.seed, search.sampler_seed, train.evals_per_epoch: the run predates these "
            "keys") in md
    assert ("Stored keys the current config rejects, ignored here: unknown key "
            "'data.val_size'") in md
    # data.json without a selection entry: the validation split's own rows, said so
    assert f"| rte | 64 | entailment 32 (50%), not_entailment 32 (50%) | {N_VAL['rte']} " \
           "(validation split) |" in md
    assert "sst2, rte: data.json predates its \"selection\" entry" in md
    # metrics.json without fit.eval_every / stopped_step
    assert "| rte | LoRA | 42 | 1 | 4 | 0 | once per epoch | 4 | no | 30.0 s |" in md


def test_data_json_disagreeing_with_config_is_flagged(tmp_path):
    def rte_on_validation(run: RunDir) -> None:
        from tests.helpers.report_run import data_stats

        run.record_data("rte", data_stats("rte", "validation"))

    _, md = _report(tmp_path / "run", "train_slice", rte_on_validation)
    assert ("**data.json disagrees with config.yaml:** rte was prepared with data.selection "
            "validation, but config.yaml says train_slice") in _header(md)
    assert "**Table 3: accuracy and F1 (validation)**" in md
    assert "Reported split: validation split, 40 rows of sst2, scored once" in md
    assert "Reported split: validation split, 24 rows of rte, also used for search" in md


def test_resolve_protocol_survives_keys_the_schema_rejects():
    cfg = load_config(overrides={"tasks": list(TASKS), "data": {"selection": "validation"}})
    stored = cfg.to_dict()
    stored["search"]["seed"] = 42          # a training seed: rejected today
    stored["train"]["evals_per_epoch"] = 0  # below the minimum
    pr = resolve_protocol(stored, None)
    assert pr.name == "validation" and not pr.assumed and not pr.missing
    assert sorted(x.split(":")[0] for x in pr.dropped) == ["search.seed",
                                                         "train.evals_per_epoch"]
    assert dict(pr.differences)["search seed"].startswith("search trials train with seed 0")


def test_no_config_has_no_protocol(tmp_path):
    from loralens.report import build_report

    (tmp_path / "empty").mkdir()
    build_report(tmp_path / "empty")
    md = (tmp_path / "empty" / "report" / "report.md").read_text()
    assert "Differences from the published study: unknown without config.yaml" in md
    assert "| Selection protocol | unknown (no config.yaml) |" in md
