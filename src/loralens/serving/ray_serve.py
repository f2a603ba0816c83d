"""``loralens serve --ray-replicas K``: K replicas of the server on Ray Serve, one ingress.

Two deployments (Ray Serve's model multiplexing, an adapter being a "model"):

* ``AdapterReplica`` (K replicas, one CPU each): each builds the one-process server's
  :class:`~loralens.serving.server.Service` (tokenizer, backend, dynamic batcher) on its own
  copy of the base model, with no adapter loaded; an adapter is loaded by Ray's multiplexed
  loader (``@serve.multiplexed``) the first time a request for it reaches the replica, and
  removed when Ray's per-replica LRU unloads it.
* ``Ingress`` (FastAPI, ``@serve.ingress``): the same HTTP API as ``loralens serve``
  (``/health``, ``/metrics``, ``GET /v1/adapters``, ``GET /v1/models``, ``POST /v1/classify``
  in both body shapes and vLLM's ``POST /classify``; bodies are read and validated by
  :mod:`.bodies`, errors keep the ``{"error": ...}`` shape); it reads the adapter from the
  body and calls the replicas' handle with ``.options(multiplexed_model_id=adapter)``, so
  that Ray routes the request to a replica that holds the adapter (best-effort: Ray's
  router learns which replica holds which adapter from the replicas, a moment after a
  load). Each answer names its replica in the ``X-Replica`` header.

Who evicts: Ray. ``--max-loaded N`` becomes Ray's ``max_num_models_per_replica``; the
replica's own backend is given no budget, and Ray's unload removes the adapter from it.
The other way round (the store evicting on its own) would leave Ray advertising, and
routing to, a replica that no longer holds the adapter. Without ``--max-loaded`` a replica
keeps every adapter it has been asked for.

Metrics: each replica pushes its Prometheus text (the series of :mod:`.prometheus`) and
what it holds to a small Ray actor (the board) every :data:`PUSH_S` seconds; the ingress's
``GET /metrics`` joins them with a ``replica`` label (:func:`aggregate_metrics`), leaving out
a replica not heard from for :data:`STALE_S` seconds.

Ray is imported only here, and only when ``--ray-replicas`` is given.
"""

import asyncio
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

# no `from __future__ import annotations` here: the ingress's handlers are pickled by value
# into Ray, where a string annotation ("Request") could not be resolved
from fastapi import Request

from loralens.core.errors import ConfigError
from loralens.serving.sources import AdapterSpec

log = logging.getLogger(__name__)

REPLICA_HEADER = "X-Replica"
PUSH_S = 0.5  # how often a replica sends its metrics and adapters to the board
STALE_S = 15.0  # a replica silent for this long is left out of /metrics and /health
INSTALL = "pip install 'loralens[serve]'"


# --------------------------------------------------------------------------- metrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?(\s.*)$")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def aggregate_metrics(texts: Mapping[str, str]) -> str:
    """One Prometheus text exposition from several replicas' (``replica id -> text``):
    every sample gains the label ``replica="<id>"`` (first among its labels); a metric
    family's ``# HELP`` and ``# TYPE`` lines are written once, followed by the family's
    samples from every replica in the order given (the format wants a family's samples
    together). Families keep the order in which they are first seen."""
    families: dict[str, dict] = {}
    for replica, text in texts.items():
        label = f'replica="{_escape(replica)}"'
        current = None
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    current = families.setdefault(parts[2], {"HELP": None, "TYPE": None,
                                                             "samples": []})
                    if current[parts[1]] is None:
                        current[parts[1]] = line
                continue
            m = _SAMPLE.match(line)
            if m is None:
                continue
            name, labels, rest = m.group(1), m.group(2), m.group(3)
            labels = "{" + label + ("," + labels[1:] if labels not in (None, "{}") else "}")
            if current is None:  # a sample without a header: its own family
                current = families.setdefault(name, {"HELP": None, "TYPE": None,
                                                     "samples": []})
            current["samples"].append(name + labels + rest)
    out = []
    for fam in families.values():
        out += [x for x in (fam["HELP"], fam["TYPE"]) if x is not None]
        out += fam["samples"]
    return "\n".join(out) + "\n" if out else ""


# --------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class RayServeConfig:
    """What every replica needs to build its service (pickled into the deployments)."""
    model: object  # a loralens.core.config.ModelConfig
    specs: tuple[AdapterSpec, ...]  # every adapter the replicas may load (name -> directory)
    replicas: int = 2
    backend: str = "ours"
    max_length: int = 384
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_texts: int = 64
    max_body_bytes: int = 1 << 20
    max_loaded: int | None = None  # Ray's max_num_models_per_replica (None: no limit)
    threads: int = 1  # torch threads per replica
    cpus_per_replica: float = 1.0


def import_serve():
    """Ray Serve, or a clear error naming the extra to install."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ConfigError(f"--ray-replicas needs Ray Serve: {INSTALL}") from None
    return ray, serve


# --------------------------------------------------------------------------- the application

def build_app(cfg: RayServeConfig):
    """The Ray Serve application (ingress bound to K replicas and a metrics board); run it
    with ``serve.run(build_app(cfg), route_prefix="/")``."""
    ray, serve = import_serve()
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from prometheus_client import CONTENT_TYPE_LATEST
    from starlette.responses import Response

    from loralens.serving.bodies import (BodyLimit, OpenAIClassifyIn, RequestError,
                                         classify_body, read_body)
    from loralens.serving.server import _error_handlers

    if cfg.replicas < 1:
        raise ConfigError(f"--ray-replicas must be >= 1 (got {cfg.replicas})")
    if cfg.max_loaded is not None and cfg.max_loaded < 1:
        raise ConfigError(f"--max-loaded must be >= 1 (got {cfg.max_loaded})")
    registry = {s.name: s for s in cfg.specs}
    limit = cfg.max_loaded or -1  # Ray's "no limit"

    @ray.remote(num_cpus=0)
    class Board:
        """The replicas' latest metrics text and state, by replica id."""

        def __init__(self):
            self.seen: dict[str, tuple[float, str, dict]] = {}

        def put(self, replica: str, text: str, state: dict) -> None:
            self.seen[replica] = (time.time(), text, state)

        def drop(self, replica: str) -> None:
            self.seen.pop(replica, None)

        def get(self) -> dict:
            now = time.time()
            return {r: (text, state) for r, (t, text, state) in self.seen.items()
                    if now - t <= STALE_S}

    @serve.deployment(num_replicas=cfg.replicas,
                      ray_actor_options={"num_cpus": cfg.cpus_per_replica})
    class AdapterReplica:
        def __init__(self, board):
            import torch
            from prometheus_client import Counter

            from loralens.models.classifier import load_base
            from loralens.serving.prometheus import ServerMetrics
            from loralens.serving.server import build_service

            torch.set_num_threads(max(1, cfg.threads))
            self.rid = serve.get_replica_context().replica_id.unique_id
            base = load_base(cfg.model)
            self.service = build_service([], base, cfg.backend, cfg.max_length, cfg.max_batch,
                                         cfg.max_wait_ms, cfg.max_texts, None)
            self.service.metrics = self.metrics = ServerMetrics(self.service)
            # Ray's multiplexer loads and unloads; counted here, in the replica's registry
            self.loads = Counter("loralens_ray_adapter_loads", "adapters loaded by Ray "
                                 "Serve's multiplexer on this replica",
                                 registry=self.metrics.registry)
            self.unloads = Counter("loralens_ray_adapter_unloads", "adapters unloaded by Ray "
                                   "Serve's multiplexer (its LRU, max_num_models_per_replica)",
                                   registry=self.metrics.registry)
            self.board = board
            self.started_lock = asyncio.Lock()
            self.running = False
            self.stop = threading.Event()
            threading.Thread(target=self._push_loop, daemon=True,
                             name="loralens-board").start()

        def _state(self) -> dict:
            st = self.service.stats
            return {"infos": {n: i.to_dict() for n, i in list(self.service.backend.infos.items())},
                    "base": self.service.base_name, "requests": st.requests,
                    "batches": st.batches, "mixed_batches": st.mixed_batches, "rows": st.rows}

        def _push_loop(self) -> None:
            from prometheus_client import generate_latest

            while not self.stop.is_set():
                try:
                    self.board.put.remote(self.rid, generate_latest(self.metrics.registry)
                                          .decode(), self._state())
                except Exception as e:  # the board gone (shutdown): nothing to report to
                    log.debug(f"replica {self.rid}: metrics push failed: {e}")
                self.stop.wait(PUSH_S)

        async def _ensure_started(self) -> None:
            async with self.started_lock:
                if not self.running:
                    await self.service.start()
                    self.running = True

        @serve.multiplexed(max_num_models_per_replica=limit)
        async def adapter(self, name: str) -> "_Held":
            from loralens.serving.backends import AdapterInfo
            from loralens.tasks.registry import get_task

            spec = registry[name]
            await self._ensure_started()
            if name not in self.service.backend.infos:
                info = AdapterInfo(spec.name, str(spec.path), 0, spec.task,
                                   get_task(spec.task).label_names if spec.task else None)
                await self.service._run(self.service.backend.add, info, spec.path)
            self.loads.inc()
            log.info(f"replica {self.rid}: loaded adapter {name!r}")
            return _Held(self.service, name, self.unloads.inc)

        async def classify(self, kind: str, payload) -> dict:
            name = serve.get_multiplexed_model_id()
            try:
                try:
                    held = await self.adapter(name)
                except RequestError:
                    raise
                except KeyError:
                    raise RequestError(404, f"unknown adapter {name!r}") from None
                except Exception as e:  # the adapter's files: a client-visible 422
                    raise RequestError(422, str(e)) from None
                held.enter()
                try:
                    if kind == "openai":
                        body = await self.service.classify_openai(name, payload)
                    else:
                        body = await self.service.classify(name, payload["texts"],
                                                           payload["pairs"])
                finally:
                    held.exit()
                return {"status": 200, "body": body, "replica": self.rid}
            except RequestError as e:
                return {"status": e.status, "body": {"error": e.message}, "replica": self.rid}

        def __del__(self):
            stop = getattr(self, "stop", None)
            if stop is not None:
                stop.set()

    app = FastAPI(title="loralens (Ray Serve)", docs_url=None, redoc_url=None)
    _error_handlers(app)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)

    def unknown(name: str, what: str) -> str:
        names = list(registry)
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        return f"unknown {what} {name!r}; known: {shown or 'none'}"

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Ingress:
        def __init__(self, replicas, board):
            self.replicas, self.board = replicas, board
            self.started = time.time()

        async def _seen(self) -> dict:
            return await self.board.get.remote()

        @app.get("/health")
        async def health(self):
            seen = await self._seen()
            totals = {k: sum(s[k] for _, s in seen.values())
                      for k in ("requests", "batches", "mixed_batches", "rows")}
            return {"status": "ok", "backend": cfg.backend, "adapters": len(registry),
                    **totals, "uptime_s": round(time.time() - self.started, 3),
                    "replicas": len(seen)}

        @app.get("/metrics")
        async def metrics(self):
            seen = await self._seen()
            text = aggregate_metrics({r: seen[r][0] for r in sorted(seen)})
            return Response(text, media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/adapters")
        async def list_adapters(self):
            seen = await self._seen()
            out = []
            for name, spec in registry.items():
                holders = sorted(r for r, (_, s) in seen.items() if name in s["infos"])
                info = next((seen[r][1]["infos"][name] for r in holders), None)
                if info is None:
                    labels = _label_names(spec.task)
                    info = {"name": name, "source": str(spec.path),
                            "num_labels": len(labels) if labels else 0, "task": spec.task,
                            "label_names": labels}
                out.append({**info, "replicas": holders})
            return {"adapters": out}

        @app.get("/v1/models")
        async def list_models(self):
            seen = await self._seen()
            base = next((s["base"] for _, s in seen.values()), getattr(cfg.model, "name", None))
            return {"object": "list", "data": [
                {"id": n, "object": "model", "created": int(self.started),
                 "owned_by": "loralens", "root": str(s.path), "parent": base,
                 "max_model_len": cfg.max_length} for n, s in registry.items()]}

        async def _answer(self, body):
            if isinstance(body, OpenAIClassifyIn):
                name, rows, kind, payload, what = (body.model, body.rows(), "openai",
                                                   body.rows(), "model")
            else:
                name, rows, kind, what = body.adapter, body.texts or body.pairs, "ours", \
                    "adapter"
                payload = {"texts": body.texts, "pairs": body.pairs}
            if len(rows) > cfg.max_texts:
                raise RequestError(413, f"{len(rows)} inputs in one request; "
                                        f"the limit is {cfg.max_texts}")
            if name not in registry:
                raise RequestError(404, unknown(name, what))
            out = await self.replicas.options(multiplexed_model_id=name).classify.remote(
                kind, payload)
            return JSONResponse(out["body"], status_code=out["status"],
                                headers={REPLICA_HEADER: out["replica"]})

        @app.post("/v1/classify")
        async def classify(self, request: Request):
            return await self._answer(await read_body(request, classify_body))

        @app.post("/classify")
        async def classify_openai(self, request: Request):
            return await self._answer(await read_body(request, OpenAIClassifyIn))

    board = Board.remote()
    return Ingress.bind(AdapterReplica.bind(board), board)


def _label_names(task: str | None) -> list[str] | None:
    from loralens.tasks.registry import get_task

    return list(get_task(task).label_names) if task else None


class _Held:
    """What Ray's multiplexer caches for a loaded adapter. Ray calls ``__del__`` (on a
    thread) when its LRU unloads the adapter: the adapter is removed from the replica's
    backend once no request in flight uses it (a request counts itself in with
    :meth:`enter` right after Ray hands it this object, with no await in between)."""

    def __init__(self, service, name: str, on_unload=lambda: None):
        self.service, self.name, self.on_unload = service, name, on_unload
        self.loop = asyncio.get_running_loop()
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.unloaded = False

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def exit(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()

    async def _unload(self) -> None:
        await self.idle.wait()
        if self.name in self.service.backend.infos:
            await self.service._run(self.service.backend.remove, self.name)
        self.on_unload()
        log.info(f"unloaded adapter {self.name!r}")

    def __del__(self):
        # Ray calls this once (on a thread) when it unloads; the garbage collector calls it
        # again later: only the first call does anything
        if getattr(self, "unloaded", True):
            return
        self.unloaded = True
        fut = asyncio.run_coroutine_threadsafe(self._unload(), self.loop)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self.loop:
            fut.result(timeout=120)


# --------------------------------------------------------------------------- the command

def serve_replicas(cfg: RayServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start (or join, with ``$RAY_ADDRESS``) Ray, run the app on Ray Serve's HTTP proxy at
    ``host:port`` until SIGTERM or Ctrl-C, then shut Serve down."""
    import signal

    ray, serve = import_serve()

    def stop(signum, frame):  # SIGTERM, also while Serve is starting: stop as Ctrl-C does
        raise KeyboardInterrupt

    joined = bool(os.environ.get("RAY_ADDRESS"))  # ray.init() joins that cluster
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        signal.signal(signal.SIGTERM, stop)  # over Ray's own handler
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(cfg), name="loralens", route_prefix="/")
        shown = f"[{host}]" if ":" in host else host
        log.info(f"listening on http://{shown}:{port} (Ray Serve, {cfg.replicas} replicas, "
                 f"{len(cfg.specs)} adapters)")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping: Ray Serve shuts the replicas down")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM: let shutdown finish
        try:
            if ray.is_initialized() and joined:  # a cluster others may use: our app only
                serve.delete("loralens")
            elif ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            signal.signal(signal.SIGTERM, previous)


def cli_command(args) -> int:
    """``loralens serve --ray-replicas K``: the adapters, base model and max_length chosen as
    ``loralens serve`` chooses them (:func:`loralens.serving.server.cli_command`); blocks
    until stopped."""
    from loralens.serving.auth import load_api_key
    from loralens.serving.server import base_model_config
    from loralens.serving.sources import served

    if args.ray_replicas < 1:
        raise ConfigError(f"--ray-replicas must be >= 1 (got {args.ray_replicas})")
    if getattr(args, "max_loaded", None) is not None and args.max_loaded < 1:
        raise ConfigError(f"--max-loaded must be >= 1 (got {args.max_loaded})")
    api_key = load_api_key(args.api_key_file)
    if api_key is not None:
        raise ConfigError("--ray-replicas does not support an API key yet (--api-key-file or "
                          "$LORALENS_API_KEY): put the ingress behind a proxy that checks one")
    import_serve()  # the clear message before the adapters are read
    sv = served(args.sources, args.max_length, args.replicate)
    model_cfg = base_model_config(args, sv.run_cfg, sv.specs)
    serve_replicas(config_from_args(args, sv.specs, model_cfg, sv.max_length), args.host,
                   args.port)
    return 0


def config_from_args(args, specs: Sequence[AdapterSpec], model_cfg,
                     max_length: int) -> RayServeConfig:
    """The replicas' configuration from ``loralens serve``'s arguments."""
    return RayServeConfig(model=model_cfg, specs=tuple(specs), replicas=args.ray_replicas,
                          backend=args.backend, max_length=max_length,
                          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                          max_texts=args.max_texts, max_body_bytes=args.max_body_bytes,
                          max_loaded=getattr(args, "max_loaded", None),
                          threads=args.threads or 1)
