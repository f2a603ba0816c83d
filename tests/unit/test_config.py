import pytest

from loralens.config import ConfigError, StudyConfig, load_config, parse_override, preset_names


def test_defaults_are_the_study():
    cfg = StudyConfig()
    assert cfg.tasks == ["mrpc", "sst2", "rte"]
    assert cfg.seeds == [42, 1337, 2024]
    assert cfg.lora.r == 8 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.max_grad_norm == 0.3 and cfg.train.patience == 3
    assert cfg.data.max_length == 384
    assert cfg.model.trust_remote_code is False


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_validates(name):
    cfg = load_config(preset=name)
    assert cfg.preset == name


def test_presets_exist():
    assert {"smoke"} <= set(preset_names())


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
    with pytest.raises(ConfigError, match=r"tasks: unknown task 'cola'"):
        load_config(overrides=["tasks=[cola]"])
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
    with pytest.raises(ConfigError, match=r"train_size_per_task: unknown task 'cola'"):
        load_config(overrides=["data.train_size_per_task={cola: 3}"])
    with pytest.raises(ConfigError, match=r"data.train_size_per_task.rte: 0 is below the minimum 1"):
        load_config(overrides=["data.train_size_per_task={rte: 0}"])


def test_learning_rate_ranges_feed_the_search_space():
    from loralens.search import space

    cfg = StudyConfig()  # the study's ranges are the defaults
    assert space("lora", cfg)["lr"] == ("loguniform", 5e-5, 5e-3)
    assert space("full", cfg)["lr"] == ("loguniform", 1e-6, 5e-5)
    quick = load_config("quick")
    assert space("lora", quick)["lr"] == ("loguniform", 5e-4, 3e-3)
    assert space("full", quick)["lr"] == ("loguniform", 1e-5, 5e-5)
    for bad in ("[0.001, 0.0001]", "[0.001]", "[0, 0.001]"):
        with pytest.raises(ConfigError, match=r"search.lr_lora: expected \[low, high\]"):
            load_config(overrides=[f"search.lr_lora={bad}"])
