"""``loralens serve --ray-replicas``: the Ray Serve application (ingress + 2 replicas of one
CPU each) on a local two-CPU Ray instance, SmolLM2 base, random rank-8 LoRA adapters.

* Answers equal the one-process server's for the same inputs (today's body shape and
  vLLM's): labels equal, probabilities within ``TOL`` = 1e-5. Both run the same code
  (:class:`Service`, backend ``ours``) on the same float32 weights, but a replica runs torch
  on one thread and this process on torch's default: the matrix products' summation order
  differs, which moves float32 softmax outputs by about 1e-7; 1e-5 leaves room and still
  catches a wrong adapter or head (differences of 1e-2 and more).
* Routing: after a first request loads an adapter on one replica and a wait for the
  replicas' model ids to reach Ray's router, 10 sequential requests for that adapter land
  on a replica that already holds it. Ray's multiplexed routing is best-effort (a request
  may go to another replica, e.g. when the router's view is briefly stale or the holder
  looks busy), so the test allows at most 1 miss in 10.
* Eviction: the replicas keep one adapter each (``max_loaded=1``, Ray's
  ``max_num_models_per_replica``), so asking for three adapters, then the first again, and
  concurrent requests for two, makes Ray unload and reload adapters: answers still equal
  the single server's, and at the end each replica reports at most one adapter loaded.
* ``/metrics`` at the ingress holds both replicas' series (a ``replica`` label), and the
  per-adapter request counters summed over replicas equal the requests this module sent.
* Adapters over HTTP: an adapter added with ``POST /v1/adapters`` (below the adapter root)
  answers as on the single server, where it is added too (same 201 body, same errors for a
  name in use and a path outside the root); ``DELETE`` unloads it on every replica that
  holds it (their known-adapter gauges and Ray's unload counters say so as soon as DELETE
  answers) and its name then gets the single server's 404; added again, it answers again.
  The replicas take 2 requests at a time (``replica_max_ongoing=2``; the ingress forwards
  up to 5), so 16 concurrent requests for it overflow the replica holding it and Ray's
  router sends some to the other, which loads it too: both hold it when it is removed.
* The API key (the app runs with one; the module's client sends it): without it or with a
  wrong one, 401 with the single server's body; ``/health`` needs none.
"""

from __future__ import annotations

import copy
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from loralens.core.config import StudyConfig
from loralens.models.classifier import apply_method, build_classifier
from loralens.serving.backends import AdapterInfo, make_backend
from loralens.serving.server import Service
from loralens.serving.sources import AdapterSpec
from loralens.study.config import load_config
from loralens.tasks import sources as TS
from loralens.tasks.registry import get_task

from tests.helpers.adapters import randomize_lora
from tests.helpers.serving import serving

pytestmark = pytest.mark.integration

TOL = 1e-5
MAX_LENGTH = 64
# name -> task; "sst2-c" is asked for only by the routing test (it starts unloaded)
ADAPTERS = {"sst2-a": "sst2", "sst2-b": "sst2", "rte-a": "rte", "sst2-c": "sst2"}
NEW = "sst2-new"  # saved below the adapter root, not served at start: added over HTTP
KEY = "ray-ingress-test-key"
LOCK = threading.Lock()
SENT = {"classify": 0}  # classify requests answered 200 by the Ray app (checked in /metrics)


@pytest.fixture(scope="module")
def specs(smollm2, tmp_path_factory, glue_dir):
    cfg = load_config("smoke", None, [f"data.glue_dir={glue_dir}",
                                      f"data.max_length={MAX_LENGTH}"])
    root = tmp_path_factory.mktemp("adapters")
    pristine = smollm2.backbone().eval()
    out = []
    for i, (name, task) in enumerate({**ADAPTERS, NEW: "sst2"}.items()):
        m = randomize_lora(apply_method(build_classifier(copy.deepcopy(pristine), 2, seed=i),
                                        "lora", cfg), seed=300 + i)
        m.save_pretrained(str(root / name), safe_serialization=True)
        if name in ADAPTERS:
            out.append(AdapterSpec(name, root / name, task))
    return out, pristine


@pytest.fixture(scope="module")
def single(specs, tokenizer):
    """The one-process server with every adapter loaded."""
    adapters, pristine = specs
    be = make_backend("ours", copy.deepcopy(pristine))
    for s in adapters:
        be.add(AdapterInfo(s.name, str(s.path), 0, s.task, get_task(s.task).label_names), s.path)
    service = Service(be, tokenizer, MAX_LENGTH, max_batch=16, max_wait_ms=1, max_texts=8,
                      adapter_root=adapters[0].path.parent)
    with serving(service) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_app(specs):
    """Ray (2 CPUs, loopback), Serve's proxy on a free port, the app with 2 replicas, an
    adapter root and an API key (the client sends it)."""
    ray = pytest.importorskip("ray") if not os.environ.get("CI") else __import__("ray")
    serve = pytest.importorskip("ray.serve")
    from loralens.serving.auth import ApiKey, KeyDigest
    from loralens.serving.ray_serve import RayServeConfig, build_app

    adapters, _ = specs
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=100 * 2**20, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = RayServeConfig(model=StudyConfig().model, specs=tuple(adapters), replicas=2,
                             max_length=MAX_LENGTH, max_batch=16, max_wait_ms=1, max_texts=8,
                             max_loaded=1, adapter_root=str(adapters[0].path.parent),
                             api_key=KeyDigest(ApiKey(KEY)), replica_max_ongoing=2)
        serve.run(build_app(cfg), name="loralens-test", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}) as client:
            deadline = time.time() + 60  # both replicas report to the board
            while client.get("/health").json().get("replicas") != 2:
                assert time.time() < deadline, "the replicas did not report"
                time.sleep(0.2)
            yield client
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _rows(glue_dir, task, n, offset=0):
    return TS.load_split(get_task(task), "validation", glue_dir).examples[offset:offset + n]


def _post(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    if "X-Replica" in r.headers:
        with LOCK:
            SENT["classify"] += 1
    return r


def test_same_api_and_answers_as_the_single_server(ray_app, single, glue_dir):
    assert {m["id"] for m in ray_app.get("/v1/models").json()["data"]} == set(ADAPTERS)
    listed = {a["name"]: a for a in ray_app.get("/v1/adapters").json()["adapters"]}
    assert listed["rte-a"]["label_names"] == list(get_task("rte").label_names)
    h = ray_app.get("/health").json()
    assert (h["status"], h["adapters"], h["replicas"]) == ("ok", 4, 2)

    sst2 = [r.texts[0] for r in _rows(glue_dir, "sst2", 4)]
    rte = [list(r.texts) for r in _rows(glue_dir, "rte", 3)]
    bodies = [("/v1/classify", {"adapter": "sst2-a", "texts": sst2}),
              ("/v1/classify", {"adapter": "sst2-b", "texts": sst2[:2]}),
              ("/v1/classify", {"adapter": "rte-a", "pairs": rte}),
              ("/v1/classify", {"adapter": "sst2-a", "texts": sst2[1:]})]  # after evictions
    for path, body in bodies:
        got, ref = _post(ray_app, path, body).json(), _post(single, path, body).json()
        assert got["labels"] == ref["labels"] and got["label_names"] == ref["label_names"]
        diff = (torch.tensor(got["probabilities"]) - torch.tensor(ref["probabilities"]))
        assert diff.abs().max().item() <= TOL, body["adapter"]
    for path in ("/classify", "/v1/classify"):  # vLLM's shape
        body = {"model": "sst2-b", "input": sst2}
        got, ref = _post(ray_app, path, body).json(), _post(single, path, body).json()
        assert [d["label"] for d in got["data"]] == [d["label"] for d in ref["data"]]
        diff = torch.tensor([d["probs"] for d in got["data"]]) - \
            torch.tensor([d["probs"] for d in ref["data"]])
        assert diff.abs().max().item() <= TOL
        assert got["object"] == "list" and got["model"] == "sst2-b"

    # concurrent requests for two adapters: a replica unloads one only once its requests
    # in flight are answered (none fails with "unknown adapter" midway)
    bodies = [{"adapter": name, "texts": [t]} for t in sst2 for name in ("sst2-a", "sst2-b")]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda b: _post(ray_app, "/v1/classify", b).json(), bodies))
    for body, g in zip(bodies, got):
        ref = _post(single, "/v1/classify", body).json()
        assert g["labels"] == ref["labels"]
        diff = torch.tensor(g["probabilities"]) - torch.tensor(ref["probabilities"])
        assert diff.abs().max().item() <= TOL

    r = ray_app.post("/v1/classify", json={"adapter": "nope", "texts": ["x"]})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    r = ray_app.post("/v1/classify", json={"adapter": "rte-a", "texts": ["x"]})  # pair task
    assert r.status_code == 422 and "pairs" in r.json()["error"]
    r = ray_app.post("/v1/classify", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"].startswith("malformed JSON")


def test_requests_for_an_adapter_land_on_the_replica_holding_it(ray_app):
    body = {"adapter": "sst2-c", "texts": ["a gripping, well acted film"]}
    holders = {_post(ray_app, "/v1/classify", body).headers["X-Replica"]}
    deadline = time.time() + 30  # the replica's board shows it ...
    while True:
        listed = {a["name"]: a for a in ray_app.get("/v1/adapters").json()["adapters"]}
        if set(listed["sst2-c"]["replicas"]) == holders:
            break
        assert time.time() < deadline, listed["sst2-c"]
        time.sleep(0.2)
    time.sleep(2.0)  # ... and Ray's router has learnt it (replicas push their ids every 0.1 s)
    misses = 0
    for _ in range(10):
        replica = _post(ray_app, "/v1/classify", body).headers["X-Replica"]
        misses += replica not in holders
        holders.add(replica)
    assert misses <= 1, f"{misses} of 10 requests went to a replica without the adapter"


def test_metrics_at_the_ingress_hold_both_replicas(ray_app):
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.time() + 15  # replicas push every 0.5 s
    while True:
        text = ray_app.get("/metrics").text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        loaded = fams["loralens_adapters_loaded"].samples
        requests = fams["loralens_adapter_requests"].samples
        counted = sum(s.value for s in requests if s.name.endswith("_total"))
        if counted == SENT["classify"]:
            break
        assert time.time() < deadline, (counted, SENT["classify"])
        time.sleep(0.3)
    assert len({s.labels["replica"] for s in loaded}) == 2
    assert max(s.value for s in loaded) <= 1  # max_loaded=1: Ray's LRU unloaded the rest
    loads = sum(s.value for s in fams["loralens_ray_adapter_loads"].samples
                if s.name.endswith("_total"))
    unloads = sum(s.value for s in fams["loralens_ray_adapter_unloads"].samples
                  if s.name.endswith("_total"))
    # 4 adapters asked for, 2 slots in all: at least 2 unloads; what is loaded = loads - unloads
    assert unloads >= 2 and loads - unloads == sum(s.value for s in loaded)
    assert SENT["classify"] == 4 + 2 + 8 + 11  # the requests the two tests above sent


def _replica_series(client, family):
    """{replica: value} of a per-replica metric at the ingress (counters: their _total)."""
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    return {s.labels["replica"]: s.value for s in fams[family].samples
            if s.name in (family, family + "_total")}


def test_adapters_added_and_removed_over_http_as_on_the_single_server(ray_app, single, specs,
                                                                      glue_dir):
    root = specs[0][0].path.parent
    body = {"name": NEW, "path": str(root / NEW), "task": "sst2"}
    got, ref = ray_app.post("/v1/adapters", json=body), single.post("/v1/adapters", json=body)
    assert (got.status_code, got.json()) == (ref.status_code, ref.json()) == (201, {
        "name": NEW, "source": str(root / NEW), "num_labels": 2, "task": "sst2",
        "label_names": ["negative", "positive"]})
    answered = {got.headers["X-Replica"]}  # the replica that loaded it
    for bad in (body, {"name": "x", "path": str(root.parent)}):  # 409; 403 outside the root
        got, ref = ray_app.post("/v1/adapters", json=bad), single.post("/v1/adapters", json=bad)
        assert got.status_code in (403, 409)
        assert (got.status_code, got.json()) == (ref.status_code, ref.json())
    assert NEW in {m["id"] for m in ray_app.get("/v1/models").json()["data"]}

    sst2 = [r.texts[0] for r in _rows(glue_dir, "sst2", 4, offset=8)]
    checks = [("/v1/classify", {"adapter": NEW, "texts": sst2})] * 8 + \
        [("/classify", {"model": NEW, "input": sst2})] * 8  # both shapes
    refs = {path: _post(single, path, b).json() for path, b in checks}
    with ThreadPoolExecutor(8) as pool:  # 8 at a time: more than the holder takes
        outs = list(pool.map(lambda c: _post(ray_app, *c), checks))
    for (path, _), r in zip(checks, outs):
        answered.add(r.headers["X-Replica"])
        g, ref = r.json(), refs[path]
        probs = (g["probabilities"], ref["probabilities"]) if "probabilities" in g else \
            ([d["probs"] for d in g["data"]], [d["probs"] for d in ref["data"]])
        diff = torch.tensor(probs[0]) - torch.tensor(probs[1])
        assert diff.abs().max().item() <= TOL, path

    deadline = time.time() + 30  # every replica that loaded it shows it on the board
    while True:
        listed = {a["name"]: a for a in ray_app.get("/v1/adapters").json()["adapters"]}
        holders = set(listed[NEW]["replicas"])
        if holders == answered:  # max_loaded=1 and only NEW asked for: none evicted it
            break
        assert time.time() < deadline, listed[NEW]
        time.sleep(0.2)
    known, unloads = (_replica_series(ray_app, "loralens_adapters_known"),
                      _replica_series(ray_app, "loralens_ray_adapter_unloads"))
    t0 = time.time()
    got, ref = ray_app.delete(f"/v1/adapters/{NEW}"), single.delete(f"/v1/adapters/{NEW}")
    assert (got.status_code, got.json()) == (ref.status_code, ref.json()) == (
        200, {"removed": NEW})
    assert time.time() - t0 < 10  # every replica acknowledged (not the 30 s give-up)
    # as soon as DELETE answers, every replica that held it has unloaded it
    after_known = _replica_series(ray_app, "loralens_adapters_known")
    after_unloads = _replica_series(ray_app, "loralens_ray_adapter_unloads")
    assert len(holders) == 2, f"held by {holders} only: Ray did not spread the burst"
    for r in holders:
        assert after_known[r] == known[r] - 1, (r, known, after_known)
    assert sum(after_unloads.values()) == sum(unloads.values()) + len(holders)
    assert NEW not in {a["name"] for a in ray_app.get("/v1/adapters").json()["adapters"]}
    assert NEW not in {m["id"] for m in ray_app.get("/v1/models").json()["data"]}
    for path, b in checks[:1] + checks[-1:]:
        got, ref = ray_app.post(path, json=b), single.post(path, json=b)
        assert got.status_code == ref.status_code == 404
        assert got.json() == ref.json(), path  # "unknown adapter 'sst2-new'; loaded: ..."
    got, ref = ray_app.delete(f"/v1/adapters/{NEW}"), single.delete(f"/v1/adapters/{NEW}")
    assert (got.status_code, got.json()) == (ref.status_code, ref.json())
    assert got.status_code == 404

    # added again under the same name: a new registration, loaded and answering again
    assert ray_app.post("/v1/adapters", json=body).status_code == 201
    assert single.post("/v1/adapters", json=body).status_code == 201
    path, b = checks[0]
    g, ref = _post(ray_app, path, b).json(), _post(single, path, b).json()
    assert g["labels"] == ref["labels"]
    assert (torch.tensor(g["probabilities"]) - torch.tensor(ref["probabilities"])).abs().max() \
        <= TOL
    print(f"{NEW}: answered by {len(answered)} replica(s), held by {len(holders)} when removed")


def test_the_api_key_at_the_ingress(ray_app):
    url = str(ray_app.base_url).rstrip("/")
    r = httpx.get(f"{url}/v1/models")
    assert (r.status_code, r.json()) == (401, {"error": "missing API key: send the header "
                                                        "'Authorization: Bearer <key>'"})
    assert r.headers["www-authenticate"] == 'Bearer realm="loralens"'
    for method, path in [("GET", "/metrics"), ("GET", "/v1/adapters"),
                         ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/sst2-a"),
                         ("POST", "/v1/classify"), ("POST", "/classify")]:
        r = httpx.request(method, f"{url}{path}", json={"adapter": "sst2-a", "texts": ["x"]},
                          headers={"Authorization": "Bearer wrong"})
        assert (r.status_code, r.json()) == (401, {"error": "wrong API key"}), (method, path)
    assert httpx.get(f"{url}/health").status_code == 200  # open, as on the single server
    assert ray_app.get("/v1/models").status_code == 200  # the client sends the key
    assert "sst2-a" in {a["name"] for a in ray_app.get("/v1/adapters").json()["adapters"]}
