"""Where a bare adapter's base comes from (issue 28.2), the one function ``serve`` and
``predict`` share: ``--model``, then ``base_model_name_or_path`` where that directory exists,
then the base the model card records (its loralens model name where this loralens knows it,
else its hub id), each with the recorded revision."""

from __future__ import annotations

import json

import pytest

from loralens.models.adapter_base import BaseRef, adapter_base
from loralens.models.artifacts import ArtifactError
from loralens.models.cards import write_card


def adapter(tmp_path, recorded, card=None, name="a"):
    out = tmp_path / name
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": recorded}))
    if card is not None:
        write_card(out, {"task": "rte", "method": "lora", "adapter": True, **card})
    return out


def test_model_flag_comes_first(tmp_path):
    a = adapter(tmp_path, str(tmp_path), {"base": "smollm2-135m"})
    assert adapter_base(a, "org/other", "v2") == BaseRef("org/other", "v2", "--model")


def test_the_recorded_directory_where_it_exists(tmp_path):
    base = tmp_path / "converted"
    base.mkdir()
    a = adapter(tmp_path, str(base), {"base": "smollm2-135m"})
    assert adapter_base(a) == BaseRef(str(base), None, "base_model_name_or_path")


def test_a_missing_directory_falls_back_to_the_cards_registry_name(tmp_path):
    # another machine: the converted cache is elsewhere; the card's name re-converts the
    # same packaged Q4_1 file instead of loading the hub's (different) weights
    a = adapter(tmp_path, "/elsewhere/cache/smollm2", {"base": "smollm2-135m"})
    assert adapter_base(a) == BaseRef("smollm2-135m", None, "model card")


def test_a_missing_directory_falls_back_to_the_cards_hub_id_and_revision(tmp_path):
    a = adapter(tmp_path, "/elsewhere/org-model", {"base": "org/model", "base_revision": "r1"})
    assert adapter_base(a) == BaseRef("org/model", "r1", "model card")
    assert adapter_base(a, revision="r2") == BaseRef("org/model", "r2", "model card")


def test_a_recorded_hub_id_keeps_the_cards_revision(tmp_path):
    a = adapter(tmp_path, "org/model", {"base": "org/model", "base_revision": "r1"})
    assert adapter_base(a) == BaseRef("org/model", "r1", "base_model_name_or_path")


def test_a_missing_directory_without_a_card_is_an_error_naming_model(tmp_path):
    a = adapter(tmp_path, "/elsewhere/base")
    with pytest.raises(ArtifactError) as e:
        adapter_base(a)
    assert str(e.value) == (f"{a}: the adapter's base /elsewhere/base (base_model_name_or_path) "
                            "does not exist here and its model card names no hub id; give the "
                            "base with --model")


def test_nothing_recorded_is_none(tmp_path):
    assert adapter_base(adapter(tmp_path, None)) is None
