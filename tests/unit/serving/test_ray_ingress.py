"""The Ray Serve ingress's own logic, without Ray: its registry of adapters (POST and DELETE
/v1/adapters checked with the one-process server's rules and messages, the adapter root
included), the API key it checks (same 401s and exemptions as the one-process server, and
only a salted digest of the key in what is pickled into Ray), and the hand-off from
``loralens serve --ray-replicas``."""

from __future__ import annotations

import argparse
import asyncio
import pickle

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from loralens.serving import add_serve_arguments
from loralens.serving.auth import ApiKey
from loralens.serving.backends import AdapterInfo
from loralens.serving.bodies import BodyLimit, RequestError
from loralens.serving.auth import KeyDigest
from loralens.serving.ray_serve import Registry, Ticket, guard
from loralens.serving.sources import AdapterSpec
from tests.helpers.adapters import random_adapter

KEY = "s3cret-key-for-the-ingress"
GIVEN = [AdapterInfo("cli", "/elsewhere/cli", 2, "sst2", ("negative", "positive"))]


def run(coro):
    return asyncio.run(coro)


def error_of(coro) -> tuple[int, str]:
    with pytest.raises(RequestError) as e:
        run(coro)
    return e.value.status, e.value.message


@pytest.fixture
def root(tiny_backbone, tmp_path):
    """root/good: a 2-label adapter; root/three: a 3-label one; outside/secret: outside."""
    random_adapter(tiny_backbone, 0, tmp_path / "root" / "good")
    random_adapter(tiny_backbone, 1, tmp_path / "root" / "three", num_labels=3)
    random_adapter(tiny_backbone, 2, tmp_path / "outside" / "secret")
    return tmp_path / "root"


def test_adding_an_adapter_registers_it_with_a_fresh_token(root):
    reg = Registry(GIVEN, str(root))
    info = run(reg.add(AdapterSpec("new", root / "good", "sst2")))
    assert info.to_dict() == {"name": "new", "source": str(root / "good"), "num_labels": 2,
                              "task": "sst2", "label_names": ["negative", "positive"]}
    ticket = reg.ticket("new")
    assert ticket == Ticket("new", str(root / "good"), "sst2", ("negative", "positive"),
                            ticket.token)
    assert len(ticket.token) == 32 and ticket.token != reg.ticket("cli").token
    # removed and added again: the replicas must see another registration
    assert run(reg.remove("new")) == ticket.token
    run(reg.add(AdapterSpec("new", root / "good", "sst2")))
    assert reg.ticket("new").token not in (ticket.token, reg.ticket("cli").token)


def test_the_one_process_servers_errors_and_messages(root, tmp_path):
    reg = Registry(GIVEN, str(root))
    resolved = str(root.resolve())
    secret = str(tmp_path / "outside" / "secret")
    assert error_of(reg.add(AdapterSpec("x", tmp_path / "outside" / "secret"))) == (
        403, (f"path {secret!r} is outside the server's adapter root {resolved!r} "
              "(--adapter-root)"))
    assert error_of(reg.add(AdapterSpec("bad name", root / "good"))) == (
        422, ("adapter name 'bad name': use letters, digits and _ . @ + - "
              "(at most 128 characters)"))
    assert error_of(reg.add(AdapterSpec("cli", root / "good"))) == (
        409, "adapter 'cli' is already loaded; remove it first")
    status, message = error_of(reg.add(AdapterSpec("three", root / "three", "sst2")))
    assert status == 422 and message.endswith("head has 3 labels but task 'sst2' has 2")
    status, message = error_of(reg.add(AdapterSpec("empty", root)))  # no adapter_config.json
    assert status == 422 and "not a PEFT adapter directory" in message
    assert error_of(reg.add(AdapterSpec("t", root / "good", "no-such-task")))[0] == 422
    assert error_of(reg.remove("nope")) == (404, "unknown adapter 'nope'; loaded: cli")
    with pytest.raises(RequestError) as e:
        reg.ticket("nope", "model")
    assert (e.value.status, e.value.message) == (404, "unknown model 'nope'; loaded: cli")
    assert list(reg.infos) == ["cli"]  # nothing failed half-way


def test_no_root_no_paths_and_outside_paths_are_never_read(root, tmp_path, monkeypatch):
    from loralens.serving import runtime

    reads = []
    real = runtime.LoraAdapter.from_dir
    monkeypatch.setattr(runtime.LoraAdapter, "from_dir",
                        staticmethod(lambda path: reads.append(path) or real(path)))
    assert error_of(Registry(GIVEN).add(AdapterSpec("x", root / "good"))) == (
        403, ("this server takes no adapter paths over HTTP: start it with --adapter-root "
              "DIR to allow adapters below DIR"))
    reg = Registry(GIVEN, str(root))
    assert error_of(reg.add(AdapterSpec("x", tmp_path / "outside" / "secret")))[0] == 403
    assert error_of(reg.add(AdapterSpec("y", root / ".." / "outside" / "secret")))[0] == 403
    assert reads == []
    run(reg.add(AdapterSpec("ok", root / "good")))
    assert reads == [root / "good"]


def _app(key, public_metrics=False):
    app = FastAPI()
    app.add_middleware(BodyLimit, limit=100)
    guard(app, key, public_metrics)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return {"m": 1}

    @app.post("/v1/adapters")
    async def add(request: Request):
        await request.body()
        return {"added": True}

    return app


def test_the_key_guards_every_path_but_health_as_the_one_process_server():
    digest = KeyDigest(ApiKey(KEY))
    with TestClient(_app(digest)) as client:
        assert client.get("/health").status_code == 200  # open
        r = client.get("/metrics")
        assert (r.status_code, r.json()) == (401, {"error": "missing API key: send the header "
                                                            "'Authorization: Bearer <key>'"})
        assert r.headers["www-authenticate"] == 'Bearer realm="loralens"'
        r = client.post("/v1/adapters", json={}, headers={"Authorization": "Bearer wrong"})
        assert (r.status_code, r.json()) == (401, {"error": "wrong API key"})
        # 401 before the body limit's 413: the key is checked before the body is read
        r = client.post("/v1/adapters", content=b"x" * 1000)
        assert r.status_code == 401
        ok = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/metrics", headers=ok).status_code == 200
        assert client.post("/v1/adapters", json={}, headers=ok).json() == {"added": True}
        assert client.post("/v1/adapters", content=b"x" * 1000, headers=ok).status_code == 413
        schema = client.get("/openapi.json", headers=ok).json()
        assert schema["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]
        assert "security" not in schema["paths"]["/health"]["get"]
    with TestClient(_app(digest, public_metrics=True)) as client:
        assert client.get("/metrics").status_code == 200
        assert client.post("/v1/adapters", json={}).status_code == 401
    with TestClient(_app(None)) as client:  # no key: no authentication
        assert client.post("/v1/adapters", json={}).status_code == 200


def test_what_ray_is_given_holds_a_digest_never_the_key():
    digest = KeyDigest(ApiKey(KEY))
    assert digest.matches(KEY.encode())
    assert not digest.matches(b"wrong") and not digest.matches(KEY.encode() + b" ")
    assert KEY not in repr(digest) and KEY not in str(digest)
    blob = pickle.dumps(digest)
    assert KEY.encode() not in blob
    assert pickle.loads(blob).matches(KEY.encode())  # and it still checks after the trip
    # two digests of one key differ (each its own salt): no table of digests helps
    assert pickle.dumps(KeyDigest(ApiKey(KEY))) != blob


def test_serve_ray_replicas_takes_the_key_and_the_adapter_root(monkeypatch, tmp_path):
    """``loralens serve RUN --ray-replicas 2`` with $LORALENS_API_KEY: the configuration
    handed to Ray holds the key's digest (not the key) and the run directory as the adapter
    root, as the one-process server takes them."""
    from loralens.serving import ray_serve, server, sources

    pytest.importorskip("ray.serve")
    started = []
    monkeypatch.setattr(sources, "served", lambda *a: sources.Served([], tmp_path, None, 64))
    monkeypatch.setattr(server, "base_model_config", lambda *a: "the base")
    monkeypatch.setattr(ray_serve, "serve_replicas", lambda cfg, host, port:
                        started.append((cfg, host, port)))
    monkeypatch.setenv("LORALENS_API_KEY", KEY)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert ray_serve.cli_command(parser.parse_args([str(tmp_path), "--ray-replicas", "2",
                                                    "--public-metrics"])) == 0
    (cfg, host, port), = started
    assert (host, port, cfg.replicas) == ("127.0.0.1", 8000, 2)
    assert cfg.adapter_root == str(tmp_path) and cfg.public_metrics is True
    assert isinstance(cfg.api_key, KeyDigest) and cfg.api_key.matches(KEY.encode())
    assert KEY.encode() not in pickle.dumps(cfg)
    monkeypatch.delenv("LORALENS_API_KEY")
    started.clear()
    ray_serve.cli_command(parser.parse_args([str(tmp_path), "--ray-replicas", "2",
                                             "--adapter-root", "/adapters"]))
    assert started[0][0].api_key is None and started[0][0].adapter_root == "/adapters"


def test_a_replica_takes_a_batch_of_requests_unless_told_otherwise(monkeypatch, tmp_path):
    """Ray's max_ongoing_requests per replica: --max-batch by default (Ray's own 5 capped a
    replica's batches at 5 requests), --ray-max-ongoing when given; the flag without
    --ray-replicas, or below 1, is refused before any model loads."""
    from loralens.core.errors import ConfigError
    from loralens.serving import ray_serve, server, sources

    pytest.importorskip("ray.serve")
    started = []
    monkeypatch.setattr(sources, "served", lambda *a: sources.Served([], tmp_path, None, 64))
    monkeypatch.setattr(server, "base_model_config", lambda *a: "the base")
    monkeypatch.setattr(ray_serve, "serve_replicas", lambda cfg, host, port: started.append(cfg))
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)

    def ongoing(*argv):
        ray_serve.cli_command(parser.parse_args([str(tmp_path), "--ray-replicas", "2", *argv]))
        return started.pop().replica_max_ongoing

    assert ongoing() == 32                                   # the server's default batch
    assert ongoing("--max-batch", "8") == 8
    assert ongoing("--max-batch", "8", "--ray-max-ongoing", "3") == 3
    with pytest.raises(ConfigError, match=r"^--ray-max-ongoing: expected at least 1, got 0$"):
        ongoing("--ray-max-ongoing", "0")
    monkeypatch.setattr(server, "load_base", lambda mc: pytest.fail("the model loaded"))
    with pytest.raises(ConfigError, match=r"--ray-max-ongoing .* it needs --ray-replicas$"):
        server.cli_command(parser.parse_args([str(tmp_path), "--ray-max-ongoing", "3"]))
