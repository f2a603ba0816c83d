"""``loralens export RUN_DIR OUT_DIR --push-to-hub ORG/NAME`` uploads through
``huggingface_hub`` (issue 28.2), checked against a local stand-in for the Hub that records
every request: ``HF_ENDPOINT`` points the ``loralens`` process at it (set before that process
imports ``huggingface_hub``). The stand-in answers what huggingface_hub 2.x sends for a
commit of regular files: repository creation (``POST /api/repos/create``), the README's
metadata check (``POST /api/validate-yaml``), pre-upload (``POST
/api/models/{repo}/preupload/{rev}``, every file answered ``regular``) and the commit
(``POST /api/models/{repo}/commit/{rev}``, an NDJSON body: a header line, then one line per
file with its base64 content). The token comes from $HF_TOKEN and is written nowhere."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loralens import cli
from tests.helpers.overrides import tiny

TOKEN = "hf_standInToken7Qx2"
OID = "0123456789abcdef0123456789abcdef01234567"


class StandIn(BaseHTTPRequestHandler):
    """A few Hub routes; every request is appended to ``server.requests``."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append({"method": "POST", "path": self.path,
                                     "auth": self.headers.get("Authorization"),
                                     "type": self.headers.get("Content-Type"), "body": body})
        path = self.path.split("?")[0]
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            req = json.loads(body)
            return self._json({"url": f"{self.server.url}/{req['organization']}/{req['name']}"})
        if path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and parts[4:5] == ["preupload"]:
            files = json.loads(body)["files"]
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular",
                                          "shouldIgnore": False} for f in files]})
        if parts[:2] == ["api", "models"] and parts[4:5] == ["commit"]:
            repo = "/".join(parts[2:4])
            return self._json({"commitUrl": f"{self.server.url}/{repo}/commit/{OID}",
                               "commitOid": OID, "success": True})
        self._json({"error": f"not answered by the stand-in: {path}"}, 404)

    def do_GET(self):  # noqa: N802
        self.server.requests.append({"method": "GET", "path": self.path, "auth": None})
        self._json({"error": "not answered by the stand-in"}, 404)

    def _json(self, obj, status=200):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    server.requests = []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def committed_files(body: bytes) -> tuple[dict, dict[str, bytes]]:
    """(header, path -> content) of an NDJSON commit body."""
    lines = [json.loads(line) for line in body.decode().splitlines() if line]
    header = next(x["value"] for x in lines if x["key"] == "header")
    files = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
             for x in lines if x["key"] == "file"}
    return header, files


def test_export_push_to_hub_against_a_recording_stand_in(tmp_path, glue_dir, hub):
    from huggingface_hub import ModelCard

    run = tmp_path / "run"
    assert cli.main(["train", "--run-dir", str(run), "--glue-dir", str(glue_dir),
                     "--no-progress", *tiny("methods=[lora]")]) == 0
    out = tmp_path / "exported"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_DISABLE_TELEMETRY="1")
    proc = subprocess.run([sys.executable, "-m", "loralens", "export", str(run), str(out),
                           "--push-to-hub", "my-org/rte-lora"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "pushed 1 repository to the hub" in proc.stdout

    posts = [(r["method"], r["path"].split("?")[0]) for r in hub.requests]
    assert posts == [("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"),
                     ("POST", "/api/models/my-org/rte-lora/preupload/main"),
                     ("POST", "/api/models/my-org/rte-lora/commit/main")]
    assert {r["auth"] for r in hub.requests} == {f"Bearer {TOKEN}"}
    assert json.loads(hub.requests[0]["body"]) == {"name": "rte-lora", "organization": "my-org"}
    commit = hub.requests[3]
    assert commit["type"] == "application/x-ndjson"
    header, files = committed_files(commit["body"])
    assert header["summary"] == "loralens export: rte/lora/seed42 (peft-adapter)"

    local = out / "rte" / "lora" / "seed42"
    assert set(files) == {p.relative_to(local).as_posix() for p in local.rglob("*")
                          if p.is_file()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert files["adapter_model.safetensors"] == (local / "adapter_model.safetensors").read_bytes()
    card = ModelCard(files["README.md"].decode())
    assert (card.data.library_name, card.data.pipeline_tag, card.data.datasets) == (
        "peft", "text-classification", ["nyu-mll/glue"])
    assert card.data.to_dict()["loralens"]["max_length"] == 32
    assert 'PeftModel.from_pretrained(base, "my-org/rte-lora")' in card.text  # the repo, not
    assert str(local) not in card.text.split("## Loading")[1]                  # the local dir

    manifest = json.loads((out / "export.json").read_text())
    assert manifest["hub"] == {"endpoint": hub.url, "repositories": [
        {"repo_id": "my-org/rte-lora", "url": f"{hub.url}/my-org/rte-lora", "commit": OID,
         "path": str(local)}]}
    # the token went to the stand-in only: no file, file name or output holds it
    leaks = [str(p) for p in tmp_path.rglob("*") if TOKEN in str(p)
             or (p.is_file() and TOKEN.encode() in p.read_bytes())]
    assert leaks == [] and TOKEN not in proc.stdout + proc.stderr


def test_push_without_a_token_fails_before_exporting(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run([sys.executable, "-m", "loralens", "export", str(tmp_path / "run"),
                           str(tmp_path / "out"), "--push-to-hub", "my-org/x"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "--push-to-hub needs a Hugging Face token: set HF_TOKEN" in proc.stderr
    assert not (tmp_path / "out").exists()
