"""Integration: `loralens serve` on SmolLM2 over loopback, real GLUE rows; `loralens loadtest`."""

from __future__ import annotations

import asyncio
import copy
import http.client
import json

import httpx
import pytest
import torch

from loralens.tasks import sources as TS
from loralens.training import batches as B
from loralens.cli import main
from loralens.study.config import load_config
from loralens.models.classifier import apply_method, build_classifier
from loralens.serving.backends import AdapterInfo, make_backend
from loralens.serving.server import Service
from loralens.core.run_dir import RunDir
from loralens.core.files import atomic_write_json, read_json
from loralens.tasks.registry import get_task

from tests.helpers.adapters import randomize_lora
from tests.helpers.serving import serving

TOL = 1e-5
MAX_LENGTH = 64
MAX_BODY = 4096


@pytest.fixture(scope="module")
def study(smollm2, tmp_path_factory, glue_dir):
    """A run directory laid out like a trained study: random r=8 LoRA adapters for
    sst2 (seed 1), rte (seed 1) and a spare rte adapter outside it."""
    cfg = load_config("smoke", None, [f"data.glue_dir={glue_dir}", f"data.max_length={MAX_LENGTH}"])
    root = tmp_path_factory.mktemp("study") / "run"
    run = RunDir(root)
    run.bind_config(cfg)
    pristine = smollm2.backbone().eval()
    peft = {}
    for i, (task, where) in enumerate([("sst2", root), ("rte", root),
                                       ("rte", root.parent / "spare")]):
        m = randomize_lora(apply_method(build_classifier(copy.deepcopy(pristine), 2, seed=i),
                                        "lora", cfg), seed=200 + i)
        path = run.weights_dir(task, "lora", 1) if where == root else where
        m.save_pretrained(str(path), safe_serialization=True)
        if where == root:  # a finished job: the server serves its adapter
            atomic_write_json(run.metrics_path(task, "lora", 1), {"task": task})
        peft[path] = m
    return root, pristine, peft


@pytest.fixture(scope="module")
def server(study, tokenizer):
    root, pristine, _ = study
    be = make_backend("ours", copy.deepcopy(pristine))
    for task in ("sst2", "rte"):
        path = root / "models" / task / "lora" / "seed1" / "adapter"
        be.add(AdapterInfo(f"{task}-seed1", str(path), 0, task, get_task(task).label_names), path)
    service = Service(be, tokenizer, MAX_LENGTH, max_batch=16, max_wait_ms=100, max_texts=8,
                      adapter_root=root.parent)  # the study and its spare adapter
    with serving(service) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, service


def val_rows(glue_dir, task, n, offset=0):
    return TS.load_split(get_task(task), "validation", glue_dir).examples[offset:offset + n]


def reference_probs(peft_model, tokenizer, texts_per_row):
    """In-process: training's tokenization, each row alone (batch 1), softmax."""
    out = []
    with torch.no_grad():
        for segs in texts_per_row:
            ids = torch.tensor([B.encode_texts(tokenizer, segs, MAX_LENGTH)])
            logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            out.append(torch.softmax(logits, -1)[0])
    return torch.stack(out)


def test_health_and_adapters(server):
    client, _ = server
    h = client.get("/health").json()
    assert (h["status"], h["backend"], h["adapters"]) == ("ok", "ours", 2)
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert set(listed) == {"sst2-seed1", "rte-seed1"}
    assert listed["rte-seed1"]["task"] == "rte"
    assert listed["rte-seed1"]["label_names"] == list(get_task("rte").label_names)


def test_answers_equal_in_process_inference(server, study, tokenizer, glue_dir):
    client, _ = server
    root, _, peft = study
    for task, key in (("sst2", "texts"), ("rte", "pairs")):
        rows = val_rows(glue_dir, task, 4)
        segs = [list(r.texts) for r in rows]
        body = {"adapter": f"{task}-seed1",
                key: [s[0] for s in segs] if key == "texts" else segs}
        r = client.post("/v1/classify", json=body)
        assert r.status_code == 200, r.text
        got = r.json()
        model = peft[root / "models" / task / "lora" / "seed1" / "adapter"]
        ref = reference_probs(model, tokenizer, segs)
        probs = torch.tensor(got["probabilities"])
        assert (probs - ref).abs().max().item() <= TOL
        assert got["labels"] == ref.argmax(-1).tolist()
        names = get_task(task).label_names
        assert got["label_names"] == [names[i] for i in got["labels"]]


def test_concurrent_requests_for_different_adapters_batch_together(server, study, tokenizer,
                                                                   glue_dir):
    client, service = server
    root, _, peft = study
    sst2 = [r.texts[0] for r in val_rows(glue_dir, "sst2", 4, offset=10)]
    rte = [list(r.texts) for r in val_rows(glue_dir, "rte", 4, offset=10)]
    bodies = [{"adapter": "sst2-seed1", "texts": [t]} for t in sst2] + \
             [{"adapter": "rte-seed1", "pairs": [p]} for p in rte]
    before = client.get("/health").json()

    async def fire():
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60) as ac:
            return await asyncio.gather(*(ac.post("/v1/classify", json=b) for b in bodies))

    answers = asyncio.run(fire())
    after = client.get("/health").json()
    assert all(a.status_code == 200 for a in answers)
    assert after["requests"] - before["requests"] == 8
    assert after["mixed_batches"] > before["mixed_batches"]  # sst2 and rte rows in one forward
    assert after["batches"] - before["batches"] < 8
    ref_s = reference_probs(peft[root / "models/sst2/lora/seed1/adapter"], tokenizer,
                            [[t] for t in sst2])
    ref_r = reference_probs(peft[root / "models/rte/lora/seed1/adapter"], tokenizer, rte)
    got = torch.tensor([a.json()["probabilities"][0] for a in answers])
    assert (got - torch.cat([ref_s, ref_r])).abs().max().item() <= TOL


def test_long_input_is_truncated_as_in_training(server, study, tokenizer):
    client, _ = server
    root, _, peft = study
    long = "a remarkably long and winding review " * 40
    r = client.post("/v1/classify", json={"adapter": "sst2-seed1", "texts": [long]})
    assert r.status_code == 200, r.text
    assert len(B.encode_texts(tokenizer, [long], 10_000)) > MAX_LENGTH
    ref = reference_probs(peft[root / "models/sst2/lora/seed1/adapter"], tokenizer, [[long]])
    assert (torch.tensor(r.json()["probabilities"]) - ref).abs().max().item() <= TOL


def _raw(url: str, body: bytes, headers: dict | None = None, chunked: bool = False):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    if chunked:
        conn.putrequest("POST", "/v1/classify")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for i in range(0, len(body), 1000):
            part = body[i:i + 1000]
            conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        conn.send(b"0\r\n\r\n")
    else:
        conn.request("POST", "/v1/classify", body=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read() or b"{}")
    conn.close()
    return out


BAD = [
    # (body, status, part of the error message)
    (b'{"adapter": "sst2-seed1", "texts": ["ok"', 400, "malformed JSON"),
    (b"not json at all", 400, "malformed JSON"),
    ({"adapter": "nope", "texts": ["fine"]}, 404, "unknown adapter 'nope'"),
    ({"adapter": "sst2-seed1", "texts": []}, 422, "texts"),
    ({"adapter": "sst2-seed1", "texts": [""]}, 422, "texts.0"),
    ({"adapter": "sst2-seed1"}, 422, 'exactly one of "texts" and "pairs"'),
    ({"adapter": "sst2-seed1", "texts": ["a"], "pairs": [["a", "b"]]}, 422, "exactly one"),
    ({"adapter": "sst2-seed1", "texts": "not a list"}, 422, "texts"),
    ({"adapter": "sst2-seed1", "texts": [1, 2]}, 422, "texts.0"),
    ({"adapter": 7, "texts": ["a"]}, 422, "adapter"),
    ({"texts": ["a"]}, 422, "adapter: Field required"),
    ({"adapter": "sst2-seed1", "texts": ["a"], "temperature": 2}, 422, "temperature"),
    ({"adapter": "rte-seed1", "pairs": [["only one"]]}, 422, "pairs.0"),
    ({"adapter": "rte-seed1", "pairs": [["a", "b", "c"]]}, 422, "pairs.0"),
    ({"adapter": "rte-seed1", "texts": ["a"]}, 422, "classifies sentence pairs"),
    ({"adapter": "sst2-seed1", "pairs": [["a", "b"]]}, 422, "classifies single sentences"),
    ({"adapter": "sst2-seed1", "texts": ["x"] * 9}, 413, "the limit is 8"),
    ([1, 2, 3], 422, "body"),
]


def test_curl_style_form_content_type_is_read_as_json(server, study, tokenizer, glue_dir):
    """The README's ``curl -d '{...}'`` sends application/x-www-form-urlencoded."""
    client, _ = server
    root, _, peft = study
    url = str(client.base_url).rstrip("/")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    segs = [list(r.texts) for r in val_rows(glue_dir, "rte", 2, offset=30)]
    status, got = _raw(url, json.dumps({"adapter": "rte-seed1", "pairs": segs}).encode(), form)
    assert status == 200, got
    ref = reference_probs(peft[root / "models/rte/lora/seed1/adapter"], tokenizer, segs)
    assert (torch.tensor(got["probabilities"]) - ref).abs().max().item() <= TOL
    assert got["labels"] == ref.argmax(-1).tolist()
    status, got = _raw(url, b"adapter=rte-seed1&pairs=a,b", form)
    assert status == 400 and "malformed JSON" in got["error"]


def test_bad_inputs_get_clear_4xx_and_the_server_keeps_serving(server):
    client, _ = server
    url = str(client.base_url).rstrip("/")
    ok = {"adapter": "sst2-seed1", "texts": ["a fine film"]}
    want = client.post("/v1/classify", json=ok).json()
    for body, status, msg in BAD:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got_status, got = _raw(url, raw)
        assert got_status == status, (body, got)
        assert msg in got["error"], (body, got)
    # bodies over the size limit: declared length, and chunked without a length
    big = json.dumps({"adapter": "sst2-seed1", "texts": ["y" * (MAX_BODY + 10)]}).encode()
    status, got = _raw(url, big)
    assert status == 413 and f"the limit is {MAX_BODY}" in got["error"]
    status, got = _raw(url, big, chunked=True)
    assert status == 413 and f"over {MAX_BODY} bytes" in got["error"]
    assert client.get("/v1/classify").status_code == 405
    # still serving, same answer
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/v1/classify", json=ok).json() == want


def test_add_and_remove_adapters_at_run_time(server, study, tokenizer, glue_dir):
    client, _ = server
    root, _, peft = study
    spare = root.parent / "spare"
    r = client.post("/v1/adapters", json={"name": "rte-spare", "path": str(spare), "task": "rte"})
    assert r.status_code == 201, r.text
    assert r.json()["task"] == "rte"
    pairs = [list(x.texts) for x in val_rows(glue_dir, "rte", 2, offset=20)]
    r = client.post("/v1/classify", json={"adapter": "rte-spare", "pairs": pairs})
    assert r.status_code == 200
    ref = reference_probs(peft[spare], tokenizer, pairs)
    assert (torch.tensor(r.json()["probabilities"]) - ref).abs().max().item() <= TOL
    # errors: duplicate name, not an adapter directory, unknown task, bad name
    dup = client.post("/v1/adapters", json={"name": "rte-spare", "path": str(spare)})
    assert dup.status_code == 409 and "already loaded" in dup.json()["error"]
    bad = client.post("/v1/adapters", json={"name": "x", "path": str(root)})
    assert bad.status_code == 422 and "not a PEFT adapter directory" in bad.json()["error"]
    bad = client.post("/v1/adapters", json={"name": "y", "path": str(spare), "task": "stsb"})
    assert bad.status_code == 422 and "stsb" in bad.json()["error"]  # cola is built in
    bad = client.post("/v1/adapters", json={"name": "../etc", "path": str(spare)})
    assert bad.status_code == 422 and "adapter name" in bad.json()["error"]
    # nothing is read outside the adapter root, a symbolic link out of it included
    outside = client.post("/v1/adapters", json={"name": "z", "path": "/etc"})
    assert outside.status_code == 403 and "outside the server's adapter root" in outside.text
    # remove: gone for new requests, the others unaffected
    assert client.delete("/v1/adapters/rte-spare").json() == {"removed": "rte-spare"}
    gone = client.post("/v1/classify", json={"adapter": "rte-spare", "pairs": pairs})
    assert gone.status_code == 404 and "unknown adapter 'rte-spare'" in gone.json()["error"]
    assert client.delete("/v1/adapters/rte-spare").status_code == 404
    names = {a["name"] for a in client.get("/v1/adapters").json()["adapters"]}
    assert names == {"sst2-seed1", "rte-seed1"}
    assert client.post("/v1/classify", json={"adapter": "rte-seed1", "pairs": pairs}
                       ).status_code == 200


def test_loadtest_end_to_end(study, tmp_path, capsys):
    root, _, _ = study
    out = tmp_path / "lt"
    args = ["loadtest", str(root), "--backends", "merged,peft,ours", "--clients", "1,3",
            "--adapters", "1,3", "--requests", "6", "--warmup", "1", "--out", str(out),
            "--no-progress", "--threads", "1", "--repeats", "2"]
    assert main(args) == 0
    res = read_json(out / "loadtest.json")
    cells = res["cells"]
    assert len(cells) == 3 * 2 * 2
    assert {(c["backend"], c["adapters"], c["clients"]) for c in cells} == {
        (b, a, c) for b in ("merged", "peft", "ours") for a in (1, 3) for c in (1, 3)}
    for c in cells:
        assert c["errors"] == 0 and c["requests"] == 6 and c["repeats"] == 2
        assert c["throughput_rps"] > 0 and 0 < c["p50_ms"] <= c["p95_ms"] <= c["p99_ms"]
        lo, hi = c["throughput_ci"]
        assert lo <= c["throughput_rps"] <= hi and len(c["throughput_runs"]) == 2
    # every cell twice, the servers interleaved: each repeat runs all three, rotated
    runs = res["runs"]
    assert len(runs) == 24 and res["repeats"] == 2
    assert [r["backend"] for r in runs[:6]] == ["merged", "peft", "ours", "peft", "ours",
                                                "merged"]
    # one task (the same texts in every cell): its one trained adapter and two copies
    assert res["task"] == "rte"
    assert all(s["adapters"] == 3 for s in res["servers"].values())
    assert res["servers"]["ours"]["health"]["adapters"] == 3
    assert {c["backend"] for c in res["crossovers"]} == {"peft", "ours"}
    text = capsys.readouterr().out
    assert "p95 ms" in text and "vs merged" in text
    assert (out / "loadtest.csv").read_text().count("\n") == 13
    assert (out / "loadtest_runs.csv").read_text().count("\n") == 25
    # a finished result is not overwritten silently
    assert main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
