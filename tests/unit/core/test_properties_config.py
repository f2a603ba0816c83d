"""Property-based tests (Hypothesis) of the config layer: any YAML text, any YAML mapping
of the schema's keys and any ``key=value`` item gives a valid config or a ConfigError,
never another exception; a valid config survives the round trip through config.yaml."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loralens.core.errors import ConfigError

from loralens.core.config import StudyConfig
from loralens.study.config import config_from_dict, load_config
from tests.helpers.properties import examples

FAST = settings(max_examples=examples(150), deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def schema_keys(cls=StudyConfig, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out += schema_keys(tp, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


KEYS = schema_keys()
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["mrpc", "rte", "lora", "full",
                                                           "blocks", "1-3", "validation"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)
# keys of the schema (mostly), a typo now and then, and a non-string key
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + "x"),
                 st.text(max_size=8))


def nest(flat: dict) -> dict:
    out: dict = {}
    for dotted, v in flat.items():
        node = out
        parts = str(dotted).split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[parts[-1]] = v
    return out


def valid_or_config_error(build) -> StudyConfig | None:
    try:
        cfg = build()
    except ConfigError as e:
        assert str(e)  # a message, naming the key or the file
        return None
    assert isinstance(cfg, StudyConfig)
    # what the run directory stores reads back as the same config
    stored = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert config_from_dict(stored) == cfg
    return cfg


@FAST
@given(text=st.one_of(st.text(max_size=200),
                      st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
@example(text="search: {storage: [1, 2]}")
@example(text="- just\n- a list\n")
@example(text="train: {lr_lora: .nan}")
@example(text="? [a, b]\n: c\n")
def test_any_yaml_text_gives_a_config_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    valid_or_config_error(lambda: load_config(file=path))


@FAST
@given(data=st.binary(max_size=120))
@example(data=b"\xff\xfe\x00t\x00r\x00a\x00i\x00n\x00:")   # UTF-16: not this file's encoding
@example(data=b"train:\n  epochs: \x80\x81\n")
def test_any_bytes_as_config_file_give_a_config_or_a_config_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(data)
    valid_or_config_error(lambda: load_config(file=path))


@FAST
@given(flat=st.dictionaries(keys, values, max_size=5))
def test_any_mapping_of_schema_keys_gives_a_config_or_a_config_error(tmp_path_factory, flat):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(nest(flat)))
    valid_or_config_error(lambda: load_config(file=path))


@FAST
@given(key=keys, raw=st.one_of(st.text(max_size=30), values.map(
    lambda v: yaml.safe_dump(v, default_flow_style=True).strip())))
@example(key="train.lr_lora", raw=".nan")
@example(key="train.lr_lora", raw="-.inf")
@example(key="search.storage", raw="{a: 1}")
@example(key="seeds", raw="[1, [2]]")
def test_any_override_gives_a_config_or_a_config_error(key, raw):
    valid_or_config_error(lambda: load_config(overrides=[f"{key}={raw}"]))


@pytest.mark.parametrize("raw", [".nan", ".inf", "-.inf", "[1.0e-3, .nan]"])
def test_non_finite_numbers_are_config_errors(raw):
    """Found by the properties above: a NaN learning rate passed every check (NaN compares
    false with the minimum) and trained a model of NaNs."""
    key = "search.lr_lora" if raw.startswith("[") else "train.lr_lora"
    with pytest.raises(ConfigError, match=rf"{key}(\[1\])?: .* is not a finite number"):
        load_config(overrides=[f"{key}={raw}"])


def test_undecodable_config_file_is_a_config_error_naming_it(tmp_path):
    """Found by the properties above: a file in another encoding raised
    UnicodeDecodeError with a traceback."""
    path = tmp_path / "c.yaml"
    path.write_bytes("train:\n  epochs: 2 # für\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{path}: not UTF-8 text"):
        load_config(file=path)
    with pytest.raises(ConfigError, match=rf"{tmp_path}: cannot read the config file"):
        load_config(file=tmp_path)


def test_math_is_finite_guard_matches_schema_defaults():
    """Every float default of the schema is finite (the finite check rejects nothing that
    the defaults use)."""
    def floats(obj):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                yield from floats(v)
            elif isinstance(v, float):
                yield f.name, v
    assert all(math.isfinite(v) for _, v in floats(StudyConfig()))
