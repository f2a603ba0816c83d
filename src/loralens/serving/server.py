"""``loralens serve``: an HTTP classification server for many LoRA adapters on one base.

Built on FastAPI (routing, request validation with pydantic) and uvicorn (the
ASGI server). The base model is loaded once; every adapter given (a run
directory's LoRA adapters, or adapter directories) is added to one backend
(:mod:`loralens.serving.backends`; ``ours`` by default).

Endpoints::

    GET    /health                  {"status": "ok", "backend": ..., "adapters": n}
    GET    /v1/adapters             [{"name", "task", "num_labels", "label_names", "source"}]
    POST   /v1/adapters             {"name": "x", "path": "/dir/adapter", "task": "sst2"?}  -> 201
    DELETE /v1/adapters/{name}
    POST   /v1/classify             {"adapter": "x", "texts": ["..."]}  or  "pairs": [["s1", "s2"]]
        -> {"adapter", "labels": [int], "label_names": [str]|null, "probabilities": [[float]]}

Tokenization is training's (:func:`loralens.data.encode_texts`: ``s1 <eos> s2``,
truncated to ``max_length``). Dynamic batching: requests wait at most
``max_wait_ms`` for others, whatever their adapter, and run together as one
batch of up to ``max_batch`` rows; on the ``ours`` backend a batch mixing
adapters is one forward pass. All model work (inference, adding and removing
adapters) runs on ONE worker thread, so an adapter is never changed under a
running batch; the event loop only parses, validates and queues.

Bad input is a 4xx with ``{"error": "..."}`` and never stops the server:
malformed JSON 400; wrong types, missing or extra keys, empty lists or strings,
too many texts 422; unknown adapter 404; a body over ``max_body_bytes`` 413.
The server binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from ..data import collate, encode_texts
from ..tasks import get_task
from .backends import AdapterError, AdapterInfo, Backend, make_backend
from .cli_args import DEFAULT_MAX_BODY

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$")


class RequestError(Exception):
    """A client error: HTTP status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# --------------------------------------------------------------------------- adapters to load

@dataclass
class AdapterSpec:
    name: str
    path: Path
    task: str | None = None


def _task_of(path: Path) -> tuple[str | None, str]:
    """(task, default name) of an adapter dir laid out as models/<task>/lora/seed<s>/adapter."""
    parts = path.resolve().parts
    if len(parts) >= 5 and parts[-1] == "adapter" and parts[-3] == "lora" \
            and parts[-2].startswith("seed") and parts[-5] == "models":
        task = parts[-4]
        try:
            get_task(task)
        except KeyError:
            return None, f"{task}-{parts[-2]}"
        return task, f"{task}-{parts[-2]}"
    name = path.parent.name if path.name == "adapter" else path.name
    return None, name


def collect_adapters(sources: Sequence[str]) -> tuple[list[AdapterSpec], Path | None]:
    """Adapters named by ``sources``: run directories (every LoRA adapter in them),
    adapter directories, or ``name=directory``. Returns (specs, run dir if one was given)."""
    specs: list[AdapterSpec] = []
    run_dir = None
    for src in sources:
        name = None
        if "=" in src and not Path(src).exists():
            name, src = src.split("=", 1)
        path = Path(src)
        if (path / "config.yaml").is_file() and (path / "models").is_dir() and name is None:
            run_dir = run_dir or path
            found = sorted((path / "models").glob("*/lora/seed*/adapter"))
            if not found:
                raise AdapterError(f"{path}: run directory without trained LoRA adapters "
                                   "(models/<task>/lora/seed<seed>/adapter)")
            for d in found:
                task, default = _task_of(d)
                specs.append(AdapterSpec(default, d, task))
            continue
        if not (path / "adapter_config.json").is_file():
            raise AdapterError(f"{path}: neither a run directory (config.yaml + models/) nor a "
                               "PEFT adapter directory (adapter_config.json)")
        task, default = _task_of(path)
        specs.append(AdapterSpec(name or default, path, task))
    seen = set()
    for s in specs:
        if not _NAME.match(s.name):
            raise AdapterError(f"adapter name {s.name!r} ({s.path}): use letters, digits and "
                               "_ . @ + - (at most 128 characters)")
        if s.name in seen:
            raise AdapterError(f"two adapters named {s.name!r}; name them with NAME=DIR")
        seen.add(s.name)
    return specs, run_dir


def replicate(specs: list[AdapterSpec], n: int) -> list[AdapterSpec]:
    """At least ``n`` adapters: the given ones, then copies named ``<name>@2``, ``@3``...

    For load tests that need more adapters than a run trained: each copy is a
    separate adapter to every backend (its own slot, PEFT adapter or merged
    model); the cost of serving does not depend on the factor values.
    """
    out = list(specs)
    k = 0
    while len(out) < n:
        s = specs[k % len(specs)]
        out.append(AdapterSpec(f"{s.name}@{k // len(specs) + 2}", s.path, s.task))
        k += 1
    return out


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


class Service:
    """Tokenizer + backend + dynamic batcher. Create inside a running event loop's app."""

    def __init__(self, backend: Backend, tokenizer, max_length: int, max_batch: int = 32,
                 max_wait_ms: float = 5.0, max_texts: int = 64):
        if max_batch < 1 or max_texts < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_texts must be >= 1, max_wait_ms >= 0")
        self.backend, self.tokenizer = backend, tokenizer
        self.max_length, self.max_batch = max_length, max_batch
        self.max_wait, self.max_texts = max_wait_ms / 1000.0, max_texts
        self.pad_id = tokenizer.pad_token_id
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="loralens-infer")
        self.queue: asyncio.Queue[_Pending] | None = None
        self.task: asyncio.Task | None = None
        self.stats = ServiceStats()

    # ---- lifecycle (called by the app's lifespan)
    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._batch_loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=True)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- adapters
    async def add_adapter(self, spec: AdapterSpec) -> AdapterInfo:
        if not _NAME.match(spec.name):
            raise RequestError(422, f"adapter name {spec.name!r}: use letters, digits and "
                                    "_ . @ + - (at most 128 characters)")
        if spec.name in self.backend.infos:
            raise RequestError(409, f"adapter {spec.name!r} is already loaded; remove it first")
        task = spec.task
        if task is None:
            task = _task_of(spec.path)[0]
        labels = None
        if task is not None:
            try:
                labels = get_task(task).label_names
            except KeyError as e:
                raise RequestError(422, str(e).strip("'\"")) from None
        info = AdapterInfo(spec.name, str(spec.path), 0, task, labels)
        try:
            return await self._run(self.backend.add, info, spec.path)
        except AdapterError as e:
            raise RequestError(409 if "already loaded" in str(e) else 422, str(e)) from None

    async def remove_adapter(self, name: str) -> None:
        if name not in self.backend.infos:
            raise RequestError(404, self._unknown(name))
        try:
            await self._run(self.backend.remove, name)
        except KeyError:
            raise RequestError(404, self._unknown(name)) from None

    def _unknown(self, name: str) -> str:
        names = self.backend.names
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        return f"unknown adapter {name!r}; loaded: {shown or 'none'}"

    # ---- classification
    def encode(self, info: AdapterInfo, texts: list[str] | None,
               pairs: list[list[str]] | None) -> list[list[int]]:
        rows = texts if texts is not None else pairs
        if info.task is not None:
            pair_task = get_task(info.task).is_pair
            if pair_task and texts is not None:
                raise RequestError(422, f"adapter {info.name!r} classifies sentence pairs "
                                        f"({info.task}): send \"pairs\": [[s1, s2], ...]")
            if not pair_task and pairs is not None:
                raise RequestError(422, f"adapter {info.name!r} classifies single sentences "
                                        f"({info.task}): send \"texts\": [...]")
        out = []
        for row in rows:
            segs = [row] if isinstance(row, str) else list(row)
            out.append(encode_texts(self.tokenizer, segs, self.max_length))
        return out

    async def classify(self, adapter: str, texts: list[str] | None,
                       pairs: list[list[str]] | None) -> dict:
        info = self.backend.infos.get(adapter)
        if info is None:
            raise RequestError(404, self._unknown(adapter))
        ids = self.encode(info, texts, pairs)
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(adapter, ids, fut, time.perf_counter()))
        logits = await fut
        probs = torch.softmax(logits[:, : info.num_labels], dim=-1)
        labels = probs.argmax(dim=-1).tolist()
        return {"adapter": adapter, "task": info.task, "labels": labels,
                "label_names": [info.label_names[i] for i in labels] if info.label_names
                else None,
                "probabilities": probs.tolist()}

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
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
        live = [p for p in batch if p.adapter in self.backend.infos]  # removed meanwhile?
        results: dict[int, torch.Tensor | Exception] = {
            id(p): RequestError(404, self._unknown(p.adapter))
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
        return [results[id(p)] for p in batch]


# --------------------------------------------------------------------------- request bodies

NonEmpty = Annotated[StrictStr, Field(min_length=1)]


class ClassifyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: NonEmpty
    texts: Annotated[list[NonEmpty], Field(min_length=1)] | None = None
    pairs: Annotated[list[Annotated[list[NonEmpty], Field(min_length=2, max_length=2)]],
                     Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def one_of(self):
        if (self.texts is None) == (self.pairs is None):
            raise ValueError('give exactly one of "texts" and "pairs"')
        return self


class AdapterIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: NonEmpty
    path: NonEmpty
    task: NonEmpty | None = None


# --------------------------------------------------------------------------- the app

def create_app(service: Service, max_body_bytes: int = DEFAULT_MAX_BODY):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="loralens", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

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

    @app.get("/health")
    async def health():
        st = service.stats
        return {"status": "ok", "backend": service.backend.kind,
                "adapters": len(service.backend.infos), "requests": st.requests,
                "batches": st.batches, "mixed_batches": st.mixed_batches, "rows": st.rows,
                "uptime_s": round(time.time() - st.started, 3)}

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"adapters": [i.to_dict() for i in service.backend.infos.values()]}

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(body: AdapterIn):
        info = await service.add_adapter(AdapterSpec(body.name, Path(body.path), body.task))
        return info.to_dict()

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str):
        await service.remove_adapter(name)
        return {"removed": name}

    @app.post("/v1/classify")
    async def classify(body: ClassifyIn):
        if len(body.texts or body.pairs) > service.max_texts:
            raise RequestError(413, f"{len(body.texts or body.pairs)} inputs in one request; "
                                    f"the limit is {service.max_texts}")
        return await service.classify(body.adapter, body.texts, body.pairs)

    return BodyLimit(app, max_body_bytes)


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413.

    Checks Content-Length up front; a body without one (chunked) is counted as
    it arrives and refused as soon as it passes the limit, so an oversized body
    is never read into memory whole.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                return await self._reply(send, 400, "bad Content-Length header")
            if too_big:
                return await self._reply(send, 413, f"request body of {int(length)} bytes; "
                                                    f"the limit is {self.limit}")
            return await self.app(scope, receive, send)
        # No declared length (chunked): read the body here, at most limit bytes, then
        # replay it. (Raising from inside receive would reach the framework's body
        # parser, which turns any error into a 400.)
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # client went away
            body = msg.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                return await self._reply(send, 413, f"request body over {self.limit} bytes")
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reply(send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- building and running

def build_service(specs: Sequence[AdapterSpec], model_name: str, backend: str = "ours",
                  max_length: int = 384, max_batch: int = 32, max_wait_ms: float = 5.0,
                  max_texts: int = 64, trust_remote_code: bool = False) -> Service:
    """Load the base model once and every adapter into a new backend."""
    from ..models import load_backbone, load_tokenizer, resolve_model

    resolved = resolve_model(model_name)
    tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    b = make_backend(backend, load_backbone(resolved, trust_remote_code=trust_remote_code))
    for s in specs:
        task = s.task
        b.add(AdapterInfo(s.name, str(s.path), 0, task,
                          get_task(task).label_names if task else None), s.path)
    return Service(b, tokenizer, max_length, max_batch, max_wait_ms, max_texts)


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
          max_body_bytes: int = DEFAULT_MAX_BODY, log_level: str = "warning") -> None:
    """Run until interrupted. Prints ``listening on http://HOST:PORT`` once ready."""
    import uvicorn

    sock = bind_socket(host, port)
    actual = sock.getsockname()[1]
    config = uvicorn.Config(create_app(service, max_body_bytes), log_level=log_level,
                            access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    print(f"listening on http://{shown}:{actual} (backend {service.backend.kind}, "
          f"{len(service.backend.infos)} adapters)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: bound to {host}: reachable from other machines; the server has no "
              "authentication", file=sys.stderr, flush=True)
    server.run(sockets=[sock])


def cli_command(args) -> int:
    specs, run_dir = collect_adapters(args.sources)
    model, max_length = args.model, args.max_length
    if run_dir is not None and (model is None or max_length is None):
        from ..store import RunDir

        cfg = RunDir(run_dir).load_config()
        model = model or cfg.model.name
        max_length = max_length or cfg.data.max_length
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.replicate:
        specs = replicate(specs, args.replicate)
    service = build_service(specs, model or "smollm2-135m", args.backend, max_length or 384,
                            args.max_batch, args.max_wait_ms, args.max_texts)
    serve(service, args.host, args.port, args.max_body_bytes, args.log_level)
    return 0
