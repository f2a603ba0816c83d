"""The ingress's /metrics under ``--ray-replicas``: replicas' Prometheus texts joined into one,
each sample labelled with its replica, each family's HELP/TYPE once (text in, text out; no
Ray is started: ``aggregate_metrics`` is plain text processing)."""

from __future__ import annotations

from loralens.serving.ray_serve import aggregate_metrics

A = """\
# HELP loralens_adapters_loaded adapters loaded on the backend
# TYPE loralens_adapters_loaded gauge
loralens_adapters_loaded 2.0
# HELP loralens_adapter_requests_total classify requests served, by adapter
# TYPE loralens_adapter_requests_total counter
loralens_adapter_requests_total{adapter="sst2-a"} 3.0
loralens_adapter_requests_total{adapter="rte-b"} 1.0
"""

B = """\
# HELP loralens_adapters_loaded adapters loaded on the backend
# TYPE loralens_adapters_loaded gauge
loralens_adapters_loaded 1.0
# HELP loralens_adapter_requests_total classify requests served, by adapter
# TYPE loralens_adapter_requests_total counter
loralens_adapter_requests_total{adapter="sst2-a"} 5.0
"""


def test_samples_gain_a_replica_label_and_families_stay_together():
    assert aggregate_metrics({"r1": A, "r2": B}).splitlines() == [
        "# HELP loralens_adapters_loaded adapters loaded on the backend",
        "# TYPE loralens_adapters_loaded gauge",
        'loralens_adapters_loaded{replica="r1"} 2.0',
        'loralens_adapters_loaded{replica="r2"} 1.0',
        "# HELP loralens_adapter_requests_total classify requests served, by adapter",
        "# TYPE loralens_adapter_requests_total counter",
        'loralens_adapter_requests_total{replica="r1",adapter="sst2-a"} 3.0',
        'loralens_adapter_requests_total{replica="r1",adapter="rte-b"} 1.0',
        'loralens_adapter_requests_total{replica="r2",adapter="sst2-a"} 5.0',
    ]


def test_histogram_buckets_label_values_with_spaces_and_timestamps():
    text = ('# TYPE lat histogram\n'
            'lat_bucket{le="0.5",path="/a b"} 4.0 1700000000\n'
            'lat_sum 1.25\n'
            'lat_count{} 4.0\n')
    assert aggregate_metrics({'x"y': text}).splitlines() == [
        "# TYPE lat histogram",
        'lat_bucket{replica="x\\"y",le="0.5",path="/a b"} 4.0 1700000000',
        'lat_sum{replica="x\\"y"} 1.25',
        'lat_count{replica="x\\"y"} 4.0',
    ]


def test_a_family_only_one_replica_has_and_no_replicas():
    only_b = "# TYPE extra counter\nextra_total 7.0\n"
    out = aggregate_metrics({"r1": "# TYPE g gauge\ng 1.0\n", "r2": "# TYPE g gauge\ng 2.0\n"
                                                                     + only_b})
    assert out == ('# TYPE g gauge\ng{replica="r1"} 1.0\ng{replica="r2"} 2.0\n'
                   '# TYPE extra counter\nextra_total{replica="r2"} 7.0\n')
    assert aggregate_metrics({}) == ""


def test_without_ray_serve_the_error_names_the_extra(monkeypatch):
    import pytest

    from loralens.core.errors import ConfigError
    from loralens.serving.ray_serve import import_serve

    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # `import ray` fails
    with pytest.raises(ConfigError, match=r"pip install 'loralens\[serve\]'"):
        import_serve()


def test_rays_unload_waits_for_the_requests_in_flight():
    """Ray's multiplexer calls ``__del__`` on a thread when its LRU unloads an adapter: the
    adapter leaves the backend only once the request using it has finished, once only."""
    import asyncio
    import threading

    from loralens.serving.ray_serve import _Held

    removed, unloads = [], []

    class Backend:
        infos = {"a": object()}

        def remove(self, name):
            removed.append(name)
            del self.infos[name]

    class Service:
        backend = Backend()

        async def _run(self, fn, *args):
            return fn(*args)

    async def scenario():
        held = _Held(Service(), "a", on_unload=lambda: unloads.append(1))
        held.enter()  # a request in flight
        ray_thread = threading.Thread(target=held.__del__)
        ray_thread.start()
        await asyncio.sleep(0.2)
        assert removed == []  # still in use
        held.exit()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if removed:
                break
        await asyncio.get_running_loop().run_in_executor(None, ray_thread.join, 5)
        assert removed == ["a"] and unloads == [1]
        held.__del__()  # the garbage collector's later call does nothing
        assert removed == ["a"] and unloads == [1]

    asyncio.run(scenario())
