"""``loralens serve --ray-replicas K``: K replicas of the server on Ray Serve, one ingress.

Two deployments (Ray Serve's model multiplexing, an adapter being a "model"):

* ``AdapterReplica`` (K replicas, one CPU each): each builds the one-process server's
  :class:`~loralens.serving.server.Service` (tokenizer, backend, dynamic batcher) on its own
  copy of the base model, with no adapter loaded; an adapter is loaded by Ray's multiplexed
  loader (``@serve.multiplexed``) the first time a request for it reaches the replica, and
  removed when Ray's per-replica LRU unloads it.
* ``Ingress`` (FastAPI, ``@serve.ingress``): the same HTTP API as ``loralens serve``
  (``/health``, ``/metrics``, ``GET``/``POST /v1/adapters``, ``DELETE /v1/adapters/{name}``,
  ``GET /v1/models``, ``POST /v1/classify`` in both body shapes and vLLM's ``POST /classify``;
  bodies are read and validated by :mod:`.bodies`, errors keep the ``{"error": ...}`` shape,
  the API key is checked by :class:`.auth.BearerAuth`); it reads the adapter from the
  body and calls the replicas' handle with ``.options(multiplexed_model_id=adapter)``, so
  that Ray routes the request to a replica that holds the adapter (best-effort: Ray's
  router learns which replica holds which adapter from the replicas, a moment after a
  load). Each answer names its replica in the ``X-Replica`` header.

The registry of known adapters is the ingress's (:class:`Registry`: the one-process
server's :class:`~loralens.serving.server.Service` checks and messages, over a backend that
loads nothing). Each request hands the replica a :class:`Ticket` (name, directory, task,
labels, and a token naming this registration), so an adapter added over HTTP needs no
broadcast to be loadable. A removal does: the ingress records it on the board, each replica
learns it with its next push, unloads the adapter through Ray's multiplexer and
acknowledges; ``DELETE`` answers once every replica heard from has (or after
:data:`REMOVE_WAIT_S`). A replica refuses a ticket whose token was removed, and reloads an
adapter whose token changed (removed and added again under the same name).

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
import uuid
from dataclasses import dataclass
from typing import Mapping, Sequence

# no `from __future__ import annotations` here: the ingress's handlers are pickled by value
# into Ray, where a string annotation ("Request") could not be resolved
from fastapi import Request

from loralens.core.errors import ConfigError
from loralens.serving.auth import OPEN_PATHS, BearerAuth, KeyDigest, declare_auth
from loralens.serving.backends import AdapterInfo, Backend
from loralens.serving.bodies import RequestError
from loralens.serving.sources import AdapterSpec

log = logging.getLogger(__name__)

REPLICA_HEADER = "X-Replica"
REMOVE_WAIT_S = 30.0  # how long DELETE waits for the replicas to acknowledge an unload
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
    adapter_root: str | None = None  # POST /v1/adapters reads only below it (None: nothing)
    api_key: "KeyDigest | None" = None  # checked at the ingress (None: no authentication)
    public_metrics: bool = False  # GET /metrics without the key
    # Ray's max_ongoing_requests per replica (None: Ray's default, 5; `serve` passes
    # --ray-max-ongoing, else --max-batch): past it, the router sends a request for an
    # adapter to another replica even when this one holds it
    replica_max_ongoing: int | None = None


def import_serve():
    """Ray Serve, or a clear error naming the extra to install."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ConfigError(f"--ray-replicas needs Ray Serve: {INSTALL}") from None
    return ray, serve


# --------------------------------------------------------------------------- the ingress's logic

def guard(app, key, public_metrics: bool = False) -> None:
    """The one-process server's authentication on ``app`` (a FastAPI app): with ``key`` (a
    :class:`KeyDigest` or an :class:`.auth.ApiKey`), every path but ``/health`` (and
    ``/metrics`` with ``public_metrics``) answers 401 without ``Authorization: Bearer KEY``,
    before the body is read (added after the body limit, so it runs first); the OpenAPI
    schema says so. A no-op without a key."""
    if key is None:
        return
    open_paths = OPEN_PATHS | {"/metrics"} if public_metrics else OPEN_PATHS
    declare_auth(app, open_paths)
    app.add_middleware(BearerAuth, key=key, open_paths=open_paths)


@dataclass(frozen=True)
class Ticket:
    """What a replica needs to load an adapter, sent with every request for it: ``token``
    names this registration (a name removed and added again gets a new one)."""
    name: str
    path: str
    task: str | None
    label_names: tuple[str, ...] | None
    token: str


class _Unloaded(Backend):
    """A backend that checks adapters as every backend does (:meth:`Backend.add`: the
    directory read, the head's labels against the task's) and loads none (the replicas
    load them)."""

    kind = "registry"

    def __init__(self):  # no base model
        self.infos: dict[str, AdapterInfo] = {}

    def _add(self, name, path, adapter) -> None:
        pass

    def _remove(self, name) -> None:
        pass


class _NoTokenizer:
    pad_token_id = None


class Registry:
    """The ingress's known adapters. Added and removed through the one-process server's
    :class:`~loralens.serving.server.Service` (its checks, status codes and messages: the
    name rule, 409 for a name in use, the adapter root's 403, a bad directory's or task's
    422, an unknown name's 404), over :class:`_Unloaded`. ``infos``: the adapters given on
    the command line (not read again here)."""

    def __init__(self, infos: Sequence[AdapterInfo], adapter_root: str | None = None,
                 max_length: int = 384, max_texts: int = 64):
        from loralens.serving.server import Service

        self.service = Service(_Unloaded(), _NoTokenizer(), max_length, max_texts=max_texts,
                               adapter_root=adapter_root)
        self.tokens: dict[str, str] = {}
        for info in infos:
            self.service.backend.infos[info.name] = info
            self.tokens[info.name] = uuid.uuid4().hex

    @property
    def infos(self) -> dict[str, AdapterInfo]:
        return self.service.backend.infos

    async def add(self, spec: AdapterSpec) -> AdapterInfo:
        info = await self.service.add_adapter(spec)
        self.tokens[info.name] = uuid.uuid4().hex
        return info

    async def remove(self, name: str) -> str:
        """Forget ``name`` (404 when unknown); its token."""
        await self.service.remove_adapter(name)
        return self.tokens.pop(name)

    def ticket(self, name: str, what: str = "adapter") -> Ticket:
        """The replicas' ticket for a known adapter; the single server's 404 otherwise."""
        info = self.infos.get(name)
        if info is None:
            raise RequestError(404, self.service.unknown_message(name, what))
        return Ticket(name, info.source, info.task,
                      tuple(info.label_names) if info.label_names else None, self.tokens[name])


# --------------------------------------------------------------------------- the application

def build_app(cfg: RayServeConfig):
    """The Ray Serve application (ingress bound to K replicas and a metrics board); run it
    with ``serve.run(build_app(cfg), route_prefix="/")``."""
    ray, serve = import_serve()
    from pathlib import Path

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from prometheus_client import CONTENT_TYPE_LATEST
    from starlette.responses import Response

    from loralens.serving.bodies import (AdapterIn, BodyLimit, OpenAIClassifyIn,
                                         classify_body, read_body)
    from loralens.serving.server import install_error_handlers

    if cfg.replicas < 1:
        raise ConfigError(f"--ray-replicas must be >= 1 (got {cfg.replicas})")
    if cfg.max_loaded is not None and cfg.max_loaded < 1:
        raise ConfigError(f"--max-loaded must be >= 1 (got {cfg.max_loaded})")
    # the adapters given, with their labels read here (the run's task files are registered
    # in this process); the ingress's Registry starts from them
    given = []
    for s in cfg.specs:
        labels = _label_names(s.task)
        given.append(AdapterInfo(s.name, str(s.path), len(labels) if labels else 0, s.task,
                                 tuple(labels) if labels else None))
    limit = cfg.max_loaded or -1  # Ray's "no limit"

    @ray.remote(num_cpus=0)
    class Board:
        """The replicas' latest metrics text and state, by replica id; and the adapters
        removed (token -> name), numbered by ``epoch``, which the replicas acknowledge."""

        def __init__(self):
            self.seen: dict[str, tuple[float, str, dict]] = {}
            self.removed: dict[str, str] = {}
            self.epoch = 0

        def put(self, replica: str, text: str, state: dict) -> tuple[int, dict]:
            self.seen[replica] = (time.time(), text, state)
            return self.epoch, self.removed

        def remove(self, name: str, token: str) -> int:
            self.removed[token] = name
            self.epoch += 1
            return self.epoch

        def drop(self, replica: str) -> None:
            self.seen.pop(replica, None)

        def get(self) -> dict:
            now = time.time()
            return {r: (text, state) for r, (t, text, state) in self.seen.items()
                    if now - t <= STALE_S}

    ongoing = ({"max_ongoing_requests": cfg.replica_max_ongoing}
               if cfg.replica_max_ongoing is not None else {})

    @serve.deployment(num_replicas=cfg.replicas,
                      ray_actor_options={"num_cpus": cfg.cpus_per_replica}, **ongoing)
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
                                   "Serve's multiplexer (its LRU, max_num_models_per_replica, "
                                   "or DELETE /v1/adapters)",
                                   registry=self.metrics.registry)
            self.board = board
            self.started_lock = asyncio.Lock()
            self.running = False
            self.loop = None  # the replica's event loop, once a request has come
            self.wanted: dict[str, Ticket] = {}  # the ticket each adapter is loaded from
            self.removed: dict[str, str] = {}  # tokens removed (token -> name)
            self.epoch = 0  # the board's removals applied here
            self.stop = threading.Event()
            threading.Thread(target=self._push_loop, daemon=True,
                             name="loralens-board").start()

        def _state(self) -> dict:
            st = self.service.stats
            return {"infos": {n: i.to_dict() for n, i in list(self.service.backend.infos.items())},
                    "base": self.service.base_name, "requests": st.requests,
                    "batches": st.batches, "mixed_batches": st.mixed_batches, "rows": st.rows,
                    "epoch": self.epoch}

        def _push_loop(self) -> None:
            from prometheus_client import generate_latest

            while not self.stop.is_set():
                try:
                    epoch, removed = ray.get(self.board.put.remote(
                        self.rid, generate_latest(self.metrics.registry).decode(),
                        self._state()), timeout=30)
                    if epoch > self.epoch:
                        self._apply_removals(removed)
                        self.epoch = epoch
                        continue  # acknowledge at once
                except Exception as e:  # the board gone (shutdown): nothing to report to
                    log.debug(f"replica {self.rid}: metrics push failed: {e}")
                self.stop.wait(PUSH_S)

        def _apply_removals(self, removed: dict) -> None:
            """On the push thread: note the removed tokens, and unload (on the replica's
            loop, waited for) the adapters this replica holds under one of them."""
            self.removed.update(removed)
            if self.loop is not None:
                asyncio.run_coroutine_threadsafe(self._forget(), self.loop).result(timeout=300)

        async def _forget(self) -> None:
            for name, held in list(_multiplexed(self).items()):
                if held.token in self.removed:
                    await _unload_one(self, name)
                    self.wanted.pop(name, None)

        async def _ensure_started(self) -> None:
            async with self.started_lock:
                if not self.running:
                    await self.service.start()
                    self.running = True

        @serve.multiplexed(max_num_models_per_replica=limit)
        async def adapter(self, name: str) -> "_Held":
            ticket = self.wanted[name]
            await self._ensure_started()
            if name not in self.service.backend.infos:
                info = AdapterInfo(name, ticket.path, 0, ticket.task, ticket.label_names)
                await self.service._run(self.service.backend.add, info, Path(ticket.path))
            self.loads.inc()
            log.info(f"replica {self.rid}: loaded adapter {name!r}")
            return _Held(self.service, name, self.unloads.inc, ticket.token)

        async def _held(self, ticket: Ticket, what: str) -> "_Held":
            """The adapter of ``ticket`` loaded through Ray's multiplexer (reloaded when
            loaded under another token); 404 when its token was removed."""
            self.loop = asyncio.get_running_loop()
            name = ticket.name
            for _ in range(2):
                if ticket.token in self.removed:
                    raise RequestError(404, self.service.unknown_message(name, what))
                self.wanted[name] = ticket
                try:
                    held = await self.adapter(name)
                except RequestError:
                    raise
                except Exception as e:  # the adapter's files: a client-visible 422
                    raise RequestError(409 if "already loaded" in str(e) else 422,
                                       str(e)) from None
                if held.token == ticket.token and ticket.token not in self.removed:
                    return held
                await _unload_one(self, name)  # another registration's adapter
            raise RequestError(404, self.service.unknown_message(name, what))

        async def load(self, ticket: Ticket) -> dict:
            """``POST /v1/adapters``: load the new adapter here (its errors are the POST's)."""
            try:
                await self._held(ticket, "adapter")
                return {"status": 200, "body": None, "replica": self.rid}
            except RequestError as e:
                return {"status": e.status, "body": {"error": e.message}, "replica": self.rid}

        async def classify(self, kind: str, payload, ticket: Ticket) -> dict:
            name = ticket.name
            try:
                held = await self._held(ticket, "model" if kind == "openai" else "adapter")
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
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    guard(app, cfg.api_key, cfg.public_metrics)  # outside the body limit: checked first

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Ingress:
        def __init__(self, replicas, board):
            self.replicas, self.board = replicas, board
            self.registry = Registry(given, cfg.adapter_root, cfg.max_length, cfg.max_texts)
            self.started = time.time()

        async def _seen(self) -> dict:
            return await self.board.get.remote()

        @app.get("/health")
        async def health(self):
            seen = await self._seen()
            totals = {k: sum(s[k] for _, s in seen.values())
                      for k in ("requests", "batches", "mixed_batches", "rows")}
            return {"status": "ok", "backend": cfg.backend,
                    "adapters": len(self.registry.infos), **totals,
                    "uptime_s": round(time.time() - self.started, 3), "replicas": len(seen)}

        @app.get("/metrics")
        async def metrics(self):
            seen = await self._seen()
            text = aggregate_metrics({r: seen[r][0] for r in sorted(seen)})
            return Response(text, media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/adapters")
        async def list_adapters(self):
            seen = await self._seen()
            out = []
            for name, known in list(self.registry.infos.items()):
                holders = sorted(r for r, (_, s) in seen.items() if name in s["infos"])
                info = next((seen[r][1]["infos"][name] for r in holders), None)
                out.append({**(info or known.to_dict()), "replicas": holders})
            return {"adapters": out}

        @app.post("/v1/adapters", status_code=201)
        async def add_adapter(self, request: Request):
            """Checked and registered here as the one-process server does, then loaded on
            one replica (Ray's choice): its errors (the base's shapes) are this answer's,
            and the adapter is forgotten again."""
            body = await read_body(request, AdapterIn)
            info = await self.registry.add(AdapterSpec(body.name, Path(body.path), body.task))
            ticket = self.registry.ticket(info.name)
            out = await self.replicas.options(multiplexed_model_id=info.name).load.remote(
                ticket)
            if out["status"] != 200:
                if self.registry.tokens.get(info.name) == ticket.token:
                    await self.registry.remove(info.name)
                await self.board.remove.remote(info.name, ticket.token)
                return JSONResponse(out["body"], status_code=out["status"])
            return JSONResponse(info.to_dict(), status_code=201,
                                headers={REPLICA_HEADER: out["replica"]})

        @app.delete("/v1/adapters/{name}")
        async def remove_adapter(self, name: str):
            """Forgotten here at once (later requests get 404), then unloaded on every
            replica: answered once every replica heard from acknowledges."""
            token = await self.registry.remove(name)
            epoch = await self.board.remove.remote(name, token)
            deadline = time.time() + REMOVE_WAIT_S
            while True:
                seen = await self._seen()
                if all(s.get("epoch", 0) >= epoch for _, s in seen.values()):
                    break
                if time.time() > deadline:
                    log.warning(f"adapter {name!r} removed; not every replica has unloaded it "
                                f"after {REMOVE_WAIT_S:.0f} s (they will when they next "
                                "report)")
                    break
                await asyncio.sleep(0.05)
            return {"removed": name}

        @app.get("/v1/models")
        async def list_models(self):
            seen = await self._seen()
            base = next((s["base"] for _, s in seen.values()), getattr(cfg.model, "name", None))
            return {"object": "list", "data": [
                {"id": n, "object": "model", "created": int(self.started),
                 "owned_by": "loralens", "root": i.source, "parent": base,
                 "max_model_len": cfg.max_length}
                for n, i in list(self.registry.infos.items())]}

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
            ticket = self.registry.ticket(name, what)  # the single server's 404
            out = await self.replicas.options(multiplexed_model_id=name).classify.remote(
                kind, payload, ticket)
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


_MULTIPLEX_ATTR = "__serve_multiplex_wrapper"  # where @serve.multiplexed keeps its cache


def _multiplexed(replica) -> dict:
    """The adapters Ray's multiplexer holds on ``replica`` (name -> :class:`_Held`)."""
    wrapper = getattr(replica, _MULTIPLEX_ATTR, None)
    return dict(wrapper.models) if wrapper is not None else {}


async def _unload_one(replica, name: str) -> None:
    """Unload ``name`` through Ray's multiplexer, as its LRU would (its ``__del__``, its
    counters, its report of the replica's model ids to the router). Ray has no public call
    for one named model: this uses its multiplexer's cache (``models``), its lock and its
    ``unload_model_lru`` (Ray 2.x's ``_ModelMultiplexWrapper``), with the adapter moved to
    the least recently used end first."""
    wrapper = getattr(replica, _MULTIPLEX_ATTR, None)
    if wrapper is None or name not in wrapper.models:
        return
    async with wrapper._model_cache_lock:
        if name not in wrapper.models:
            return
        wrapper.models.move_to_end(name, last=False)
        await wrapper.unload_model_lru()
        wrapper._push_multiplexed_replica_info = True


def _label_names(task: str | None) -> list[str] | None:
    from loralens.tasks.registry import get_task

    return list(get_task(task).label_names) if task else None


class _Held:
    """What Ray's multiplexer caches for a loaded adapter. Ray calls ``__del__`` (on a
    thread) when its LRU unloads the adapter: the adapter is removed from the replica's
    backend once no request in flight uses it (a request counts itself in with
    :meth:`enter` right after Ray hands it this object, with no await in between)."""

    def __init__(self, service, name: str, on_unload=lambda: None, token: str | None = None):
        self.service, self.name, self.on_unload = service, name, on_unload
        self.token = token  # the registration it was loaded for (Ticket.token)
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
    api_key = load_api_key(args.api_key_file)  # before Ray starts: a bad file fails fast
    import_serve()  # the clear message before the adapters are read
    sv = served(args.sources, args.max_length, args.replicate)
    model_cfg = base_model_config(args, sv.run_cfg, sv.specs)
    cfg = config_from_args(args, sv.specs, model_cfg, sv.max_length,
                           KeyDigest(api_key) if api_key is not None else None,
                           args.adapter_root or sv.run_dir)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning(f"warning: bound to {args.host}: reachable from other machines; the "
                    "ingress has no authentication (set $LORALENS_API_KEY or --api-key-file)")
    serve_replicas(cfg, args.host, args.port)
    return 0


def config_from_args(args, specs: Sequence[AdapterSpec], model_cfg, max_length: int,
                     api_key: KeyDigest | None = None, adapter_root=None) -> RayServeConfig:
    """The replicas' configuration from ``loralens serve``'s arguments; ``adapter_root`` as
    the one-process server chooses it (``--adapter-root``, else the run directory served)."""
    ongoing = getattr(args, "ray_max_ongoing", None)
    ongoing = args.max_batch if ongoing is None else ongoing
    if ongoing < 1:
        raise ConfigError(f"--ray-max-ongoing: expected at least 1, got {ongoing}")
    return RayServeConfig(model=model_cfg, specs=tuple(specs), replicas=args.ray_replicas,
                          replica_max_ongoing=ongoing,
                          backend=args.backend, max_length=max_length,
                          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                          max_texts=args.max_texts, max_body_bytes=args.max_body_bytes,
                          max_loaded=getattr(args, "max_loaded", None),
                          threads=args.threads or 1,
                          adapter_root=str(adapter_root) if adapter_root is not None else None,
                          api_key=api_key,
                          public_metrics=bool(getattr(args, "public_metrics", False)))
