"""POST /v1/adapters reads no file outside the server's adapter root: a path below it
loads, a path outside it (absolute, relative with "..", or a symbolic link inside the root
that points out of it) is a 403 naming the root, and a server started without a root takes
no adapter paths over HTTP at all. Adapters named on the command line load from anywhere."""

from __future__ import annotations

import argparse
import copy
import os

import pytest
from fastapi.testclient import TestClient

from loralens.serving import add_serve_arguments
from loralens.serving.backends import AdapterInfo, make_backend
from loralens.serving.server import Service, create_app
from tests.helpers.adapters import random_adapter


class Tok:
    pad_token_id = 0


@pytest.fixture
def layout(tiny_backbone, tmp_path):
    """root/inside (an adapter), outside/secret (an adapter outside the root), and
    root/link -> outside/secret."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    random_adapter(tiny_backbone, 0, root / "inside")
    random_adapter(tiny_backbone, 1, outside / "secret")
    os.symlink(outside / "secret", root / "link")
    return root, outside


def _client(tiny_backbone, root, outside):
    be = make_backend("ours", copy.deepcopy(tiny_backbone))
    # named on the command line: loads from outside any root
    be.add(AdapterInfo("cli", str(outside / "secret"), 0), outside / "secret")
    return TestClient(create_app(Service(be, Tok(), 16, adapter_root=root)))


def test_adapters_over_http_stay_below_the_root(tiny_backbone, layout):
    root, outside = layout
    with _client(tiny_backbone, root, outside) as client:
        ok = client.post("/v1/adapters", json={"name": "in", "path": str(root / "inside")})
        assert ok.status_code == 201, ok.text
        for name, path in [("abs", str(outside / "secret")),
                           ("dots", str(root / ".." / "outside" / "secret")),
                           ("link", str(root / "link")),
                           ("etc", "/etc")]:
            r = client.post("/v1/adapters", json={"name": name, "path": path})
            assert r.status_code == 403, (name, r.text)
            assert r.json()["error"] == (f"path {path!r} is outside the server's adapter root "
                                         f"{str(root.resolve())!r} (--adapter-root)")
        names = {a["name"] for a in client.get("/v1/adapters").json()["adapters"]}
        assert names == {"cli", "in"}
        spec = client.get("/openapi.json").json()["paths"]["/v1/adapters"]["post"]
        assert "403" in spec["responses"]


def test_a_server_without_a_root_takes_no_paths(tiny_backbone, layout):
    root, outside = layout
    be = make_backend("ours", copy.deepcopy(tiny_backbone))
    with TestClient(create_app(Service(be, Tok(), 16))) as client:
        r = client.post("/v1/adapters", json={"name": "in", "path": str(root / "inside")})
        assert r.status_code == 403 and "--adapter-root DIR" in r.json()["error"]
        assert client.get("/v1/adapters").json()["adapters"] == []


def test_the_root_defaults_to_the_served_run_directory(tmp_path, monkeypatch):
    from loralens.study.config import load_config
    from loralens.serving import server
    from loralens.core.run_dir import RunDir
    from loralens.core.files import atomic_write_json

    run = RunDir(tmp_path / "run")
    run.bind_config(load_config())
    run.weights_dir("sst2", "lora", 1).mkdir(parents=True)
    atomic_write_json(run.metrics_path("sst2", "lora", 1), {})
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    roots = []

    def fake_build(specs, base, backend, *a):
        roots.append(a[-1])
        raise RuntimeError("stop here")

    monkeypatch.setattr(server, "load_base", lambda mc: None)
    monkeypatch.setattr(server, "build_service", fake_build)
    for argv, want in [([str(run.root)], run.root),
                       ([str(run.root), "--adapter-root", str(tmp_path)], str(tmp_path))]:
        with pytest.raises(RuntimeError, match="stop here"):
            server.cli_command(parser.parse_args(argv))
        assert str(roots[-1]) == str(want)


def test_name_equals_dir_sources_reach_serve_and_overrides_still_reach_stages(monkeypatch):
    """`serve NAME=DIR` is a source, not a config override (it once failed with "the
    following arguments are required"); `train key=value` stays an override."""
    from loralens import cli

    seen = {}
    monkeypatch.setattr(cli, "_serving_command", lambda args: seen.setdefault("s", args) and 0)
    assert cli.main(["serve", "mine=/some/adapter", "--port", "0"]) == 0
    assert seen["s"].sources == ["mine=/some/adapter"]
    args = cli.build_parser().parse_args(["train"])
    assert "train" in cli._commands_with_overrides(cli.build_parser())
    assert args.overrides == []
