"""The three serving backends (ours, PEFT, merged) answer alike, on a tiny random Llama."""

from __future__ import annotations

import copy

import pytest
import torch

from loralens.training import batches as B
from loralens.serving.backends import AdapterError, AdapterInfo, make_backend
from loralens.serving.loadtest import LoadTestError, choose_task
from loralens.serving.sources import AdapterSpec, collect_adapters, replicate
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json

from tests.helpers.adapters import random_adapter

TOL = 1e-5


@pytest.fixture
def adapters(tiny_backbone, tmp_path):
    out = {}
    for i, name in enumerate(["a", "b", "c"]):
        out[name] = (tmp_path / name, random_adapter(tiny_backbone, i, tmp_path / name))
    return out


def _batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = [3, 7, 5, 2, 6, 4][:n]
    rows = [torch.randint(5, 1000, (k,), generator=g).tolist() for k in lens]
    return B.collate(rows, pad_id=0)


@pytest.mark.parametrize("kind", ["ours", "peft", "merged"])
def test_backend_equals_separate_peft_models(kind, tiny_backbone, adapters):
    be = make_backend(kind, copy.deepcopy(tiny_backbone))
    for name, (path, _) in adapters.items():
        be.add(AdapterInfo(name, str(path), 0), path)
    ids, mask = _batch(6)
    names = ["a", "b", "c", "b", "a", "c"]
    with torch.no_grad():
        mixed = be.infer(ids, mask, names)
        for i, n in enumerate(names):
            ref = adapters[n][1](input_ids=ids, attention_mask=mask).logits[i]
            assert (mixed[i] - ref).abs().max().item() <= TOL, (kind, i, n)
        for n in adapters:  # one adapter for the whole batch
            ref = adapters[n][1](input_ids=ids, attention_mask=mask).logits
            assert (be.infer(ids, mask, [n] * 6) - ref).abs().max().item() <= TOL
    # removal: the others keep answering the same; the removed one is gone
    be.remove("b")
    assert be.names == ["a", "c"]
    with pytest.raises(KeyError):
        be.remove("b")
    with torch.no_grad():
        out = be.infer(ids, mask, ["a", "c", "a", "c", "a", "c"])
        for i, n in enumerate(["a", "c", "a", "c", "a", "c"]):
            ref = adapters[n][1](input_ids=ids, attention_mask=mask).logits[i]
            assert (out[i] - ref).abs().max().item() <= TOL
    # and it can come back under the same name
    be.add(AdapterInfo("b", str(adapters["b"][0]), 0), adapters["b"][0])
    with torch.no_grad():
        ref = adapters["b"][1](input_ids=ids, attention_mask=mask).logits
        assert (be.infer(ids, mask, ["b"] * 6) - ref).abs().max().item() <= TOL


def test_backend_add_errors(tiny_backbone, adapters, tmp_path):
    be = make_backend("ours", copy.deepcopy(tiny_backbone))
    path = adapters["a"][0]
    be.add(AdapterInfo("a", str(path), 0), path)
    with pytest.raises(AdapterError, match="already loaded"):
        be.add(AdapterInfo("a", str(path), 0), path)
    with pytest.raises(AdapterError, match="not a PEFT adapter directory"):
        be.add(AdapterInfo("x", str(tmp_path), 0), tmp_path)
    with pytest.raises(AdapterError, match="head has 2 labels but task .z. has 3"):
        be.add(AdapterInfo("y", str(path), 0, "z", ("p", "q", "r")), path)
    with pytest.raises(ValueError, match="unknown backend 'vllm'"):
        make_backend("vllm", tiny_backbone)
    # PEFT holds one head shape
    three = random_adapter(tiny_backbone, 7, tmp_path / "three", num_labels=3)
    assert three.base_model.model.score.modules_to_save["default"].out_features == 3
    pb = make_backend("peft", copy.deepcopy(tiny_backbone))
    pb.add(AdapterInfo("a", str(path), 0), path)
    with pytest.raises(AdapterError, match="one head shape"):
        pb.add(AdapterInfo("t", "", 0), tmp_path / "three")


def test_merged_backend_shares_untouched_weights(tiny_backbone, adapters):
    be = make_backend("merged", copy.deepcopy(tiny_backbone))
    for name, (path, _) in adapters.items():
        be.add(AdapterInfo(name, str(path), 0), path)
    ma, mb = be.models["a"].backbone, be.models["b"].backbone
    base = be.backbone
    assert ma.embed_tokens.weight is base.embed_tokens.weight
    assert ma.layers[0].mlp.up_proj.weight is mb.layers[0].mlp.up_proj.weight
    assert ma.layers[0].self_attn.k_proj.weight is base.layers[0].self_attn.k_proj.weight
    q = ma.layers[0].self_attn.q_proj.weight
    assert q is not base.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q, base.layers[0].self_attn.q_proj.weight)  # merged, not shared
    assert not torch.equal(q, mb.layers[0].self_attn.q_proj.weight)


def test_collect_adapters_names_and_errors(tmp_path, tiny_backbone):
    run = tmp_path / "run"
    rd = RunDir(run)
    (run / "config.yaml").parent.mkdir(parents=True)
    (run / "config.yaml").write_text("preset: smoke\n")
    with pytest.raises(AdapterError, match="run directory without trained LoRA adapters"):
        collect_adapters([str(run)])
    for task in ("sst2", "rte", "mrpc"):
        random_adapter(tiny_backbone, 1, rd.weights_dir(task, "lora", 42))
        if task != "mrpc":  # mrpc's job is not finished: its adapter is not served
            atomic_write_json(rd.metrics_path(task, "lora", 42), {})
    specs, run_dir = collect_adapters([str(run)])
    assert run_dir == run
    assert [(s.name, s.task) for s in specs] == [("rte-seed42", "rte"), ("sst2-seed42", "sst2")]
    one = rd.weights_dir("sst2", "lora", 42)
    specs, run_dir = collect_adapters([f"mine={one}"])
    assert (specs[0].name, specs[0].task, run_dir) == ("mine", "sst2", None)
    with pytest.raises(AdapterError, match="two adapters named 'sst2-seed42'"):
        collect_adapters([str(one), str(one)])
    with pytest.raises(AdapterError, match=f"{tmp_path}: neither a run directory"):
        collect_adapters([str(tmp_path)])
    with pytest.raises(AdapterError, match="adapter name 'a b'"):
        collect_adapters([f"a b={one}"])
    more = replicate([AdapterSpec("x", one), AdapterSpec("y", one)], 5)
    assert [s.name for s in more] == ["x", "y", "x@2", "y@2", "x@3"]


def test_choose_task_keeps_one_task():
    specs = [AdapterSpec("r1", "x", "rte"), AdapterSpec("s1", "x", "sst2"),
             AdapterSpec("s2", "x", "sst2"), AdapterSpec("u", "x", None)]
    task, chosen = choose_task(specs)
    assert (task, [s.name for s in chosen]) == ("sst2", ["s1", "s2"])
    assert [s.name for s in choose_task(specs, "rte")[1]] == ["r1"]
    assert choose_task(specs[:2])[0] == "rte"  # a tie: the first given
    with pytest.raises(LoadTestError, match="no adapter of task 'mrpc'; have rte, sst2"):
        choose_task(specs, "mrpc")
    with pytest.raises(LoadTestError, match="no adapter with a known task"):
        choose_task(specs[3:])


def test_serve_uses_the_runs_model_revision(tmp_path, serve):
    """``loralens serve RUN_DIR`` loads the base through models.load_base with the run's
    model section (revision, trust_remote_code); --model naming another model drops it."""
    import argparse

    from loralens.study.config import load_config
    from loralens.serving import add_serve_arguments, server

    run = RunDir(tmp_path / "run")
    run.bind_config(load_config(overrides=["model.revision=abc123"]))
    adapter = run.weights_dir("sst2", "lora", 1)
    adapter.mkdir(parents=True)
    atomic_write_json(run.metrics_path("sst2", "lora", 1), {})
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    mc = serve(run.root)
    assert (mc.name, mc.revision) == ("smollm2-135m", "abc123")
    args = parser.parse_args([str(run.root), "--model", "other/model"])
    assert server.base_model_config(args, run.load_config()).revision is None
    args = parser.parse_args([str(run.root), "--revision", "v2", "--trust-remote-code"])
    mc = server.base_model_config(args, run.load_config())
    assert (mc.name, mc.revision, mc.trust_remote_code) == ("smollm2-135m", "v2", True)


def test_json_bodies_whatever_the_content_type(tiny_backbone, adapters):
    """``curl -d`` sends application/x-www-form-urlencoded: the body is still JSON."""
    import json

    from fastapi.testclient import TestClient

    from loralens.serving.server import Service, create_app

    class Tok:
        pad_token_id = 0

    be = make_backend("ours", copy.deepcopy(tiny_backbone))
    be.add(AdapterInfo("a", str(adapters["a"][0]), 0), adapters["a"][0])
    service = Service(be, Tok(), 16)
    service.encode = lambda info, texts, pairs: [[5, 6, 7]] * len(texts or pairs)
    form = {"content-type": "application/x-www-form-urlencoded"}
    body = json.dumps({"adapter": "a", "texts": ["x", "y"]})
    with TestClient(create_app(service)) as client:
        want = client.post("/v1/classify", json={"adapter": "a", "texts": ["x", "y"]})
        got = client.post("/v1/classify", content=body, headers=form)
        assert want.status_code == got.status_code == 200, got.text
        assert got.json() == want.json()
        bad = client.post("/v1/classify", content=b"adapter=a&texts=x", headers=form)
        assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]
        wrong = client.post("/v1/classify", content=json.dumps({"adapter": "a"}), headers=form)
        assert wrong.status_code == 422 and "exactly one" in wrong.json()["error"]
        empty = client.post("/v1/classify", content=b"", headers=form)
        assert empty.status_code == 422 and "body: Field required" in empty.json()["error"]
        schema = client.get("/openapi.json").json()["paths"]["/v1/classify"]["post"]
        assert "adapter" in schema["requestBody"]["content"]["application/json"]["schema"][
            "properties"]


def test_an_adapter_of_another_base_is_refused_and_changes_nothing(tiny_backbone, adapters,
                                                                    tmp_path):
    """An adapter trained on a backbone of other shapes (here an MLP of width 48, not 64):
    its q_proj factors fit, its down_proj factors (48 -> 32) do not. The add is refused
    with a message naming the projection, before anything changes: the adapter already
    loaded answers as before, nothing is left of the refused one, and a later add works
    (the old runtime appended q_proj's factors before it found down_proj's, so every
    later adapter's factors sat one row off; the backend let the ValueError out as a 500)."""
    from transformers import AutoModel

    from loralens.models.tiny import tiny_llama_config
    from tests.helpers.adapters import random_lora

    other = AutoModel.from_config(tiny_llama_config(intermediate_size=48))
    bad = random_lora(other, tmp_path / "other", 5, targets=("q_proj", "down_proj"))
    be = make_backend("ours", copy.deepcopy(tiny_backbone))
    path_a = adapters["a"][0]
    be.add(AdapterInfo("a", str(path_a), 0), path_a)
    ids, mask = _batch(6)
    with torch.no_grad():
        before = be.infer(ids, mask, ["a"] * 6)
    with pytest.raises(AdapterError, match=r"other: LoRA factors of 'layers\.0\.mlp\.down_proj'"
                                           r", A \(8, 48\) and B \(32, 8\), do not fit the "
                                           r"backbone's 64 -> 32 projection"):
        be.add(AdapterInfo("bad", str(bad), 0), bad)
    assert be.names == ["a"]
    path_b = adapters["b"][0]
    be.add(AdapterInfo("b", str(path_b), 0), path_b)
    with torch.no_grad():
        assert torch.equal(be.infer(ids, mask, ["a"] * 6), before)
        ref = adapters["b"][1](input_ids=ids, attention_mask=mask).logits
        assert (be.infer(ids, mask, ["b"] * 6) - ref).abs().max().item() <= TOL
