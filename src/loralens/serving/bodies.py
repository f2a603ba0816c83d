"""HTTP request bodies of ``loralens serve``: their schemas, JSON read whatever the
Content-Type says, the size limit, and the client-error type every 4xx comes from."""

from __future__ import annotations

import json
from typing import Annotated, Any, Callable, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, model_validator

from loralens.serving.sources import NAME_PATTERN


class RequestError(Exception):
    """A client error: HTTP status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


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


Pair = Annotated[list[NonEmpty], Field(min_length=2, max_length=2)]


class OpenAIClassifyIn(BaseModel):
    """The classification request of vLLM's and SGLang's servers (``POST /classify``,
    ``POST /v1/classify``): ``model`` is an adapter's name (GET /v1/models lists them);
    ``input`` one text, a list of texts, or, for a sentence-pair task, a list of
    two-string lists. Their other fields (``truncate_prompt_tokens``, ``priority``, ...)
    are refused (422 naming the field), not silently ignored."""
    model_config = ConfigDict(extra="forbid")
    model: NonEmpty
    input: (NonEmpty | Annotated[list[NonEmpty], Field(min_length=1)]
            | Annotated[list[Pair], Field(min_length=1)])

    def rows(self) -> list[str] | list[list[str]]:
        """``input`` as a list of rows (one text becomes a list of one)."""
        return [self.input] if isinstance(self.input, str) else self.input


def classify_body(obj) -> type[BaseModel]:
    """Which of the two classification bodies a parsed JSON value is meant to be: a body
    naming ``model`` or ``input`` is vLLM's shape, anything else today's."""
    if isinstance(obj, dict) and ("model" in obj or "input" in obj):
        return OpenAIClassifyIn
    return ClassifyIn


class AdapterIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # the rule is checked by the server (sources.valid_name, with its own message) and
    # declared here, so that the schema says which names are valid
    name: Annotated[NonEmpty, Field(json_schema_extra={"pattern": NAME_PATTERN})]
    path: NonEmpty
    task: NonEmpty | None = None


Body = TypeVar("Body", bound=BaseModel)


def json_body_schema(*models: type[BaseModel]) -> dict:
    """OpenAPI of a JSON request body, for handlers that read it with :func:`read_body`;
    several models: a body that fits any of them."""
    schemas = [m.model_json_schema() for m in models]
    schema = schemas[0]
    if len(schemas) > 1:
        # every field at the top too (each declared as in its branch: the same constraints),
        # so that a reader of the schema sees all of them; anyOf says which go together
        fields = {k: v for s in schemas for k, v in s["properties"].items()}
        schema = {"type": "object", "properties": fields, "anyOf": schemas}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema}}}}


async def read_body(request: Request, model: type[Body] | Callable[[Any], type[Body]]
                    ) -> Body:
    """The request body parsed as JSON whatever its Content-Type says (``curl -d`` sends
    ``application/x-www-form-urlencoded``), then validated by ``model`` (or by the model
    that ``model(parsed JSON)`` picks). Errors have the
    shapes of FastAPI's own body validation: malformed JSON a 400, a body that does not
    fit ``model`` a :class:`RequestValidationError` (422, locations under ``body``)."""
    from fastapi.exceptions import RequestValidationError

    raw = await request.body()
    if not raw.strip():
        raise RequestValidationError([{"type": "missing", "loc": ("body",),
                                       "msg": "Field required"}])
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RequestError(400, f"malformed JSON: {e.msg}") from None
    except UnicodeDecodeError:
        raise RequestError(400, "malformed JSON: the body is not UTF-8 text") from None
    if not isinstance(model, type):
        model = model(obj)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                      for err in e.errors()]) from None



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
