"""Optional bearer-token authentication of ``loralens serve``.

The key comes from a file (``--api-key-file FILE``, e.g. a mounted secret) or from
``$LORALENS_API_KEY``; never from a command-line argument, which ``ps`` shows to every
user of the machine. When a key is set, every request but ``GET /health`` (and
``GET /metrics`` with ``--public-metrics``, for a scraper without credentials) must send
``Authorization: Bearer KEY``; otherwise it gets a 401 whose body never repeats what the
client sent. The key is compared in constant time and is never printed or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from loralens.core.errors import ConfigError
from loralens.serving.responses import ErrorOut

API_KEY_ENV = "LORALENS_API_KEY"
OPEN_PATHS = frozenset({"/health"})


class ApiKey:
    """A secret string that does not show itself (``repr`` and ``str`` are masked)."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value.encode()

    def matches(self, given: bytes) -> bool:
        return hmac.compare_digest(self._value, given)

    def __repr__(self) -> str:
        return "ApiKey(***)"

    __str__ = __repr__


class KeyDigest:
    """What Ray Serve's ingress (``ray_serve``) holds of the API key: a salted HMAC-SHA256 of it, never the key.
    The deployment's configuration is pickled into Ray (its controller, its GCS store, the
    ingress actor), where the key itself would not be as safe as in the command's memory.
    ``matches`` has :class:`.auth.ApiKey`'s signature, so :class:`.auth.BearerAuth` takes
    either; the comparison is in constant time."""

    def __init__(self, key):  # an auth.ApiKey
        self._salt = os.urandom(16)
        self._digest = self._mac(key._value)

    def _mac(self, value: bytes) -> bytes:
        return hmac.new(self._salt, value, hashlib.sha256).digest()

    def matches(self, given: bytes) -> bool:
        return hmac.compare_digest(self._digest, self._mac(given))

    def __repr__(self) -> str:
        return "KeyDigest(***)"

    __str__ = __repr__


def load_api_key(key_file: str | Path | None, environ=os.environ) -> ApiKey | None:
    """The server's key: the first line of ``key_file`` if given (surrounding whitespace
    stripped), else ``$LORALENS_API_KEY``; None (no authentication) when neither is set."""
    if key_file is not None:
        try:
            text = Path(key_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--api-key-file {str(key_file)!r}: cannot read it "
                             f"({type(e).__name__})") from None
        value = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not value:
            raise ConfigError(f"--api-key-file {str(key_file)!r} is empty")
        return ApiKey(value)
    value = environ.get(API_KEY_ENV, "").strip()
    return ApiKey(value) if value else None


class BearerAuth:
    """ASGI middleware: a 401 for a request without the right bearer token, except on the
    open paths. It runs before the body is read, so an unauthenticated client costs
    nothing but its headers."""

    def __init__(self, app, key: ApiKey, open_paths=OPEN_PATHS):
        self.app, self.key, self.open_paths = app, key, frozenset(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            return await self.app(scope, receive, send)
        given = None
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
                break
        if given is None:
            return await _reply(send, "missing API key: send the header "
                                      "'Authorization: Bearer <key>'", b'Bearer realm="loralens"')
        if not self.key.matches(given):
            return await _reply(send, "wrong API key",
                                b'Bearer realm="loralens", error="invalid_token"')
        return await self.app(scope, receive, send)


async def _reply(send, message: str, challenge: bytes) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", challenge)]})
    await send({"type": "http.response.body", "body": body})


def declare_auth(app, open_paths=OPEN_PATHS) -> None:
    """Declare the bearer scheme and the 401 answer of every protected operation in the
    app's OpenAPI schema (which is itself protected)."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()  # cached by FastAPI in app.openapi_schema: changed in place
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer",
            "description": f"the server's API key (--api-key-file or ${API_KEY_ENV})"}
        components.setdefault("schemas", {}).setdefault("ErrorOut", ErrorOut.model_json_schema())
        for path, ops in schema.get("paths", {}).items():
            if path in open_paths:
                continue
            for op in ops.values():
                op["security"] = [{"bearer": []}]
                op.setdefault("responses", {})["401"] = {
                    "description": "no API key, or a wrong one",
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
