import dataclasses

import pytest

from loralens.core.errors import ConfigError

from loralens.core.config import StudyConfig, TrainConfig
from loralens.study.config import check_config, load_config
from loralens.core.config_load import parse_override, preset_names


def test_defaults_are_the_study():
    cfg = StudyConfig()
    assert cfg.tasks == ["mrpc", "sst2", "rte"]
    assert cfg.seeds == [42, 1337, 2024]
    assert cfg.lora.r == 8 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.max_grad_norm == 0.3 and cfg.train.patience == 3
    assert cfg.data.max_length == 384
    assert cfg.model.trust_remote_code is False


# What each preset resolves to (defaults + preset), written out as literals: the keys the
# preset sets, and the ones that keep a run comparable with the study (methods, LoRA
# rank and targets, accumulation, clipping, selection protocol, search seed, pruning)
# even where they equal the default. Every key not listed must resolve to the default.
# The paper preset has its own table (test_paper_preset.py).
_COMMON = {
    "methods": ["lora", "full"],
    "model.trust_remote_code": False,
    "lora.r": 8, "lora.alpha": 16.0, "lora.dropout": 0.05,
    "lora.target_modules": ["q_proj", "v_proj"],
    "data.selection": "train_slice", "data.subset_seed": 0,
    "train.lr": None, "train.grad_accum": 1, "train.max_steps": 0,
    "train.max_grad_norm": 0.3, "train.patience": 3, "train.precision": "auto",
    "train.weight_decay": 0.0, "train.optimizer_full": "adamw",
    "sanity.batch_size": 2, "sanity.loss_threshold": 0.1,
    "search.seed": 0, "search.prune": True,
}
PRESET_TABLES = {
    "smoke": {
        **_COMMON,
        "tasks": ["sst2"], "seeds": [42],
        "model.name": "smollm2-135m",
        "data.max_length": 128, "data.train_size": 64,
        "data.train_size_per_task": {"sst2": 480}, "data.early_stop_size": 64,
        "train.epochs": 1, "train.batch_size": 16, "train.lr_lora": 2e-3,
        "train.lr_full": 3e-5, "train.warmup_ratio": 0.1, "train.eval_batch_size": 32,
        "train.threads": 0, "train.evals_per_epoch": 2,
        "sanity.examples": 10, "sanity.epochs": 10, "sanity.lr_lora": 5e-3,
        "sanity.lr_full": 1e-4,
        "search.enabled": True, "search.trials": 1, "search.startup_trials": 1,
        "search.train_size": 32, "search.eval_size": 32, "search.epochs": [1],
        "search.batch_full": [8], "search.batch_lora": [4, 8, 16],
        "search.lr_full": [1e-6, 5e-5], "search.lr_lora": [5e-5, 5e-3],
        "extract.examples": 64, "weights.forgetting_examples": 16,
        "bench.requests": 10, "bench.warmup": 2, "bench.seeds": [], "bench.batch_sizes": [1],
        "bench.mixed_batch_size": 8, "bench.identity_examples": 8,
    },
    "quick": {
        **_COMMON,
        "tasks": ["mrpc", "sst2", "rte"], "seeds": [42, 1337, 2024],
        "model.name": "smollm2-135m",
        "data.max_length": 128, "data.train_size": 384,
        "data.train_size_per_task": {"sst2": 1152}, "data.early_stop_size": 64,
        "train.epochs": 1, "train.batch_size": 16, "train.lr_lora": 4.7e-3,
        "train.lr_full": 1.8e-4, "train.warmup_ratio": 0.1, "train.eval_batch_size": 32,
        "train.threads": 0, "train.evals_per_epoch": 2,
        "sanity.examples": 10, "sanity.epochs": 10, "sanity.lr_lora": 5e-3,
        "sanity.lr_full": 1e-4,
        "train.lr_head": 1e-3,
        "search.enabled": False, "search.params": ["lr"], "search.trials": 5,
        "search.startup_trials": 3, "search.eval_size": 128,
        "search.lr_full": [3e-6, 3e-4], "search.lr_lora": [1e-4, 1e-2],
        "extract.examples": 128,
        "bench.requests": 20, "bench.warmup": 3, "bench.seeds": [42], "bench.batch_sizes": [1],
        "bench.mixed_batch_size": 8,
    },
    "micro": {
        **_COMMON,
        "tasks": ["mrpc", "sst2", "rte"], "seeds": [42, 1337],
        "model.name": "tiny-random",
        "data.max_length": 256, "data.train_size": 16,
        "data.train_size_per_task": {}, "data.early_stop_size": 16,
        "train.epochs": 1, "train.batch_size": 8, "train.lr_lora": 1e-2,
        "train.lr_full": 1e-3, "train.warmup_ratio": 0.1, "train.eval_batch_size": 64,
        "train.threads": 1,
        "sanity.examples": 4, "sanity.epochs": 30, "sanity.lr_lora": 0.2,
        "sanity.lr_full": 1e-2,
        "search.enabled": True, "search.trials": 2, "search.startup_trials": 1,
        "search.train_size": 16, "search.eval_size": 16, "search.epochs": [1],
        "search.batch_full": [4], "search.batch_lora": [4],
        "search.lr_full": [1e-3, 1e-2], "search.lr_lora": [1e-2, 1e-1],
        "extract.examples": 16,
        "bench.requests": 4, "bench.warmup": 1, "bench.seeds": [], "bench.batch_sizes": [1],
        "bench.mixed_batch_size": 4,
    },
}


def _flat(d: dict) -> dict:
    """{"train": {"epochs": 1}} -> {"train.epochs": 1}: top-level mappings are sections;
    mappings inside a section are values (train_size_per_task) and stay whole."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def test_presets_are_exactly_the_tabled_ones():
    # a new preset must get a table here (or, like paper, a test file of its own:
    # ranks and ranks-paper in test_rank_sweep.py)
    assert preset_names() == ["micro", "paper", "quick", "ranks", "ranks-paper", "smoke"]
    assert set(PRESET_TABLES) == {"micro", "quick", "smoke"}


@pytest.mark.parametrize("name", sorted(PRESET_TABLES))
def test_every_preset_resolves_to_its_table(name):
    got = _flat(load_config(preset=name).to_dict())
    want = PRESET_TABLES[name]
    assert got["preset"] == name
    unknown = set(want) - set(got)
    assert not unknown, f"table keys the config does not have: {sorted(unknown)}"
    wrong = {k: (got[k], v) for k, v in want.items() if got[k] != v}
    assert not wrong, f"{name}: resolved (got, expected): {wrong}"
    # the types are the config's, not YAML's (5e-4 read as a string, 1 as an int)
    for k, v in want.items():
        assert type(got[k]) is type(v), f"{name}: {k} is {type(got[k]).__name__}"
    # nothing else moved away from the defaults
    defaults = _flat(StudyConfig().to_dict())
    moved = {k: got[k] for k in set(got) - set(want) - {"preset"} if got[k] != defaults[k]}
    assert not moved, f"{name}: keys off their default that the table does not list: {moved}"


def _as_config_value(v):
    # YAML 1.1 reads "5e-4" as a string; the config reads it as a number (parse_override).
    if isinstance(v, list):
        return [_as_config_value(x) for x in v]
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_documents_itself(name):
    """The header gives the command that runs it; every key says its type, its true
    default and its effect ("# int, default 384: ..."); entries of a mapping say why."""
    import re

    import yaml

    from loralens.core.config_load import preset_path

    text = preset_path(name).read_text()
    header = text[: text.index("\n" + next(l for l in text.splitlines()
                                          if l and not l.startswith("#")))]
    assert f"loralens run --preset {name}" in header
    defaults, section, keys = StudyConfig().to_dict(), None, 0
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^( *)(\w+):\s*([^#]*?)\s*(#.*)?$", line)
        if not m:
            continue
        indent, key, value, comment = m.groups()
        if not indent and not value and comment is None:  # a section: model, data, ...
            section = key
            continue
        where = f"{name}.yaml:{n}: {line.strip()}"
        if len(indent) > 2:  # an entry of a mapping (train_size_per_task)
            assert comment and comment.strip("# "), where
            continue
        doc = re.match(r"#\s*(\S.*?), default (.+?): \S", comment or "")
        assert doc, f"{where}: no '# type, default X: effect' comment"
        stated = re.sub(r"\s*\(.*\)$", "", doc.group(2))  # "null (all)" -> "null"
        default = (defaults if not indent else defaults[section])[key]
        assert _as_config_value(yaml.safe_load(stated)) == default, f"{where}: default"
        keys += 1
    assert keys > 0


def test_micro_preset_is_every_stage_on_the_tiny_random_model():
    cfg, default = load_config("micro"), StudyConfig()
    assert cfg.model.name == "tiny-random"
    assert cfg.tasks == default.tasks and cfg.methods == default.methods
    assert len(cfg.seeds) == 2  # the fewest paired statistics take
    assert cfg.search.enabled and cfg.search.trials == 2
    assert cfg.data.train_size == cfg.data.early_stop_size == 16
    assert cfg.search.train_size == cfg.search.eval_size == 16
    assert cfg.train.epochs == 1 and cfg.search.epochs == [1]
    assert cfg.extract.examples == 16
    assert cfg.bench.requests == 4 and cfg.bench.warmup == 1


def test_layering_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 7\n  batch_size: 4\n")
    cfg = load_config("smoke", f, ["train.epochs=9", "lora.target_modules=[q_proj,k_proj]"])
    assert cfg.train.epochs == 9            # override beats file
    assert cfg.train.batch_size == 4        # file beats preset
    assert cfg.data.max_length == 128       # preset beats default
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"unknown key 'train.warmup_ration'; did you mean train.warmup_ratio\?"):
        load_config(overrides=["train.warmup_ration=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; did you mean train\?"):
        load_config(overrides=["trian.lr=1"])


def test_wrong_type_and_range():
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer, got 'many'"):
        load_config(overrides=["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"lora.dropout: 1.5 is above the maximum 1.0"):
        load_config(overrides=["lora.dropout=1.5"])
    with pytest.raises(ConfigError, match=r"train.precision: 'fp8' is not one of"):
        load_config(overrides=["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"tasks: unknown task 'stsb'"):  # cola is built in
        load_config(overrides=["tasks=[stsb]"])
    with pytest.raises(ConfigError, match=r"expected true or false"):
        load_config(overrides=["model.trust_remote_code=yes please"])


def test_file_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("data:\n  max_lenght: 12\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'data.max_lenght'; did you mean data.max_length"):
        load_config(file=f)
    with pytest.raises(ConfigError, match=r"missing.yaml: config file not found"):
        load_config(file=tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'"):
        load_config(preset="nope")


def test_parse_override_numbers_and_null():
    assert parse_override("train.lr=1e-4") == {"train": {"lr": 1e-4}}
    assert parse_override("data.train_size=null") == {"data": {"train_size": None}}
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_override("train.lr")


def test_per_task_train_size():
    cfg = load_config(overrides=["data.train_size_per_task={sst2: 640, rte: 64}"])
    assert cfg.data.train_size_per_task == {"sst2": 640, "rte": 64}
    with pytest.raises(ConfigError, match=r"train_size_per_task: unknown task 'stsb'"):
        load_config(overrides=["data.train_size_per_task={stsb: 3}"])
    with pytest.raises(ConfigError, match=r"data.train_size_per_task.rte: 0 is below the minimum 1"):
        load_config(overrides=["data.train_size_per_task={rte: 0}"])


def test_learning_rate_ranges_feed_the_search_space():
    from loralens.training.search import space

    cfg = StudyConfig()  # the study's ranges are the defaults
    assert space("lora", cfg)["lr"] == ("loguniform", 5e-5, 5e-3)
    assert space("full", cfg)["lr"] == ("loguniform", 1e-6, 5e-5)
    quick = load_config("quick")
    assert space("lora", quick) == {"lr": ("loguniform", 1e-4, 1e-2)}  # search.params: [lr]
    assert space("full", quick) == {"lr": ("loguniform", 3e-6, 3e-4)}
    for bad in ("[0.001, 0.0001]", "[0.001]", "[0, 0.001]"):
        with pytest.raises(ConfigError, match=r"search.lr_lora: expected \[low, high\]"):
            load_config(overrides=[f"search.lr_lora={bad}"])


def test_configs_validate_where_they_are_built():
    with pytest.raises(ConfigError, match=r"train.epochs: 0 is below the minimum 1"):
        dataclasses.replace(StudyConfig().train, epochs=0)
    with pytest.raises(ConfigError, match=r"train.precision: 'fp8' is not one of"):
        TrainConfig(precision="fp8")
    # The registries (tasks, methods, stages) are the study layer's to check: a config is
    # built without them, and check_config names the bad key.
    assert dataclasses.replace(StudyConfig(), tasks=["stsb"]).tasks == ["stsb"]
    with pytest.raises(ConfigError, match=r"tasks: unknown task 'stsb'"):
        check_config(dataclasses.replace(StudyConfig(), tasks=["stsb"]))
    with pytest.raises(ConfigError, match=r"reference_method: unknown method 'nope'"):
        check_config(dataclasses.replace(StudyConfig(), reference_method="nope"))
    with pytest.raises(ConfigError, match=r"run.ray_resources: unknown stage 'trian'"):
        check_config(load_config(overrides=["run.ray_resources={trian: {num_cpus: 1}}"]))
    with pytest.raises(ConfigError, match=r"search.lr_lora: expected \[low, high\]"):
        dataclasses.replace(StudyConfig().search, lr_lora=[1e-3, 1e-4])
    with pytest.raises(ConfigError, match=r"train: expected a TrainConfig"):
        dataclasses.replace(StudyConfig(), train={"epochs": 2})
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


def test_flow_lists_of_exponent_numbers_are_numbers():
    cfg = load_config(overrides=["search.lr_lora=[1e-4, 1e-3]"])
    assert cfg.search.lr_lora == [1e-4, 1e-3]


def test_lr_head_is_optional_and_must_be_positive():
    assert StudyConfig().train.lr_head is None   # default: the method's own rate
    assert load_config(overrides=["train.lr_head=1e-3"]).train.lr_head == 1e-3
    with pytest.raises(ConfigError, match=r"train.lr_head: -1.0 is below the minimum 0.0") as e:
        load_config(overrides=["train.lr_head=-1"])
    assert e.value.key == "train.lr_head"
    with pytest.raises(ConfigError, match=r"train.lr_head: 0 would leave") as e:
        dataclasses.replace(TrainConfig(), lr_head=0.0)
    assert e.value.key == "train.lr_head"
