"""``loralens serve``: an HTTP classification server for many LoRA adapters on one base.

Built on FastAPI (routing, request validation with pydantic) and uvicorn (the
ASGI server). The base model is loaded once; every adapter given (a run
directory's LoRA adapters, or adapter directories) is added to one backend
(:mod:`loralens.serving.backends`; ``ours`` by default).

Endpoints::

    GET    /health                  {"status": "ok", "backend": ..., "adapters": n}
    GET    /metrics                 Prometheus text (:mod:`.metrics`)
    GET    /v1/adapters             {"adapters": [{"name", "task", "num_labels", "label_names",
                                     "source", "loaded"}], "known", "loaded", "max_loaded"}
    POST   /v1/adapters             {"name": "x", "path": "/dir/adapter", "task": "sst2"?}  -> 201
    DELETE /v1/adapters/{name}
    POST   /v1/classify             {"adapter": "x", "texts": ["..."]}  or  "pairs": [["s1", "s2"]]
        -> {"adapter", "labels": [int], "label_names": [str]|null, "probabilities": [[float]]}

vLLM's and SGLang's classification API, for their clients (an adapter is a model)::

    GET    /v1/models               {"object": "list", "data": [{"id": adapter, "object": "model",
                                     "created", "owned_by", "root", "parent", "max_model_len"}]}
    POST   /classify, /v1/classify  {"model": "x", "input": "..." | ["...", ...] | [["s1", "s2"]]}
        -> {"id": "classify-...", "object": "list", "created", "model",
            "data": [{"index", "label", "probs", "num_classes"}],
            "usage": {"prompt_tokens", "total_tokens", "completion_tokens"}}

``/v1/classify`` answers in the shape it was asked in (a body naming ``model`` or
``input`` is vLLM's). Errors keep the server's one shape, ``{"error": "..."}``, on every
path (also where the 401 of the API key or the 413 of the body limit answer).

Tokenization is training's (:func:`loralens.training.batches.encode_texts`: ``s1 <eos> s2``,
truncated to ``max_length``). Dynamic batching: requests wait at most
``max_wait_ms`` for others, whatever their adapter, and run together as one
batch of up to ``max_batch`` rows; on the ``ours`` backend a batch mixing
adapters is one forward pass. All model work (inference, adding and removing
adapters over HTTP) runs on ONE worker thread, so no adapter a batch uses is changed
under it; the event loop only parses, validates and queues. With an adapter
budget (``--max-loaded``, :mod:`.store`) an adapter not loaded is read from disk and
written into free rows of the stacks on a loader thread, while a batch runs (never a row
that batch reads; the next batch uses it); only where that is not possible (a stack would
grow, or every evictable adapter is in use) does the swap run on the worker, between
batches.

Request bodies are JSON whatever their Content-Type says (``curl -d`` sends
``application/x-www-form-urlencoded``). Bad input is a 4xx with ``{"error": "..."}``
and never stops the server: malformed JSON 400; wrong types, missing or extra keys,
empty lists or strings 422; unknown adapter 404; too many texts, or a body over
``max_body_bytes``, 413. The server binds to 127.0.0.1 unless told otherwise.

Modules: :mod:`.sources` (which adapters), :mod:`.bodies` (request bodies, limits),
:mod:`.auth` (the optional bearer token: every endpoint but /health), :mod:`.metrics`.
On SIGTERM the server stops accepting, answers the requests it has, and exits 0.
The base model is the run's (name, revision, trust_remote_code from its config)
when a run directory is served, loaded through :func:`loralens.models.classifier.load_base`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from fastapi import Request  # module level: handlers' annotations are resolved from here

from loralens.training.batches import collate, encode_texts
from loralens.models.classifier import Base, load_base
from loralens.tasks.registry import get_task
from loralens.serving.backends import (
    AdapterError, AdapterInfo, Backend, check_max_loaded, make_backend,
)
from loralens.serving.bodies import (
    AdapterIn, BodyLimit, ClassifyIn, OpenAIClassifyIn, RequestError, classify_body,
    json_body_schema, read_body,
)
from loralens.serving.auth import BearerAuth, declare_auth, load_api_key
from loralens.serving.cli_args import DEFAULT_MAX_BODY
from loralens.serving.prometheus import MetricsMiddleware, install_metrics
from loralens.serving.responses import (
    ADDED_LINKS, MODELS_LINKS, AdapterOut, AdaptersOut, ClassifyOut, HealthOut, ModelsOut, OpenAIClassifyOut,
    RemovedOut, responses,
)
from loralens.serving.sources import (
    NAME_RULE, AdapterSpec, collect_adapters, replicate, served, task_of, valid_name,
)
from loralens.serving.store import trim_heap
from loralens.serving.workers import inference_executor, loader_executor
from loralens.core.errors import ConfigError

__all__ = ["AdapterSpec", "RequestError", "Service", "build_service",
           "collect_adapters", "create_app", "replicate", "serve"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the service

@dataclass(eq=False)
class _Pending:
    adapter: str
    ids: list[list[int]]
    future: asyncio.Future
    arrived: float


@dataclass
class ServiceStats:
    requests: int = 0
    rows: int = 0
    batches: int = 0
    mixed_batches: int = 0
    started: float = field(default_factory=time.time)


IDLE_TRIM_S = 1.0


def release_heap() -> None:
    """Collect Python's garbage and hand the C heap's free pages back to the OS
    (``store.trim_heap``). Run on the inference worker once it has been idle for
    ``Service.idle_trim_s`` after a batch: a burst of batches (mixed ones above all, whose
    gathered factors are per-batch copies) leaves freed pages that glibc would otherwise
    keep in the server's RSS for good."""
    import gc

    gc.collect()
    trim_heap()


class Service:
    """Tokenizer + backend + dynamic batcher. Create inside a running event loop's app."""

    def __init__(self, backend: Backend, tokenizer, max_length: int, max_batch: int = 32,
                 max_wait_ms: float = 5.0, max_texts: int = 64,
                 adapter_root: str | Path | None = None, base_name: str | None = None,
                 idle_trim_s: float | None = IDLE_TRIM_S,
                 executor: ThreadPoolExecutor | None = None):
        if max_batch < 1 or max_texts < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_texts must be >= 1, max_wait_ms >= 0")
        self.backend, self.tokenizer = backend, tokenizer
        self.max_length, self.max_batch = max_length, max_batch
        self.max_wait, self.max_texts = max_wait_ms / 1000.0, max_texts
        # POST /v1/adapters reads only below this directory (None: it reads nothing)
        self.adapter_root = Path(adapter_root).resolve() if adapter_root is not None else None
        self.pad_id = tokenizer.pad_token_id
        self.base_name = base_name  # the base model's name, the adapters' "parent" model
        # the one model thread (:mod:`.workers`: one OpenMP pool per process); ``executor``:
        # the one the backend was built on (build_service)
        self.executor = executor if executor is not None else inference_executor()
        # the adapter store (ours backend): adapters not loaded are read on this thread,
        # never on the event loop or the inference worker
        self.store = getattr(backend, "store", None)
        self.loader = loader_executor()
        self._loading: dict[str, asyncio.Future] = {}
        self.queue: asyncio.Queue[_Pending] | None = None
        self.task: asyncio.Task | None = None
        self.stats = ServiceStats()
        self.metrics = None  # a metrics.ServerMetrics once an app serves this service
        # after a batch, this many seconds without a request hand the freed heap back to the
        # OS (release_heap on the worker, so never during a batch); None: never
        self.idle_trim_s = idle_trim_s

    # ---- lifecycle (called by the app's lifespan)
    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._batch_loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=True)
        self.loader.shutdown(wait=True)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- adapters
    async def add_adapter(self, spec: AdapterSpec) -> AdapterInfo:
        if not valid_name(spec.name):
            raise RequestError(422, f"adapter name {spec.name!r}: {NAME_RULE}")
        if spec.name in self.backend.infos:
            raise RequestError(409, f"adapter {spec.name!r} is already loaded; remove it first")
        if "\x00" in str(spec.path) or "\x00" in (spec.task or ""):  # no OS call takes one
            raise RequestError(422, "path and task must not contain a NUL character")
        self.check_allowed(spec.path)
        task = spec.task
        labels = None
        try:
            if task is None:
                task = task_of(spec.path)[0]
            if task is not None:
                labels = get_task(task).label_names
        except (KeyError, ValueError, OSError) as e:  # OSError: e.g. a name too long
            raise RequestError(422, str(e).strip("'\"")) from None
        info = AdapterInfo(spec.name, str(spec.path), 0, task, labels)
        try:
            return await self._run(self.backend.add, info, spec.path)
        except AdapterError as e:
            raise RequestError(409 if "already loaded" in str(e) else 422, str(e)) from None

    async def ensure_loaded(self, name: str) -> bool:
        """Load a known adapter into the store if it is not loaded (True: it was, a hit).
        Concurrent calls for one adapter share one load; the read from disk runs on the
        loader thread and only the swap into the stacks on the inference worker (between
        batches), so requests for loaded adapters go on meanwhile. A no-op without a store."""
        if self.store is None or self.store.count(name):
            return True
        fut = self._loading.get(name)
        if fut is None:
            fut = self._loading[name] = asyncio.ensure_future(self._load(name))
            fut.add_done_callback(lambda f, n=name: self._loading.pop(n, None))
        await asyncio.shield(fut)
        return False

    async def _load(self, name: str) -> None:
        """Read ``name`` and install it on the loader thread while the worker's batch runs
        (:meth:`.store.AdapterStore.install_now`); where that is not possible without
        touching what the running batch reads, install it on the worker between batches.
        ``t0``, the miss, starts the store's load latency (``on_load``)."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()

        def read_and_install():
            adapter = self.store.prepare(name)
            return adapter, self.store.install_now(name, adapter, t0)

        try:
            adapter, done = await loop.run_in_executor(self.loader, read_and_install)
        except KeyError:
            raise RequestError(404, self.unknown_message(name)) from None
        except (OSError, ValueError, NotImplementedError) as e:
            raise RequestError(422, f"adapter {name!r} could not be loaded: {e}") from None
        if done is None:
            await loop.run_in_executor(self.executor, self.store.install, name, adapter, (), t0)

    async def _queued(self, info: AdapterInfo, ids: list[list[int]]) -> torch.Tensor:
        """Logits of ``ids`` for ``info``'s adapter from the batcher, the adapter loaded first
        and pinned (not evicted for another's load) while the request waits."""
        if self.store is None:
            return await self._submit(info, ids)
        self.store.pin(info.name)
        try:
            await self.ensure_loaded(info.name)
            return await self._submit(info, ids)
        finally:
            self.store.unpin(info.name)

    async def _submit(self, info: AdapterInfo, ids: list[list[int]]) -> torch.Tensor:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(info.name, ids, fut, time.perf_counter()))
        return await fut

    def adapters(self) -> dict:
        """``GET /v1/adapters``: every known adapter (``loaded``: in the store's stacks now),
        and the counts."""
        infos = self.backend.infos.values()
        loaded = set(self.store.loaded) if self.store is not None else set(self.backend.infos)
        return {"adapters": [{**i.to_dict(), "loaded": i.name in loaded} for i in infos],
                "known": len(self.backend.infos), "loaded": len(loaded),
                "max_loaded": self.store.max_loaded if self.store is not None else None}

    def check_allowed(self, path: Path) -> None:
        """A client's path must resolve (symbolic links followed) below the adapter root:
        the server reads no file outside it on a client's say-so (403 otherwise)."""
        if self.adapter_root is None:
            raise RequestError(403, "this server takes no adapter paths over HTTP: start it "
                                    "with --adapter-root DIR to allow adapters below DIR")
        try:
            resolved = Path(path).resolve()
        except (OSError, RuntimeError, ValueError) as e:  # a loop of links, a name too long
            raise RequestError(422, f"path {str(path)!r}: {e}") from None
        if resolved != self.adapter_root and self.adapter_root not in resolved.parents:
            raise RequestError(403, f"path {str(path)!r} is outside the server's adapter root "
                                    f"{str(self.adapter_root)!r} (--adapter-root)")

    async def remove_adapter(self, name: str) -> None:
        if name not in self.backend.infos:
            raise RequestError(404, self.unknown_message(name))
        try:
            await self._run(self.backend.remove, name)
        except KeyError:
            raise RequestError(404, self.unknown_message(name)) from None

    def unknown_message(self, name: str, what: str = "adapter") -> str:
        """The 404 message for an adapter (or, as vLLM says, a model) this server does not
        know: it lists the first 20 it does (the Ray Serve ingress answers with it too)."""
        names = self.backend.names
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        return f"unknown {what} {name!r}; loaded: {shown or 'none'}"

    def models(self) -> dict:
        """``GET /v1/models``: every adapter as a model, as vLLM lists its LoRA adapters."""
        created = int(self.stats.started)
        return {"object": "list", "data": [
            {"id": i.name, "object": "model", "created": created, "owned_by": "loralens",
             "root": i.source, "parent": self.base_name, "max_model_len": self.max_length}
            for i in self.backend.infos.values()]}

    # ---- classification
    def encode(self, info: AdapterInfo, texts: list[str] | None,
               pairs: list[list[str]] | None, field: str | None = None) -> list[list[int]]:
        """Token ids of each row. ``field``: the request's input field (vLLM's ``input``),
        named in the errors instead of today's ``texts``/``pairs``."""
        rows = texts if texts is not None else pairs
        if info.task is not None:
            pair_task = get_task(info.task).is_pair
            if pair_task and texts is not None:
                raise RequestError(422, f"adapter {info.name!r} classifies sentence pairs "
                                        f"({info.task}): send \"pairs\": [[s1, s2], ...]"
                                   if field is None else
                                   f"{field}: model {info.name!r} classifies sentence pairs "
                                   f"({info.task}): send \"{field}\": [[s1, s2], ...]")
            if not pair_task and pairs is not None:
                raise RequestError(422, f"adapter {info.name!r} classifies single sentences "
                                        f"({info.task}): send \"texts\": [...]"
                                   if field is None else
                                   f"{field}: model {info.name!r} classifies single sentences "
                                   f"({info.task}): send \"{field}\": \"...\" or [\"...\", ...]")
        out = []
        for row in rows:
            segs = [row] if isinstance(row, str) else list(row)
            out.append(encode_texts(self.tokenizer, segs, self.max_length))
        return out

    async def _probabilities(self, info: AdapterInfo, ids: list[list[int]]) -> torch.Tensor:
        """[rows, num_labels] softmax of the adapter's logits, from the batcher."""
        logits = await self._queued(info, ids)
        return torch.softmax(logits[:, : info.num_labels], dim=-1)

    async def classify(self, adapter: str, texts: list[str] | None,
                       pairs: list[list[str]] | None) -> dict:
        info = self.backend.infos.get(adapter)
        if info is None:
            raise RequestError(404, self.unknown_message(adapter))
        ids = self.encode(info, texts, pairs)
        probs = await self._probabilities(info, ids)
        labels = probs.argmax(dim=-1).tolist()
        return {"adapter": adapter, "task": info.task, "labels": labels,
                "label_names": [info.label_names[i] for i in labels] if info.label_names
                else None,
                "probabilities": probs.tolist()}

    async def classify_openai(self, model: str, rows: list[str] | list[list[str]]) -> dict:
        """vLLM's classification answer for ``rows`` (texts, or two-string lists)."""
        info = self.backend.infos.get(model)
        if info is None:
            raise RequestError(404, self.unknown_message(model, "model"))
        pairs = bool(rows) and not isinstance(rows[0], str)
        ids = self.encode(info, None if pairs else rows, rows if pairs else None, "input")
        probs = await self._probabilities(info, ids)
        tokens = sum(len(x) for x in ids)
        data = [{"index": i, "label": info.label_names[k] if info.label_names else f"LABEL_{k}",
                 "probs": p, "num_classes": info.num_labels}
                for i, (k, p) in enumerate(zip(probs.argmax(dim=-1).tolist(), probs.tolist()))]
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list",
                "created": int(time.time()), "model": model, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                          "completion_tokens": 0}}

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        batches_since_trim = 0
        while True:
            if batches_since_trim and self.idle_trim_s is not None:
                try:
                    first = await asyncio.wait_for(self.queue.get(), self.idle_trim_s)
                except (asyncio.TimeoutError, TimeoutError):
                    await loop.run_in_executor(self.executor, release_heap)
                    batches_since_trim = 0
                    continue
            else:
                first = await self.queue.get()
            batches_since_trim += 1
            batch, rows = [first], len(first.ids)
            deadline = first.arrived + self.max_wait
            while rows < self.max_batch:
                try:  # take what is already queued, then wait out the window
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), left)
                    except (asyncio.TimeoutError, TimeoutError):
                        break
                if rows + len(item.ids) > self.max_batch:
                    self.queue.put_nowait(item)  # back of the queue; it leads the next batch
                    break
                batch.append(item)
                rows += len(item.ids)
            try:
                results = await loop.run_in_executor(self.executor, self._infer, batch)
            except Exception as e:  # a failed batch fails its requests, not the server
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            for p, r in zip(batch, results):
                if p.future.done():
                    continue
                if isinstance(r, Exception):
                    p.future.set_exception(r)
                else:
                    p.future.set_result(r)

    def _infer(self, batch: list[_Pending]) -> list[torch.Tensor | Exception]:
        """On the worker thread: one forward for every request whose adapter is loaded."""
        started = time.perf_counter()
        live = [p for p in batch if p.adapter in self.backend.infos]  # removed meanwhile?
        results: dict[int, torch.Tensor | Exception] = {
            id(p): RequestError(404, self.unknown_message(p.adapter))
            for p in batch if p.adapter not in self.backend.infos}
        if live:
            ids = [x for p in live for x in p.ids]
            names = [p.adapter for p in live for _ in p.ids]
            input_ids, mask = collate(ids, self.pad_id)
            logits = self.backend.infer(input_ids, mask, names).float()
            k = 0
            for p in live:
                results[id(p)] = logits[k: k + len(p.ids)]
                k += len(p.ids)
            self.stats.batches += 1
            self.stats.rows += len(ids)
            self.stats.requests += len(live)
            self.stats.mixed_batches += len(set(names)) > 1
            if self.metrics is not None:
                self.metrics.observe_batch(live, started)
        return [results[id(p)] for p in batch]


# --------------------------------------------------------------------------- the app

def install_error_handlers(app) -> None:
    """Every error answers ``{"error": ...}``: the service's own errors, unknown paths (404)
    and wrong methods (405), malformed JSON (400) and schema mismatches (422)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)  # unknown path 404, wrong method 405
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            e = next(e for e in errors if e.get("type") == "json_invalid")
            msg = e.get("ctx", {}).get("error") or e.get("msg")
            return JSONResponse({"error": f"malformed JSON: {msg}"}, status_code=400)
        parts = []
        for e in errors:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        return JSONResponse({"error": "; ".join(parts), "detail": [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
            for e in errors]}, status_code=422)


def create_app(service: Service, max_body_bytes: int = DEFAULT_MAX_BODY, api_key=None,
               public_metrics: bool = False):
    """The ASGI app: FastAPI's routes inside the body limit, the bearer-token check when
    ``api_key`` (an :class:`.auth.ApiKey`) is given, and the metrics, outermost."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="loralens", lifespan=lifespan, docs_url=None, redoc_url=None)

    install_error_handlers(app)

    @app.get("/health", operation_id="health", responses=responses(200, HealthOut))
    async def health():
        st = service.stats
        return {"status": "ok", "backend": service.backend.kind,
                "adapters": len(service.backend.infos), "requests": st.requests,
                "batches": st.batches, "mixed_batches": st.mixed_batches, "rows": st.rows,
                "uptime_s": round(time.time() - st.started, 3)}

    @app.get("/v1/adapters", operation_id="list_adapters",
             responses=responses(200, AdaptersOut))
    async def list_adapters():
        return service.adapters()

    @app.post("/v1/adapters", status_code=201, openapi_extra=json_body_schema(AdapterIn),
              operation_id="add_adapter",
              responses=responses(201, AdapterOut, 403, 409, 422, links=ADDED_LINKS))
    async def add_adapter(request: Request):
        body = await read_body(request, AdapterIn)
        info = await service.add_adapter(AdapterSpec(body.name, Path(body.path), body.task))
        return info.to_dict()

    @app.delete("/v1/adapters/{name}", operation_id="remove_adapter",
                responses=responses(200, RemovedOut, 404, 422))
    async def remove_adapter(name: str):
        await service.remove_adapter(name)
        return {"removed": name}

    async def answer(body: ClassifyIn | OpenAIClassifyIn) -> dict:
        rows = body.rows() if isinstance(body, OpenAIClassifyIn) else body.texts or body.pairs
        if len(rows) > service.max_texts:
            raise RequestError(413, f"{len(rows)} inputs in one request; "
                                    f"the limit is {service.max_texts}")
        if isinstance(body, OpenAIClassifyIn):
            return await service.classify_openai(body.model, rows)
        return await service.classify(body.adapter, body.texts, body.pairs)

    @app.post("/v1/classify", openapi_extra=json_body_schema(ClassifyIn, OpenAIClassifyIn),
              operation_id="classify",
              responses=responses(200, ClassifyOut | OpenAIClassifyOut, 404, 422))
    async def classify(request: Request):
        """Today's body answers in today's shape; vLLM's (``model``, ``input``) in vLLM's."""
        return await answer(await read_body(request, classify_body))

    @app.get("/v1/models", operation_id="list_models",
             responses=responses(200, ModelsOut, links=MODELS_LINKS))
    async def list_models():
        return service.models()

    @app.post("/classify", openapi_extra=json_body_schema(OpenAIClassifyIn),
              operation_id="classify_openai",
              responses=responses(200, OpenAIClassifyOut, 404, 422))
    async def classify_openai(request: Request):
        """vLLM's path for its classification API."""
        return await answer(await read_body(request, OpenAIClassifyIn))

    metrics = install_metrics(app, service)
    inner = BodyLimit(app, max_body_bytes)
    if api_key is not None:
        open_paths = {"/health", "/metrics"} if public_metrics else {"/health"}
        declare_auth(app, open_paths)
        inner = BearerAuth(inner, api_key, open_paths)
    return MetricsMiddleware(inner, metrics, app.routes)


# --------------------------------------------------------------------------- building and running

def build_service(specs: Sequence[AdapterSpec], base: Base, backend: str = "ours",
                  max_length: int = 384, max_batch: int = 32, max_wait_ms: float = 5.0,
                  max_texts: int = 64, adapter_root: str | Path | None = None,
                  max_loaded: int | None = None) -> Service:
    """The base model's weights loaded once, every adapter added to a new backend.
    ``adapter_root``: the directory below which clients may add adapters (None: none).
    ``max_loaded``: at most this many adapters loaded at once (the ``ours`` backend's
    store, ``--max-loaded``; None: all); the others are registered and read on demand."""
    from loralens.models.families import require_servable

    require_servable(base.family, base.pooling, "serve")

    def build() -> Backend:
        b = make_backend(backend, base.backbone(), max_loaded)
        b.reserve([s.path for s in specs])  # stacks sized once, not grown adapter by adapter
        for s in specs:
            task = s.task
            b.add(AdapterInfo(s.name, str(s.path), 0, task,
                              get_task(task).label_names if task else None), s.path)
        b.settle()  # the files' tensors, read and freed, back to the OS
        return b

    # built on the model thread that will serve it: the weights' and stacks' large tensor
    # ops on any other thread would give that thread an OpenMP pool of its own (workers)
    executor = inference_executor()
    try:
        b = executor.submit(build).result()
    except BaseException:
        executor.shutdown(wait=False)
        raise
    return Service(b, base.tokenizer, max_length, max_batch, max_wait_ms, max_texts,
                   adapter_root, base_name=base.name, executor=executor)


def base_model_config(args, run_cfg=None, specs: Sequence[AdapterSpec] = ()):
    """The base model to serve (a ``ModelConfig``): the run's (name, revision,
    trust_remote_code) unless ``--model`` names another; without a run directory (bare
    adapter directories) and without ``--model``, the base the adapters record
    (``base_model_name_or_path`` where that directory exists, else their card's base with its
    revision: :func:`loralens.models.adapter_base.adapter_base`; it must be the same for all),
    else the default model; ``--revision`` and ``--trust-remote-code`` override."""
    from loralens.core.config import ModelConfig

    mc = run_cfg.model if run_cfg is not None else ModelConfig()
    if run_cfg is None and not args.model:
        recorded = adapters_base(specs)
        if recorded:
            mc = ModelConfig(name=recorded.name, revision=recorded.revision)
    if args.model and args.model != mc.name:
        mc = ModelConfig(name=args.model)
    return dataclasses.replace(mc, revision=args.revision or mc.revision,
                               trust_remote_code=args.trust_remote_code or mc.trust_remote_code)


def adapters_base(specs: Sequence[AdapterSpec]):
    """The base model the adapter directories record (a ``BaseRef``: where
    ``base_model_name_or_path`` exists, else their card's base, :func:`adapter_base`), None
    when none records one; :class:`AdapterError` when they record different bases (one
    server serves one base: name it with ``--model``)."""
    from loralens.models.adapter_base import adapter_base
    from loralens.models.artifacts import ArtifactError

    bases: dict[tuple, list[str]] = {}
    refs = {}
    for s in specs:
        try:
            ref = adapter_base(s.path)
        except ArtifactError as e:
            raise AdapterError(str(e)) from None
        except (OSError, ValueError, AttributeError):
            continue
        if ref is not None:
            bases.setdefault((ref.name, ref.revision), []).append(s.name)
            refs[(ref.name, ref.revision)] = ref
    if len(bases) > 1:
        listed = "; ".join(f"{name}{f' (revision {rev})' if rev else ''} ({', '.join(names)})"
                           for (name, rev), names in bases.items())
        raise AdapterError(f"the adapters record different base models: {listed}; one server "
                           "serves one base: name it with --model")
    return next(iter(refs.values()), None)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it from ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(service: Service, host: str = "127.0.0.1", port: int = 8000,
          max_body_bytes: int = DEFAULT_MAX_BODY, log_level: str = "warning", api_key=None,
          public_metrics: bool = False) -> None:
    """Run until interrupted. Logs ``listening on http://HOST:PORT`` (INFO) once ready."""
    import uvicorn

    sock = bind_socket(host, port)
    actual = sock.getsockname()[1]
    config = uvicorn.Config(create_app(service, max_body_bytes, api_key, public_metrics),
                            log_level=log_level,
                            access_log=False, timeout_graceful_shutdown=GRACE_S)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    log.info(f"listening on http://{shown}:{actual} (backend {service.backend.kind}, "
             f"{len(service.backend.infos)} adapters)")
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning(f"warning: bound to {host}: reachable from other machines; the server has "
                    "no authentication (set $LORALENS_API_KEY or --api-key-file)")
    run_until_stopped(server, sock)


GRACE_S = 30  # after SIGTERM: how long requests already received may take to be answered


def run_until_stopped(server, sock: socket.socket) -> None:
    """Serve until SIGTERM or Ctrl-C. On SIGTERM uvicorn stops accepting, answers the
    requests it has (queued ones included: the batcher stops only after them), then
    re-raises the signal; a no-op handler turns that into a normal return (exit 0)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return server.run(sockets=[sock])
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)


def cli_command(args) -> int:
    if getattr(args, "ray_max_ongoing", None) is not None:
        raise ConfigError("--ray-max-ongoing sets how many requests a Ray Serve replica takes "
                          "at once: it needs --ray-replicas")
    api_key = load_api_key(args.api_key_file)  # before the model loads: a bad file fails fast
    max_loaded = getattr(args, "max_loaded", None)
    check_max_loaded(args.backend, max_loaded)  # ConfigError (exit 2) before the model loads
    sv = served(args.sources, args.max_length, args.replicate)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.adapter_root or (sv.run_dir if sv.run_dir is not None else None)
    budget = {"max_loaded": max_loaded} if max_loaded is not None else {}
    service = build_service(sv.specs, load_base(base_model_config(args, sv.run_cfg, sv.specs)),
                            args.backend, sv.max_length, args.max_batch, args.max_wait_ms,
                            args.max_texts, root, **budget)
    serve(service, args.host, args.port, args.max_body_bytes, args.log_level,
          api_key, args.public_metrics)
    return 0
