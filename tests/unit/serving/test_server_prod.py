"""``loralens serve`` for production traffic: ``GET /metrics`` (Prometheus text, read back
with prometheus-client's own parser) counts exactly the requests made, and the optional
bearer token guards every endpoint but /health without ever being shown or logged."""

from __future__ import annotations

import logging
from collections import defaultdict

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from loralens.core.errors import ConfigError
from loralens.serving.auth import API_KEY_ENV, ApiKey, load_api_key
from loralens.serving.server import AdapterSpec, build_service, create_app
from tests.helpers.serving import KEY
from tests.helpers.properties import examples


def _service(tiny_base, root):
    specs = [AdapterSpec("a", root / "a", "sst2"), AdapterSpec("b", root / "a", "sst2")]
    return build_service(specs, tiny_base, max_length=32, max_batch=8, max_wait_ms=1,
                         max_texts=8, adapter_root=root)


def scrape(client, **kw) -> dict:
    """{(sample name, sorted labels): value} of one GET /metrics."""
    r = client.get("/metrics", **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def req(samples, endpoint, method, status) -> float:
    key = ("loralens_http_requests_total",
           (("endpoint", endpoint), ("method", method), ("status", str(status))))
    return samples.get(key, 0.0)


def test_metrics_count_the_requests_made(tiny_base, adapter_dir):
    service = _service(tiny_base, adapter_dir)
    rows = defaultdict(int)
    with TestClient(create_app(service)) as client:
        for adapter, texts in [("a", ["x", "yy"]), ("a", ["z"]), ("b", ["u", "v", "w"]),
                               ("a", ["q"])]:
            assert client.post("/v1/classify", json={"adapter": adapter, "texts": texts}
                               ).status_code == 200
            rows[adapter] += len(texts)
        assert client.post("/v1/classify", json={"adapter": "zz", "texts": ["x"]}
                           ).status_code == 404
        assert client.post("/v1/classify", content=b"{nope").status_code == 400
        assert client.get("/health").status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/no/such/path").status_code == 404
        assert client.put("/v1/adapters").status_code == 405
        assert client.get("/v1/adapters/../../etc/passwd").status_code == 404

        s = scrape(client)
        assert req(s, "/v1/classify", "POST", 200) == 4
        assert req(s, "/v1/classify", "POST", 404) == 1
        assert req(s, "/v1/classify", "POST", 400) == 1
        assert req(s, "/health", "GET", 200) == 2
        assert req(s, "/v1/adapters", "PUT", 405) == 1
        assert req(s, "other", "GET", 404) == 2  # raw paths never become labels
        assert req(s, "/metrics", "GET", 200) == 0  # counted once answered
        total = sum(v for (n, _), v in s.items() if n == "loralens_http_requests_total")
        assert total == 11
        assert s["loralens_http_request_duration_seconds_count",
                 (("endpoint", "/v1/classify"), ("method", "POST"))] == 6
        assert s["loralens_http_requests_in_progress", ()] == 1  # this scrape
        # batches: one per classify request here (sequential, 1 ms window)
        assert s["loralens_batch_rows_count", ()] == service.stats.batches == 4
        assert s["loralens_batch_rows_sum", ()] == sum(rows.values()) == 7
        assert s["loralens_batch_rows_bucket", (("le", "2.0"),)] == 3  # 2, 1, 1 rows
        assert s["loralens_batch_adapters_sum", ()] == 4
        assert s["loralens_queue_wait_seconds_count", ()] == 4
        for name in ("a", "b"):
            assert s["loralens_adapter_rows_total", (("adapter", name),)] == rows[name]
        assert s["loralens_adapter_requests_total", (("adapter", "a"),)] == 3
        assert s["loralens_adapter_requests_total", (("adapter", "b"),)] == 1
        assert s["loralens_adapters_loaded", ()] == 2
        assert s["loralens_queue_depth", ()] == 0

        assert client.delete("/v1/adapters/b").status_code == 200
        s = scrape(client)
        assert s["loralens_adapters_loaded", ()] == 1
        assert req(s, "/metrics", "GET", 200) == 1
        assert req(s, "/v1/adapters/{name}", "DELETE", 200) == 1
        spec = client.get("/openapi.json").json()
        assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
        assert "securitySchemes" not in spec.get("components", {})  # no key: no auth


def test_each_app_counts_its_own_requests(tiny_base, adapter_dir):
    with TestClient(create_app(_service(tiny_base, adapter_dir))) as one:
        one.get("/health")
        with TestClient(create_app(_service(tiny_base, adapter_dir))) as two:
            assert req(scrape(two), "/health", "GET", 200) == 0
        assert req(scrape(one), "/health", "GET", 200) == 1


def test_the_key_comes_from_a_file_or_the_environment(tmp_path):
    f = tmp_path / "key"
    f.write_text(f"  {KEY}\n")
    assert load_api_key(f, {}).matches(KEY.encode())
    assert load_api_key(f, {API_KEY_ENV: "other"}).matches(KEY.encode())  # the file wins
    assert load_api_key(None, {API_KEY_ENV: f" {KEY} "}).matches(KEY.encode())
    assert load_api_key(None, {API_KEY_ENV: ""}) is None
    assert load_api_key(None, {}) is None
    assert KEY not in repr(load_api_key(f, {})) and KEY not in str(load_api_key(f, {}))
    (tmp_path / "empty").write_text("\n \n")
    with pytest.raises(ConfigError, match=rf"--api-key-file '{tmp_path}/empty' is empty"):
        load_api_key(tmp_path / "empty", {})
    with pytest.raises(ConfigError, match=r"'/no/such/key': cannot read it \(FileNotFound"):
        load_api_key("/no/such/key", {})


@pytest.mark.parametrize("public_metrics", [False, True])
def test_every_endpoint_but_health_needs_the_key(tiny_base, adapter_dir, caplog,
                                                 public_metrics):
    caplog.set_level(logging.DEBUG)
    app = create_app(_service(tiny_base, adapter_dir), 4096, ApiKey(KEY), public_metrics)
    right = {"Authorization": f"Bearer {KEY}"}
    seen = []
    with TestClient(app) as client:
        def call(method, path, **kw):
            r = client.request(method, path, **kw)
            seen.append(r)
            return r

        assert call("GET", "/health").status_code == 200
        calls = [("GET", "/v1/adapters", {}), ("GET", "/openapi.json", {}),
                 ("POST", "/v1/classify", {"json": {"adapter": "a", "texts": ["x"]}}),
                 ("POST", "/v1/adapters", {"json": {"name": "c", "path": "/etc"}}),
                 ("DELETE", "/v1/adapters/a", {}), ("GET", "/no/such/path", {}),
                 ("POST", "/v1/classify", {"content": b"x" * 10_000})]  # 401 before 413
        if not public_metrics:
            calls.append(("GET", "/metrics", {}))
        for method, path, kw in calls:
            for headers, message in [({}, "missing API key: send the header "
                                          "'Authorization: Bearer <key>'"),
                                     ({"Authorization": "Bearer " + KEY[:-1]}, "wrong API key"),
                                     ({"Authorization": "Bearer " + KEY + "x"}, "wrong API key"),
                                     ({"Authorization": f"Basic {KEY}"}, "missing API key")]:
                r = call(method, path, headers=headers, **kw)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["error"].startswith(message)
                assert r.headers["www-authenticate"].startswith('Bearer realm="loralens"')
        assert call("GET", "/v1/adapters", headers=right).status_code == 200
        ok = call("POST", "/v1/classify", headers=right, json={"adapter": "a", "texts": ["x"]})
        assert ok.status_code == 200 and ok.json()["labels"]
        assert call("POST", "/v1/adapters", headers=right,
                    json={"name": "c", "path": "/etc"}).status_code == 403  # root kept
        metrics = call("GET", "/metrics", headers={} if public_metrics else right)
        assert metrics.status_code == 200
        spec = call("GET", "/openapi.json", headers={"authorization": f"bearer {KEY}"}).json()
    s = {(x.name, tuple(sorted(x.labels.items()))): x.value
         for f in text_string_to_metric_families(metrics.text) for x in f.samples}
    assert req(s, "/v1/adapters", "GET", 401) == 4 and req(s, "/v1/adapters", "GET", 200) == 1
    assert req(s, "/v1/classify", "POST", 401) == 8
    ops = {(p, m): op for p, d in spec["paths"].items() for m, op in d.items()}
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for (path, method), op in ops.items():
        guarded = path != "/health" and not (public_metrics and path == "/metrics")
        assert ("401" in op["responses"]) == guarded, (path, method)
        assert ("security" in op) == guarded
    # the key is never echoed: not in any answer, header or log record
    for r in seen:
        assert KEY not in r.text and KEY not in str(r.headers), r.request.url
    assert KEY not in caplog.text


def test_a_keyed_server_answers_by_its_schema(tiny_base, adapter_dir, monkeypatch):
    """Schemathesis on a server with a key: every operation's answers, the 401s included,
    match the schema (its ``ignored_auth`` check re-sends answered requests without the
    key, which must then be refused)."""
    import functools

    import schemathesis
    from hypothesis import HealthCheck, given, settings

    from tests.helpers.serving import serving

    app_factory = functools.partial(create_app, api_key=ApiKey(KEY))
    auth = {"Authorization": f"Bearer {KEY}"}
    statuses = defaultdict(int)
    with serving(_service(tiny_base, adapter_dir), max_body=64 * 1024,
                 app_factory=app_factory) as url:
        assert httpx.get(f"{url}/openapi.json").status_code == 401
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=auth)

        @settings(max_examples=examples(40), deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=schema.as_strategy())
        def fuzz(case):
            response = case.call(base_url=url, headers=auth, timeout=20)
            statuses[response.status_code] += 1
            case.validate_response(response, excluded_checks=[
                schemathesis.checks.positive_data_acceptance])

        fuzz()
        assert httpx.get(f"{url}/v1/adapters").status_code == 401
    assert 401 not in statuses and statuses[200], dict(statuses)
