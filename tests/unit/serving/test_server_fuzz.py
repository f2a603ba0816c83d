"""Schemathesis against ``loralens serve``'s own OpenAPI schema, over loopback, on the tiny
random model: every endpoint with generated bodies, paths and headers (valid and invalid
data), then stateful sequences that add adapters, classify with them and remove them
(following the schema's OpenAPI links), vLLM's API included (GET /v1/models, then
POST /classify with ``data[0].id``, as vLLM's example client does). No 5xx, no hang, every
response matching its declared schema (the ``{"error": ...}`` bodies included); /health
answers after."""

from __future__ import annotations

import time
import zlib
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from loralens.serving.server import AdapterSpec, build_service
from tests.helpers.serving import serving
from tests.helpers.adapters import random_adapter

REQUESTS = {"stateless": 0, "stateful": 0}
STATUSES: Counter = Counter()  # (operation, status) of the stateful calls
OPERATIONS: Counter = Counter()  # operations of the stateless calls
INITIAL = {"sst2-a": ("single", "sst2"), "rte-a": ("pair", "rte")}  # name: (directory, task)
MIN_REQUESTS = 500
SLOW = 5.0  # seconds: an answer slower than this is a hang on the tiny model
# Every Schemathesis check but one: a schema cannot say that "path" must be an adapter
# directory on the server, or "task" a known task, so schema-valid bodies may get a
# (correct) 422; "positive data accepted" would call that a failure.
EXCLUDED = [schemathesis.checks.positive_data_acceptance]


@pytest.fixture(scope="module")
def api(tiny_base, tmp_path_factory):
    """(base URL, schema, adapter directories) of a server with two adapters loaded."""
    root = tmp_path_factory.mktemp("adapters")
    dirs = {"single": root / "single", "pair": root / "pair"}
    for i, path in enumerate(dirs.values()):
        random_adapter(tiny_base.backbone(), i, path)
    service = build_service([AdapterSpec(n, dirs[d], t) for n, (d, t) in INITIAL.items()],
                            tiny_base,
                            max_length=32, max_batch=8, max_wait_ms=1, max_texts=8,
                            adapter_root=root)
    with serving(service, max_body=64 * 1024) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        yield url, schema, dirs


def realistic(case, dirs) -> None:
    """Half of the generated add-adapter bodies name a real adapter directory (under a new
    name), so that adding, using and removing adapters is exercised, not only refused; half
    of the generated vLLM-shaped classify bodies name a loaded adapter as their model."""
    if not isinstance(case.body, dict):
        return
    if case.meta is not None and case.meta.generation.mode != GenerationMode.POSITIVE:
        return  # a negative case stays invalid
    k = zlib.crc32(repr(sorted(case.body.items(), key=str)).encode())  # same case, same choice
    if "model" in case.body and case.operation.label in ("POST /classify", "POST /v1/classify"):
        if k % 2 == 0:
            case.body["model"] = list(INITIAL)[k % 4 // 2]
        return
    if case.operation.label != "POST /v1/adapters":
        return
    if k % 2 == 0:
        case.body.update(name=f"fz-{k}", path=str(dirs["single" if k % 4 else "pair"]))
        case.body.pop("task", None)


def call(case, url: str):
    t0 = time.perf_counter()
    response = case.call(base_url=url, timeout=SLOW * 4)
    elapsed = time.perf_counter() - t0
    assert elapsed < SLOW, f"{case.operation.label} took {elapsed:.1f} s"
    return response


FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_endpoint_answers_by_its_schema(api, mode):
    url, schema, dirs = api

    @FUZZ
    @given(case=schema.as_strategy(generation_mode=mode))
    def fuzz(case):
        realistic(case, dirs)
        response = call(case, url)
        REQUESTS["stateless"] += 1
        OPERATIONS[case.operation.label] += 1
        case.validate_response(response, excluded_checks=EXCLUDED)

    fuzz()
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_stateful_add_classify_remove_sequences(api):
    url, schema, dirs = api
    Machine = schema.as_state_machine()

    class Fuzz(Machine):
        def before_call(self, case):
            realistic(case, dirs)

        def call(self, case, **kwargs):
            return call(case, url)

        def after_call(self, response, case):
            REQUESTS["stateful"] += 1
            STATUSES[case.operation.label, response.status_code] += 1
            super().after_call(response, case)

        def teardown(self):  # every scenario starts from the same server state
            listed = httpx.get(f"{url}/v1/adapters", timeout=10).json()["adapters"]
            for a in listed:
                if a["name"] not in INITIAL:
                    httpx.delete(f"{url}/v1/adapters/{a['name']}", timeout=10)
            for name, (d, task) in INITIAL.items():  # removed by the scenario: back again
                if name not in {a["name"] for a in listed}:
                    added = httpx.post(f"{url}/v1/adapters", timeout=10,
                                       json={"name": name, "path": str(dirs[d]), "task": task})
                    assert added.status_code == 201, added.text

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, additional_checks=additional_checks,
                                   excluded_checks=EXCLUDED)

    Fuzz.run(settings=settings(max_examples=40, stateful_step_count=8, deadline=None,
                               derandomize=True, database=None,
                               suppress_health_check=list(HealthCheck)))
    health = httpx.get(f"{url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    names = {a["name"] for a in httpx.get(f"{url}/v1/adapters", timeout=10).json()["adapters"]}
    assert set(INITIAL) <= names
    total = sum(REQUESTS.values())
    print(f"server fuzz: {REQUESTS} = {total} requests; stateful {sorted(STATUSES.items())}")
    # the sequences really added, used and removed adapters
    assert STATUSES["POST /v1/adapters", 201] and STATUSES["DELETE /v1/adapters/{name}", 200]
    assert STATUSES["POST /v1/classify", 200]
    assert STATUSES["POST /classify", 200] and STATUSES["GET /v1/models", 200]
    assert REQUESTS["stateful"] >= 250, REQUESTS
    if REQUESTS["stateless"]:  # the module ran whole (the tests above first, in file order)
        assert total >= MIN_REQUESTS, REQUESTS
        assert OPERATIONS["GET /v1/models"] and OPERATIONS["POST /classify"], OPERATIONS
