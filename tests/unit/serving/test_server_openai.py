"""vLLM's and SGLang's classification API on ``loralens serve``: ``GET /v1/models`` lists the
adapters as models, ``POST /classify`` and ``POST /v1/classify`` take ``{"model", "input"}``
and answer in vLLM's shape, today's ``{"adapter", "texts"|"pairs"}`` keeps its own answer.

A fake backend (no model): a row of ``L`` tokens gets the logits ``[ln 21, ln L]``, so its
probabilities are ``[21/(21+L), L/(21+L)]``; the fake tokenizer gives one token per
character plus a BOS, so every expected value below is worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from loralens.serving.auth import ApiKey
from loralens.serving.backends import AdapterInfo
from loralens.serving.server import Service, create_app
from tests.helpers.serving import KEY

# What vLLM's example client (examples/pooling/classify/classification_online.py) sends:
# its headers, GET /v1/models, then its four prompts to /classify under data[0].id.
VLLM_HEADERS = {"accept": "application/json", "Content-Type": "application/json"}
VLLM_PROMPTS = ["Hello, my name is", "The president of the United States is",
                "The capital of France is", "The future of AI is"]


class FakeTokenizer:
    """One token per character (id = its code point) after a BOS (1); EOS 2, pad 0."""
    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


class FakeBackend:
    """The backend interface the service uses, without a model: logits from row lengths."""
    kind = "fake"

    def __init__(self, infos):
        self.infos = {i.name: i for i in infos}
        self.calls: list[list[str]] = []

    @property
    def names(self):
        return list(self.infos)

    def infer(self, input_ids, attention_mask, adapters):
        self.calls.append(list(adapters))
        lengths = attention_mask.sum(dim=1).double()
        return torch.stack([torch.full_like(lengths, math.log(21)), lengths.log()], dim=1)

    def remove(self, name):
        del self.infos[name]


def adapters():
    return [AdapterInfo("sst2-a", "/adapters/sst2-a", 2, "sst2", ("negative", "positive")),
            AdapterInfo("rte-a", "/adapters/rte-a", 2, "rte", ("entailment", "not_entailment")),
            AdapterInfo("bare", "/adapters/bare", 2)]  # no task: no label names


def make_service(max_texts=8):
    return Service(FakeBackend(adapters()), FakeTokenizer(), max_length=64, max_wait_ms=0,
                   max_texts=max_texts, base_name="smollm2-135m")


@pytest.fixture
def client():
    with TestClient(create_app(make_service())) as c:
        yield c


def p(length: int) -> list[float]:
    return [21 / (21 + length), length / (21 + length)]


def close(got, want) -> bool:
    return len(got) == len(want) and all(abs(a - b) < 1e-6 for a, b in zip(got, want))


def test_the_vllm_example_client_gets_its_answer(client):
    models = client.get("/v1/models", headers=VLLM_HEADERS)
    assert models.status_code == 200, models.text
    listed = models.json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["sst2-a", "rte-a", "bare"]
    first = listed["data"][0]
    assert {k: first[k] for k in ("object", "owned_by", "root", "parent", "max_model_len")} == {
        "object": "model", "owned_by": "loralens", "root": "/adapters/sst2-a",
        "parent": "smollm2-135m", "max_model_len": 64}
    assert isinstance(first["created"], int)

    model = listed["data"][0]["id"]
    r = client.post("/classify", headers=VLLM_HEADERS, json={"model": model,
                                                              "input": VLLM_PROMPTS})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"id", "object", "created", "model", "data", "usage"}
    assert out["id"].startswith("classify-") and len(out["id"]) == len("classify-") + 32
    assert out["object"] == "list" and out["model"] == "sst2-a"
    assert isinstance(out["created"], int)
    # 17, 37, 24 and 19 characters, each + a BOS: 18, 38, 25, 20 tokens
    lengths = [18, 38, 25, 20]
    assert [d["index"] for d in out["data"]] == [0, 1, 2, 3]
    assert [d["label"] for d in out["data"]] == ["negative", "positive", "positive", "negative"]
    assert [d["num_classes"] for d in out["data"]] == [2, 2, 2, 2]
    for d, n in zip(out["data"], lengths):
        assert close(d["probs"], p(n)), (d, n)
    assert out["usage"] == {"prompt_tokens": 101, "total_tokens": 101, "completion_tokens": 0}


def test_sglang_path_and_single_string_and_pairs(client):
    # SGLang posts the same body to /v1/classify; one string is one input
    r = client.post("/v1/classify", json={"model": "sst2-a", "input": "abc"})
    assert r.status_code == 200, r.text
    (d,) = r.json()["data"]
    assert d["label"] == "negative" and close(d["probs"], p(4))
    assert r.json()["usage"]["prompt_tokens"] == 4
    # a pair task: each item a two-string list; "ab" <eos> "cd" is 1 + 2 + 1 + 2 = 6 tokens
    r = client.post("/classify", json={"model": "rte-a", "input": [["ab", "cd"], ["x", "y"]]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [d["label"] for d in out["data"]] == ["entailment", "entailment"]
    assert close(out["data"][0]["probs"], p(6)) and close(out["data"][1]["probs"], p(4))
    assert out["usage"]["prompt_tokens"] == 10
    # an adapter without label names: transformers' LABEL_<i>
    r = client.post("/classify", json={"model": "bare", "input": ["x" * 29]})
    assert r.json()["data"][0]["label"] == "LABEL_1" and close(r.json()["data"][0]["probs"],
                                                                 p(30))


def test_todays_clients_keep_todays_shape(client):
    r = client.post("/v1/classify", json={"adapter": "sst2-a", "texts": ["abc", "x" * 29]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"adapter", "task", "labels", "label_names", "probabilities"}
    assert out["labels"] == [0, 1] and out["label_names"] == ["negative", "positive"]
    assert close(out["probabilities"][0], p(4)) and close(out["probabilities"][1], p(30))


@pytest.mark.parametrize("path", ["/classify", "/v1/classify"])
def test_wrong_input_names_the_field(client, path):
    # a pair task given strings, a single-sentence task given pairs
    for body, words in [({"model": "rte-a", "input": "a b"}, "classifies sentence pairs"),
                        ({"model": "rte-a", "input": ["a", "b"]}, "classifies sentence pairs"),
                        ({"model": "sst2-a", "input": [["a", "b"]]}, "classifies single sentences")]:
        r = client.post(path, json=body)
        assert r.status_code == 422, r.text
        assert r.json()["error"].startswith(f"input: model {body['model']!r} {words}"), r.text
    # schema errors: empty input, a three-string item, a mixed list, an unknown field
    for body, where in [({"model": "sst2-a", "input": []}, "input"),
                        ({"model": "rte-a", "input": [["a", "b", "c"]]}, "input"),
                        ({"model": "sst2-a", "input": ["a", ["b", "c"]]}, "input"),
                        ({"model": "sst2-a"}, "input"),
                        ({"model": "sst2-a", "input": "a", "priority": 1}, "priority")]:
        r = client.post(path, json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"].startswith(where), (body, r.text)
    r = client.post(path, json={"model": "nope", "input": "a"})
    assert r.status_code == 404
    assert r.json() == {"error": "unknown model 'nope'; loaded: sst2-a, rte-a, bare"}


def test_classify_refuses_todays_body_and_the_limit_applies():
    with TestClient(create_app(make_service(max_texts=2))) as c:
        r = c.post("/classify", json={"adapter": "sst2-a", "texts": ["a"]})
        assert r.status_code == 422 and "model" in r.json()["error"]
        r = c.post("/classify", json={"model": "sst2-a", "input": ["a", "b", "c"]})
        assert r.status_code == 413
        assert r.json() == {"error": "3 inputs in one request; the limit is 2"}


def test_the_schema_declares_both_shapes(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) >= {"/v1/models", "/classify", "/v1/classify"}
    body = paths["/v1/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert [set(s["required"]) for s in body["anyOf"]] == [{"adapter"}, {"model", "input"}]
    assert set(body["properties"]) == {"adapter", "texts", "pairs", "model", "input"}
    ok = paths["/v1/classify"]["post"]["responses"]["200"]["content"]["application/json"]
    refs = {s["$ref"].rsplit("/", 1)[1] for s in ok["schema"]["anyOf"]}
    assert refs == {"ClassifyOut", "OpenAIClassifyOut"}
    assert set(paths["/classify"]["post"]["responses"]) >= {"200", "404", "422", "413"}


def test_the_new_routes_need_the_key_and_are_counted():
    with TestClient(create_app(make_service(), api_key=ApiKey(KEY))) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.post("/classify", json={"model": "sst2-a", "input": "a"}).status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        assert c.get("/v1/models", headers=auth).status_code == 200
        assert c.post("/classify", headers=auth,
                      json={"model": "sst2-a", "input": ["a", "b"]}).status_code == 200
        assert c.post("/v1/classify", headers=auth,
                      json={"model": "rte-a", "input": "a"}).status_code == 422
        text = c.get("/metrics", headers=auth).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}

    def count(endpoint, method, status):
        return samples.get(("loralens_http_requests_total", (
            ("endpoint", endpoint), ("method", method), ("status", str(status)))), 0)

    assert count("/v1/models", "GET", 401) == 1 and count("/v1/models", "GET", 200) == 1
    assert count("/classify", "POST", 401) == 1 and count("/classify", "POST", 200) == 1
    assert count("/v1/classify", "POST", 422) == 1
    assert samples["loralens_adapter_rows_total", (("adapter", "sst2-a"),)] == 2
