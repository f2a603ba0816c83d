"""``--push-to-hub``'s repository names and token (the upload itself:
tests/integration/test_push_to_hub.py, against a recording stand-in for the Hub)."""

from __future__ import annotations

import pytest

from loralens.export.hub import HubError, hub_token, repo_ids

ART = [{"task": "rte", "method": "lora", "seed": 42}, {"task": "sst2", "method": "full",
                                                       "seed": 1337}]


def test_one_artifact_goes_to_the_repo_several_to_suffixed_repos():
    assert repo_ids("org/name", ART[:1]) == ["org/name"]
    assert repo_ids("org/name", ART) == ["org/name-rte-lora-seed42", "org/name-sst2-full-seed1337"]


@pytest.mark.parametrize("bad", ["name", "org/", "/name", "org/a/b", "org/na me", ""])
def test_a_repo_that_is_not_org_slash_name_is_refused(bad):
    with pytest.raises(HubError, match="expected ORG/NAME"):
        repo_ids(bad, ART[:1])


def test_the_token_comes_from_the_environment(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubError, match="set HF_TOKEN"):
        hub_token()
    monkeypatch.setenv("HF_TOKEN", "hf_abc")
    assert hub_token() == "hf_abc"
