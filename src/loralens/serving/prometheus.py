"""``GET /metrics`` of ``loralens serve``: Prometheus text format, from prometheus-client.

Each app has its own registry (two servers in one process never share counts). Series::

    loralens_http_requests_total{endpoint, method, status}   every answer, errors included
    loralens_http_request_duration_seconds{endpoint, method}  latency histogram (to the
                                                               response's first byte)
    loralens_http_requests_in_progress                        requests being answered
    loralens_batch_rows{...}                                  rows per model batch (histogram)
    loralens_batch_adapters                                   distinct adapters per batch
    loralens_queue_wait_seconds                               arrival -> start of its batch
    loralens_queue_depth                                      requests waiting for a batch
    loralens_adapter_requests_total{adapter}                  classify requests per adapter
    loralens_adapter_rows_total{adapter}                      rows classified per adapter
    loralens_adapters_loaded                                  adapters loaded (in the stacks)
    loralens_adapters_known                                   adapters registered (loaded or not)
    loralens_adapter_store_{hits,misses,loads,evictions}_total  the adapter store (ours):
                                                               a request's adapter loaded or
                                                               not; reads from disk; evictions
    loralens_adapter_store_load_seconds                       miss -> adapter in the stacks
                                                               (histogram)
    loralens_adapter_store_bytes                              factor and head bytes held

``endpoint`` is the route's template (``/v1/adapters/{name}``), never the raw path, so
clients cannot grow the label set; a path no route matches is ``other``. vLLM's routes
(``/v1/models``, ``/classify``) are endpoints like the others, and the adapter series count
classify requests of either body shape, whichever path they came by.
"""

from __future__ import annotations

import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from starlette.responses import Response
from starlette.routing import Match

from loralens.serving.responses import ERRORS, ErrorOut

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# an adapter load: a few ms read and installed beside the running batch, a batch's length
# when it must wait for one; fine steps around the 50 ms goal of issue 29, so a p50
# interpolated inside a bucket is within 5-10 ms of the true one there
LOAD_BUCKETS = (0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075,
                0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """The metrics of one server; :meth:`observe_batch` is called by the worker thread
    (prometheus-client's metrics are thread-safe)."""

    def __init__(self, service):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("loralens_http_requests", "HTTP requests answered, by route "
                                "template, method and status", ["endpoint", "method", "status"],
                                registry=r)
        self.latency = Histogram("loralens_http_request_duration_seconds",
                                 "time to the response's start, by route template and method",
                                 ["endpoint", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_progress = Gauge("loralens_http_requests_in_progress",
                                 "HTTP requests being answered", registry=r)
        self.batch_rows = Histogram("loralens_batch_rows", "rows per model batch",
                                    buckets=ROW_BUCKETS, registry=r)
        self.batch_adapters = Histogram("loralens_batch_adapters",
                                        "distinct adapters per model batch",
                                        buckets=ROW_BUCKETS, registry=r)
        self.queue_wait = Histogram("loralens_queue_wait_seconds", "from a classify request's "
                                    "arrival in the queue to the start of its batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_requests = Counter("loralens_adapter_requests",
                                        "classify requests served, by adapter", ["adapter"],
                                        registry=r)
        self.adapter_rows = Counter("loralens_adapter_rows", "rows classified, by adapter",
                                    ["adapter"], registry=r)
        Gauge("loralens_queue_depth", "classify requests waiting for a batch",
              registry=r).set_function(lambda: service.queue.qsize() if service.queue else 0)
        store = getattr(service, "store", None)
        Gauge("loralens_adapters_loaded", "adapters loaded on the backend (in the stacks)",
              registry=r).set_function(lambda: len(store.lru) if store is not None
                                       else len(service.backend.infos))
        Gauge("loralens_adapters_known", "adapters registered, loaded or not",
              registry=r).set_function(lambda: len(service.backend.infos))
        if store is not None:
            self.load_seconds = Histogram(
                "loralens_adapter_store_load_seconds", "from a miss (or a batch's reload) to "
                "the adapter in the stacks: read, preparation, queueing, swap",
                buckets=LOAD_BUCKETS, registry=r)
            store.on_load = self.load_seconds.observe
            Gauge("loralens_adapter_store_bytes", "bytes of the loaded adapters' factors and "
                  "heads", registry=r).set_function(store.bytes_held)
            r.register(_StoreCounters(store))

    def observe_batch(self, requests, started: float) -> None:
        """One model batch: ``requests`` have ``.adapter``, ``.ids`` (rows) and
        ``.arrived`` (``time.perf_counter()``); ``started`` when the batch began."""
        self.batch_rows.observe(sum(len(p.ids) for p in requests))
        self.batch_adapters.observe(len({p.adapter for p in requests}))
        for p in requests:
            self.queue_wait.observe(max(0.0, started - p.arrived))
            self.adapter_requests.labels(p.adapter).inc()
            self.adapter_rows.labels(p.adapter).inc(len(p.ids))

    def exposition(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _StoreCounters:
    """The adapter store's counters (plain ints the store keeps), as Prometheus counters."""

    HELP = {"hits": "classify requests whose adapter was loaded on arrival",
            "misses": "classify requests whose adapter had to be loaded",
            "loads": "adapters read from disk into the stacks",
            "evictions": "adapters taken out of the stacks to make room"}

    def __init__(self, store):
        self.store = store

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        for key, text in self.HELP.items():
            yield CounterMetricFamily(f"loralens_adapter_store_{key}", text,
                                      value=getattr(self.store.stats, key))

    def describe(self):
        return list(self.collect())


# the OpenAPI of GET /metrics: text, and the errors every handler may answer
METRICS_RESPONSES = {
    200: {"description": "Prometheus text exposition format",
          "content": {"text/plain": {"schema": {"type": "string"}}}},
    **{code: {"model": ErrorOut, "description": ERRORS[code]} for code in (400, 405, 413)},
}


def install_metrics(app, service) -> ServerMetrics:
    """Add ``GET /metrics`` to a FastAPI ``app`` serving ``service``; the service's batcher
    reports its batches to the returned metrics."""
    metrics = ServerMetrics(service)
    service.metrics = metrics
    app.add_api_route("/metrics", metrics.exposition, methods=["GET"], operation_id="metrics",
                      responses=METRICS_RESPONSES, response_class=Response)
    return metrics


class MetricsMiddleware:
    """ASGI middleware, outermost: counts and times every HTTP answer, including those
    that inner middleware gives without reaching a route (401, 413)."""

    def __init__(self, app, metrics: ServerMetrics, routes):
        self.app, self.metrics, self.routes = app, metrics, routes

    def endpoint(self, scope) -> str:
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route.path
            if match == Match.PARTIAL and partial is None:  # the path, another method
                partial = route.path
        return partial or "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        m = self.metrics
        status, t0, took = 500, time.perf_counter(), None

        async def timed_send(message):
            nonlocal status, took
            if message["type"] == "http.response.start":
                status, took = message["status"], time.perf_counter() - t0
            await send(message)

        m.in_progress.inc()
        try:
            await self.app(scope, receive, timed_send)
        finally:
            m.in_progress.dec()
            endpoint, method = self.endpoint(scope), scope.get("method", "")
            m.requests.labels(endpoint, method, str(status)).inc()
            m.latency.labels(endpoint, method).observe(
                took if took is not None else time.perf_counter() - t0)
