"""After a burst of batches the server hands its freed heap back to the OS once it has been
idle ``Service.idle_trim_s`` seconds (``release_heap`` on the inference worker: never while a
batch runs), once per burst; a server that has served nothing, or has already trimmed since
its last batch, does not trim again. Fake backend and tokenizer (no model)."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from loralens.serving import server as S
from loralens.serving.server import Service, create_app
from tests.unit.serving.test_server_openai import FakeBackend, FakeTokenizer, adapters


@pytest.fixture
def trims(monkeypatch):
    """Each release_heap call: (the thread it ran on, whether a batch was running)."""
    calls, running = [], threading.Event()
    monkeypatch.setattr(S, "release_heap",
                        lambda: calls.append((threading.current_thread().name,
                                              running.is_set())))
    return calls, running


def wait_for(cond, seconds=10.0):
    end = time.monotonic() + seconds
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_an_idle_server_trims_once_per_burst_on_the_worker(trims):
    calls, running = trims
    backend = FakeBackend(adapters())
    infer = backend.infer

    def marked(*a):  # the batch is running while this runs
        running.set()
        try:
            return infer(*a)
        finally:
            running.clear()

    backend.infer = marked
    service = Service(backend, FakeTokenizer(), max_length=64, max_wait_ms=0,
                      idle_trim_s=0.05)
    with TestClient(create_app(service)) as client:
        time.sleep(0.3)  # six idle windows before any batch: nothing to hand back
        assert calls == []
        for _ in range(3):  # one burst
            r = client.post("/v1/classify", json={"adapter": "sst2-a", "texts": ["ab", "c"]})
            assert r.status_code == 200, r.text
        assert wait_for(lambda: len(calls) == 1)
        time.sleep(0.3)  # idle on: no second trim without a batch in between
        assert len(calls) == 1
        r = client.post("/v1/classify", json={"adapter": "rte-a", "pairs": [["a", "b"]]})
        assert r.status_code == 200, r.text
        assert wait_for(lambda: len(calls) == 2)
    assert all(name.startswith("loralens-infer") and not busy for name, busy in calls), calls


def test_idle_trim_off(trims):
    calls, _ = trims
    service = Service(FakeBackend(adapters()), FakeTokenizer(), max_length=64, max_wait_ms=0,
                      idle_trim_s=None)
    with TestClient(create_app(service)) as client:
        r = client.post("/v1/classify", json={"adapter": "sst2-a", "texts": ["ab"]})
        assert r.status_code == 200, r.text
        time.sleep(0.3)
    assert calls == []


def test_release_heap_collects_and_trims(monkeypatch):
    done = []
    monkeypatch.setattr(S, "trim_heap", lambda: done.append("trim") or True)
    monkeypatch.setattr("gc.collect", lambda: done.append("gc") or 0)
    S.release_heap()
    assert done == ["gc", "trim"]
