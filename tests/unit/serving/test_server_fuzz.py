"""Schemathesis against ``loralens serve``'s own OpenAPI schema, over loopback, on the tiny
random model: every endpoint with generated bodies, paths and headers (valid and invalid
data), then stateful sequences that add adapters, classify with them and remove them
(following the schema's OpenAPI links), vLLM's API included (GET /v1/models, then
POST /classify with ``data[0].id``, as vLLM's example client does). No 5xx, no hang, every
response matching its declared schema (the ``{"error": ...}`` bodies included); /health
answers after."""

from __future__ import annotations

import asyncio
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


# --------------------------------------------------------------------------- under a budget

BUDGET = 2
NAMES = ("n0", "n1", "n2", "n3", "n4")
TEXTS = ("good", "bad movie", "x y z", "a")


@pytest.fixture(scope="module")
def budget_pool(tiny_base, tmp_path_factory):
    """Three adapter directories (ranks 4, 8, 16) and each one's probabilities for every
    text, served alone by a server without a budget (one text a request: no padding)."""
    from tests.unit.serving.test_store import save_adapter

    root = tmp_path_factory.mktemp("budget")
    dirs = [save_adapter(tiny_base.backbone(), root / f"r{r}", i, r=r)
            for i, r in enumerate((4, 8, 16))]
    service = build_service([AdapterSpec(f"d{i}", d, "sst2") for i, d in enumerate(dirs)],
                            tiny_base, max_length=32, max_batch=1, max_wait_ms=0, max_texts=4)

    async def reference():
        await service.start()
        try:
            return {(i, t): (await service.classify(f"d{i}", [t], None))["probabilities"][0]
                    for i in range(len(dirs)) for t in TEXTS}
        finally:
            await service.stop()

    return root, dirs, asyncio.run(reference())


def test_concurrent_add_remove_classify_under_a_budget(tiny_base, budget_pool):
    """A Hypothesis state machine on a server of budget 2 (5 names over 3 directories):
    adds, removes, and concurrent bursts of classify requests (mixed with an add and a
    remove); every answer equals the adapter's own answer served alone, unknown names 404,
    at most 2 adapters loaded, nothing pinned once the requests are answered."""
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

    from loralens.serving.bodies import RequestError

    root, dirs, ref = budget_pool
    seen = Counter()

    class Budgeted(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.service = build_service([], tiny_base, max_length=32, max_batch=4,
                                         max_wait_ms=2, max_texts=4, adapter_root=root,
                                         max_loaded=BUDGET)
            self.loop = asyncio.new_event_loop()
            self.loop.run_until_complete(self.service.start())
            self.live: dict[str, int] = {}  # name -> directory index

        def run(self, *coros):
            async def together():
                return await asyncio.gather(*coros, return_exceptions=True)

            return self.loop.run_until_complete(together())

        def add(self, name, d):
            return self.service.add_adapter(AdapterSpec(name, dirs[d]))

        def check_answer(self, name, text, got, d):
            if isinstance(got, RequestError):
                raise AssertionError(f"{name} ({text!r}): {got.status} {got.message}")
            if isinstance(got, BaseException):
                raise got
            want = ref[d, text]
            assert max(abs(a - b) for a, b in zip(got["probabilities"][0], want)) <= 1e-5
            seen["answered"] += 1

        @rule(name=st.sampled_from(NAMES), d=st.integers(0, len(dirs) - 1))
        def add_adapter(self, name, d):
            (out,) = self.run(self.add(name, d))
            if name in self.live:
                assert isinstance(out, RequestError) and out.status == 409
            else:
                assert not isinstance(out, BaseException), out
                self.live[name] = d
                seen["added"] += 1

        @rule(name=st.sampled_from(NAMES))
        def remove_adapter(self, name):
            (out,) = self.run(self.service.remove_adapter(name))
            if name in self.live:
                assert out is None
                del self.live[name]
                seen["removed"] += 1
            else:
                assert isinstance(out, RequestError) and out.status == 404

        @rule(calls=st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(TEXTS)),
                             min_size=1, max_size=8),
              add=st.one_of(st.none(), st.tuples(st.sampled_from(NAMES),
                                                 st.integers(0, len(dirs) - 1))),
              remove=st.one_of(st.none(), st.sampled_from(NAMES)))
        def burst(self, calls, add, remove):
            """Classify requests at once, with an add and a remove among them: requests
            for names neither added nor removed in the burst have a known answer."""
            changing = {n for n in (add and add[0], remove) if n}
            adding = bool(add) and add[0] not in self.live
            removing = remove is not None and remove in self.live
            coros = [self.service.classify(n, [t], None) for n, t in calls]
            if adding:
                coros.append(self.add(*add))
            if removing:
                coros.append(self.service.remove_adapter(remove))
            out = self.run(*coros)
            for (n, t), got in zip(calls, out):
                if n in changing:
                    continue  # raced with its own add or remove: either answer is right
                if n in self.live:
                    self.check_answer(n, t, got, self.live[n])
                else:
                    assert isinstance(got, RequestError) and got.status == 404, got
            if adding:
                assert not isinstance(out[len(calls)], BaseException), out[len(calls)]
                self.live[add[0]] = add[1]
            if removing:
                assert out[-1] is None, out[-1]
                del self.live[remove]
            seen["bursts"] += 1

        @invariant()
        def within_budget(self):
            store = self.service.store
            assert len(store.loaded) <= BUDGET
            assert set(store.known) == set(self.live) == set(self.service.backend.infos)
            assert set(store.loaded) <= set(self.live)
            assert not store.pins  # every request answered: nothing pinned

        def teardown(self):
            seen["evictions"] += self.service.store.stats.evictions
            self.loop.run_until_complete(self.service.stop())
            self.loop.close()

    Budgeted.TestCase.settings = settings(max_examples=25, stateful_step_count=10,
                                          deadline=None, derandomize=True, database=None,
                                          suppress_health_check=list(HealthCheck))
    Budgeted.TestCase().runTest()
    print(f"budgeted state machine: {dict(seen)}")
    assert seen["answered"] >= 50 and seen["added"] and seen["removed"], seen
    assert seen["evictions"], seen  # the budget was exceeded and adapters reloaded
