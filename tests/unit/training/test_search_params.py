"""``search.params``: a search over some dimensions of the space, the others held at the
config's values (the quick preset's learning-rate search searches ``lr`` alone), and the
rows trials train on. Expected values are written out from core/config.py's defaults."""

from __future__ import annotations

import pytest

from loralens.core.config_load import load_config
from loralens.core.errors import ConfigError
from loralens.core.protocol import cadence_text, config_differences
from loralens.training.search import space, trial_bounds, trial_config


def test_params_keep_only_the_named_dimensions():
    cfg = load_config("paper", overrides={"search": {"params": ["lr"],
                                                     "lr_lora": [1e-4, 1e-2]}})
    assert space("lora", cfg) == {"lr": ("loguniform", 1e-4, 1e-2)}
    assert space("full", cfg) == {"lr": ("loguniform", 1e-6, 5e-5)}
    # a dimension of one method's space only (LoRA's alpha) is fine for the other
    both = load_config("paper", overrides={"search": {"params": ["lr", "alpha"]}})
    assert sorted(space("lora", both)) == ["alpha", "lr"]
    assert sorted(space("full", both)) == ["lr"]
    # empty: the whole space, as before
    whole = load_config("paper")
    assert sorted(space("lora", whole)) == ["alpha", "batch_size", "dropout", "epochs", "lr",
                                            "warmup_ratio", "weight_decay"]


def test_an_unknown_dimension_is_named_with_the_known_ones():
    cfg = load_config("paper", overrides={"search": {"params": ["lr", "rank"]}})
    with pytest.raises(ConfigError) as e:
        space("lora", cfg)
    assert str(e.value).startswith(
        "search.params: 'rank' is not a dimension of the search space of lora, full; known: "
        "alpha, batch_size, dropout, epochs, lr, warmup_ratio, weight_decay")
    with pytest.raises(ConfigError, match=r"search.params: a dimension is named twice"):
        load_config("paper", overrides={"search": {"params": ["lr", "lr"]}})


def test_bounds_come_from_the_config_where_a_dimension_is_not_searched():
    cfg = load_config("paper", overrides={"train": {"epochs": 1, "batch_size": 16}})
    # the paper's space: epochs [2, 3, 4], LoRA batch [4, 8, 16], full batch [1, 2, 4]
    assert trial_bounds(cfg, "lora") == (4, 4) and trial_bounds(cfg, "full") == (4, 1)
    lr_only = load_config("paper", overrides={"train": {"epochs": 1, "batch_size": 16},
                                              "search": {"params": ["lr"]}})
    assert trial_bounds(lr_only, "lora") == (1, 16) and trial_bounds(lr_only, "full") == (1, 16)


def test_trials_train_on_the_data_rows_unless_search_train_size_is_set():
    cfg = load_config("paper", overrides={"data": {"train_size": 384,
                                                   "train_size_per_task": {"sst2": 1152}}})
    assert trial_config(cfg) is cfg  # the trained models' rows, SST-2's own count kept
    small = load_config("paper", overrides={"data": {"train_size": 384,
                                                     "train_size_per_task": {"sst2": 1152}},
                                            "search": {"train_size": 64}})
    t = trial_config(small)
    assert t.data.train_size == 64 and t.data.train_size_per_task == {}


def test_unsearched_keys_stay_differences_and_the_cadence_names_train_epochs():
    over = {"train": {"batch_size": 32, "lr_lora": 2e-3}}
    whole = load_config("paper", overrides=over)
    assert [k for k, _ in config_differences(whole)] == []  # both replaced by the search
    lr_only = load_config("paper", overrides={**over, "search": {"params": ["lr"]}})
    assert [k for k, _ in config_differences(lr_only)] == ["train.batch_size",
                                                           "search.params"]
    cadence = load_config("paper", overrides={"train": {"epochs": 1, "evals_per_epoch": 2},
                                              "search": {"params": ["lr"]}})
    assert cadence_text(cadence).startswith(
        "evaluated 2 times per epoch with patience 3: 2 evaluations over 1 epoch "
        "(train.epochs), so patience cannot act")


def test_searches_tells_whether_a_dimension_varies():
    lr_only = load_config("paper", overrides={"search": {"params": ["lr"]}}).search
    assert lr_only.searches("lr") and lr_only.searches("epochs", "lr")
    assert not lr_only.searches("epochs") and not lr_only.searches("epochs", "batch_size")
    whole = load_config("paper").search
    assert whole.searches("epochs") and whole.searches("anything")  # [] = every dimension
    off = load_config("paper", overrides={"search": {"enabled": False}}).search
    assert not off.searches("lr")


def test_each_dimension_of_a_space_goes_to_the_section_searched_by_names():
    """The routing of trial values (params_to_overrides) agrees with core.config.SEARCHED_BY
    for every dimension of the built-in spaces: LoRA's alpha/dropout to lora.*, the rest
    to train.*."""
    from loralens.core.config import SEARCHED_BY
    from loralens.training.search import LORA_SPACE, SPACES, params_to_overrides

    dims = {"lr", "batch_size", "epochs", *LORA_SPACE, *(k for s in SPACES.values() for k in s)}
    assert dims == set(SEARCHED_BY)
    for d in dims:
        out = params_to_overrides({d: 1}, "lora")
        section = next(s for s, v in out.items() if d in v)
        assert SEARCHED_BY[d][0] == f"{section}.{d}"
