"""One OpenMP pool per server process (serving/workers.py): the backend is built on the
thread that serves it, the loader's tensor work stays single-threaded."""

from __future__ import annotations

import threading

import torch

from loralens.serving import backends, server
from loralens.serving.server import AdapterSpec, build_service
from loralens.serving.workers import inference_executor, loader_executor


def test_backend_is_built_on_the_thread_that_serves_it(tiny_base, adapter_dir, monkeypatch):
    """The base's weights and the start-up adapters are loaded on the model thread that then
    runs every batch, not on the caller's (a second thread running large tensor ops makes a
    second OpenMP pool: 1.35x slower forwards, workers.py)."""
    seen = {}
    real_make, real_add = server.make_backend, backends.Backend.add

    def make(*a, **k):
        seen["make"] = threading.get_ident()
        return real_make(*a, **k)

    def add(self, *a, **k):
        seen.setdefault("add", set()).add(threading.get_ident())
        return real_add(self, *a, **k)

    monkeypatch.setattr(server, "make_backend", make)
    monkeypatch.setattr(backends.Backend, "add", add)
    service = build_service([AdapterSpec("a", adapter_dir / "a")], tiny_base)
    try:
        worker = service.executor.submit(threading.get_ident).result()
        assert seen["make"] == worker and seen["add"] == {worker}
        assert worker != threading.get_ident()
        ids = torch.tensor([[5, 6, 7]])
        logits = service.executor.submit(service.backend.infer, ids, torch.ones_like(ids),
                                         ["a"]).result()
        assert logits.shape == (1, 2) and torch.isfinite(logits).all()
    finally:
        service.executor.shutdown(wait=True)
        service.loader.shutdown(wait=True)


def test_thread_counts_of_the_model_and_loader_threads():
    """The model thread runs with the creator's intra-op thread count (or the one given),
    the loader with 1; neither changes the creating thread's own count."""
    mine = torch.get_num_threads()
    ex, ex3, ld = inference_executor(), inference_executor(3), loader_executor()
    try:
        assert ex.submit(torch.get_num_threads).result() == mine
        assert ex3.submit(torch.get_num_threads).result() == 3
        assert ld.submit(torch.get_num_threads).result() == 1
        # set once, at the thread's start: later work on it sees the same count
        assert ld.submit(lambda: torch.ones(100_000).add_(1).sum().item()).result() == 200_000
        assert ld.submit(torch.get_num_threads).result() == 1
        assert ex.submit(torch.get_num_threads).result() == mine
        assert torch.get_num_threads() == mine
    finally:
        for e in (ex, ex3, ld):
            e.shutdown(wait=True)
