"""``loralens serve DIR...`` of bare adapter directories (no run directory) serves the base
the adapters record (``base_model_name_or_path``), not the default model (issue 28.7);
``--model`` still names another, and adapters recording different bases are refused."""

from __future__ import annotations

import pytest

from loralens.core.files import atomic_write_json
from loralens.serving.backends import AdapterError


def adapter_dir(root, name, base):
    path = root / name
    path.mkdir(parents=True)
    atomic_write_json(path / "adapter_config.json", {"peft_type": "LORA", "r": 8,
                                                     "base_model_name_or_path": base})
    return str(path)



def test_bare_adapters_serve_the_base_they_record(tmp_path, serve):
    base = tmp_path / "models" / "tinyllama-converted"
    base.mkdir(parents=True)  # the recorded directory is used where it exists (issue 28.2)
    a = adapter_dir(tmp_path, "a", str(base))
    b = adapter_dir(tmp_path, "b", str(base))
    assert serve(a, b).name == str(base)


def test_a_recorded_directory_missing_here_falls_back_to_the_cards_base(tmp_path, serve):
    from loralens.models.cards import write_card

    a = adapter_dir(tmp_path, "a", "/elsewhere/converted")
    write_card(tmp_path / "a", {"task": "rte", "method": "lora", "adapter": True,
                                "base": "org/model", "base_revision": "r1"})
    mc = serve(a)
    assert (mc.name, mc.revision) == ("org/model", "r1")
    b = adapter_dir(tmp_path, "b", "/elsewhere/converted")  # no card: nothing to fall back on
    with pytest.raises(AdapterError, match="does not exist here .* give the base with --model"):
        serve(b)


def test_model_flag_overrides_what_the_adapters_record(tmp_path, serve):
    a = adapter_dir(tmp_path, "a", "/models/tinyllama-converted")
    mc = serve(a, "--model", "smollm2-135m", "--revision", "v2")
    assert (mc.name, mc.revision) == ("smollm2-135m", "v2")


def test_an_adapter_without_a_recorded_base_gets_the_default_model(tmp_path, serve):
    a = adapter_dir(tmp_path, "a", None)
    assert serve(a).name == "smollm2-135m"


def test_adapters_recording_different_bases_are_refused(tmp_path, serve):
    a = adapter_dir(tmp_path, "a", "org/base-one")
    b = adapter_dir(tmp_path, "b", "org/base-two")
    with pytest.raises(AdapterError) as e:
        serve(a, b)
    assert str(e.value) == ("the adapters record different base models: org/base-one (a); "
                            "org/base-two (b); one server serves one base: name it with --model")
