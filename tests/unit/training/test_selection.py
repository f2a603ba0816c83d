"""Selection never sees the reported split (issue 12, part 1).

Search objective, pruning and early stopping read a stratified slice held out of the
training split; the validation split is scored once per finished model. The poison
test permutes the validation labels and shows that nothing that selects, and nothing
that is trained, changes; under ``data.selection: validation`` (the published
protocol) the same poison changes the search, so the test can fail.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from loralens.core.errors import ConfigError
from loralens.core.config import StudyConfig
from loralens.study.config import load_config
from loralens.tasks.rows import Example, Split
from loralens.tasks.sources import load_split
from loralens.models.classifier import apply_method, build_classifier
from loralens.tasks.registry import get_task
from loralens.training.loop import fit
from loralens.training.job import prepare_task


def synthetic(n0: int, n1: int) -> Split:
    rows = [Example(i, (f"row {i}",), 0 if i < n0 else 1) for i in range(n0 + n1)]
    return Split("sst2", "train", rows, "synthetic", {0: n0, 1: n1})


@pytest.mark.parametrize("fraction,minimum,expected", [
    (0.25, 1, {0: 8, 1: 2}),     # 10 rows: 7.5 / 2.5 -> floors 7 / 2, the tie goes to label 0
    (0.1, 16, {0: 12, 1: 4}),    # 4 rows would be too few: the minimum, 16, split 3:1
    (0.1, 100, {0: 15, 1: 5}),   # never more than half of the split (20 of 40)
])
def test_the_slice_is_stratified_with_exact_counts(fraction, minimum, expected):
    split = synthetic(30, 10)
    held, rest = split.carve(fraction, minimum, seed=0)
    assert held.label_counts == expected
    assert len(held) + len(rest) == 40
    assert set(held.ids()).isdisjoint(rest.ids())
    assert held.ids() == sorted(held.ids()) and rest.ids() == sorted(rest.ids())
    again, _ = split.carve(fraction, minimum, seed=0)
    assert again.ids() == held.ids()                         # fixed for every method and seed
    assert split.carve(fraction, minimum, seed=1)[0].ids() != held.ids()


def test_a_split_too_small_to_hold_a_slice_out_is_an_error():
    with pytest.raises(Exception, match="synthetic: 1 row"):
        synthetic(1, 0).carve(0.1, 1, seed=0)


def test_selection_rows_are_disjoint_from_training_and_reported_rows(glue_dir, tiny_base):
    cfg = load_config(overrides=[f"data.glue_dir={glue_dir}", "data.max_length=32",
                                 "data.early_stop_size=32", "search.eval_size=48"])
    p = prepare_task(cfg, "rte", tiny_base.tokenizer)
    full = load_split(get_task("rte"), "train", glue_dir)
    sel = set(p.selection_split.ids())
    assert len(sel) == 256                   # 10% of 2490 is 249: the minimum, 256, applies
    assert p.selection_split.source == full.source         # carved from the training file
    assert sel.isdisjoint(p.train_split.ids())             # never trained on
    assert len(p.train_split) == len(full) - 256
    assert p.val_split.name == "validation" and p.val_split.source.endswith("dev.tsv")
    assert p.val_split.source != p.selection_split.source  # reported rows: another file
    es = p.selection_info["early_stop_row_ids"]
    assert len(es) == 32 and set(es) <= sel
    # the early-stopping rows are the selection rows' texts and labels, not validation's
    by_id = {e.id: e for e in full.examples}
    assert p.early_stop.labels.tolist() == [by_id[i].label for i in es]
    counts = np.bincount(full.labels)
    got = p.selection_info["label_counts"]
    assert abs(got["0"] / 256 - counts[0] / len(full)) < 1 / 256 + 1e-9  # stratified
    stats = p.stats()["selection"]
    assert stats["protocol"] == "train_slice" and stats["split"] == "train"
    assert stats["row_ids"] == sorted(sel) and stats["search_eval_rows"] == 48

    # the published protocol: validation selects and is reported
    pv = prepare_task(replace(cfg, data=replace(cfg.data, selection="validation")), "rte",
                      tiny_base.tokenizer)
    assert pv.selection_split is pv.val_split and len(pv.train_split) == len(full)
    assert pv.stats()["selection"]["split"] == "validation"


def test_a_search_seed_that_is_a_training_seed_is_an_error():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["seeds=[42, 7]", "search.seed=7"])
    assert e.value.key == "search.seed"
    assert str(e.value).startswith("search.seed: 7 is also a training seed (seeds: [42, 7]); "
                                   "the model trained with it would replay a search trial")
    load_config(overrides=["search.enabled=false", "seeds=[42, 7]", "search.seed=7"])
    assert StudyConfig().search.seed not in StudyConfig().seeds


def test_early_stopping_evaluates_several_times_per_epoch_and_records_its_stop(tiny_base):
    """64 rows, batch 4: 16 steps per epoch; 4 evaluations per epoch = every 4 steps. The
    selection rows' labels are the training labels flipped, so the selection loss rises
    as training fits: patience 3 stops training after the 4th evaluation (step 16) and the
    first evaluation's state (step 4) is restored."""
    g = torch.Generator().manual_seed(0)
    from loralens.training.batches import Encoded

    ids = [torch.randint(3, 200, (int(n),), generator=g).tolist() for n in
           torch.randint(4, 12, (64,), generator=g)]
    labels = np.array([i % 2 for i in range(64)])
    train = Encoded(ids, labels, np.arange(64))
    flipped = Encoded(ids[:16], 1 - labels[:16], np.arange(16))
    tc = replace(StudyConfig().train, epochs=3, batch_size=4, warmup_ratio=0.0, lr=3e-3,
                 patience=3, evals_per_epoch=4, eval_every=0)
    torch.manual_seed(0)
    model = apply_method(build_classifier(tiny_base.backbone(), 2, 0), "full", StudyConfig())
    res = fit(model, train, flipped, tiny_base.tokenizer.pad_token_id, tc, 3e-3, seed=0,
              progress=False)
    steps = [h["step"] for h in res.history]
    assert res.eval_every == 4
    assert steps == [4 * k for k in range(1, len(steps) + 1)]   # 4 times per epoch
    assert res.stopped_early and res.stopped_step == steps[-1] < 48
    losses = [h["val_loss"] for h in res.history]
    best = int(np.argmin(losses))
    assert res.best_step == steps[best]
    assert len(steps) - 1 - best == 3                            # patience 3 ran out
    assert [h["eval"] for h in res.history] == list(range(1, len(steps) + 1))


# --------------------------------------------------------------------------- the poison test

