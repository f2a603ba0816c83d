"""``loralens serve`` of bare adapter directories truncates where training did: without
``--max-length`` it takes the ``max_length`` that the adapters' model cards record (the
machine-readable block ``predict`` reads, issue 28.2), the largest when they differ, else 384;
``--max-length`` still wins."""

from __future__ import annotations

import logging

import pytest

from loralens.core.files import atomic_write_json
from loralens.models.cards import write_card
from loralens.serving.sources import AdapterSpec, recorded_max_length


def adapter(root, name, max_length=None):
    path = root / name
    path.mkdir(parents=True)
    atomic_write_json(path / "adapter_config.json", {"peft_type": "LORA", "r": 8,
                                                     "base_model_name_or_path": None})
    if max_length is not None:
        write_card(path, {"task": "rte", "method": "lora", "adapter": True,
                          "max_length": max_length})
    return path


def test_the_cards_max_length_is_read_the_largest_when_they_differ(tmp_path, caplog):
    a, b, c = adapter(tmp_path, "a", 128), adapter(tmp_path, "b", 256), adapter(tmp_path, "c")
    assert recorded_max_length([AdapterSpec("a", a)]) == 128
    assert recorded_max_length([AdapterSpec("c", c)]) is None  # no card
    with caplog.at_level(logging.WARNING, logger="loralens.serving.sources"):
        assert recorded_max_length([AdapterSpec(n, p) for n, p in
                                    (("a", a), ("b", b), ("c", c))]) == 256
    assert "a 128, b 256" in caplog.text and "--max-length" in caplog.text


@pytest.fixture
def served_max_length(serve_until):
    """Runs ``loralens serve ARGS`` up to building the service; returns its max_length."""
    return serve_until("build_service",
                       lambda specs, base, backend, max_length, *rest, **kw: max_length,
                       load_base=lambda mc: object())


def test_serve_takes_the_cards_max_length_unless_given(tmp_path, served_max_length):
    a = adapter(tmp_path, "a", 128)
    assert served_max_length(a) == 128
    assert served_max_length(a, "--max-length", "64") == 64
    assert served_max_length(adapter(tmp_path, "bare")) == 384  # no card: the default
