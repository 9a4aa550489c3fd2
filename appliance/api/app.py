"""The HTTP service: app factory, request guards, authentication and OpenAI-shaped errors.

Guards run before any route: the Host header must name this appliance (DNS rebinding), a
browser Origin must be allowed explicitly (no CORS `*`), and bodies are capped while they are
read, not after. API keys are stored as sha256 hashes and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.api import textcheck
from appliance.api.connections import mark_keyed
from appliance.api.protocol import Unsupported, error_body
from appliance.serve.runtime import ModelNotFound, ModelUnavailable, Runtime
from appliance.serve.settings import Settings

log = logging.getLogger(__name__)
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
OPEN_PATHS = ("/healthz",)  # answered without an API key: says alive or not, nothing more


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code),
                            status_code=self.status, headers=self.headers)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_matches(presented: str, hashes: tuple[str, ...]) -> bool:
    """Constant time in the key and in which stored hash matches (every hash is compared)."""
    digest = hash_key(presented).encode()
    found = False
    for stored in hashes:
        found |= hmac.compare_digest(digest, stored.encode())
    return found


class Guard:
    """ASGI middleware: Host and Origin checks, body size cap, API key."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.max_body = settings.max_body_mb * 1024 * 1024
        self.max_json = settings.max_json_kb * 1024
        # host names only: a port-forwarded client (qemu, ssh -L) sends another port
        self.hosts = {"localhost", "127.0.0.1", "[::1]", settings.host,
                      *settings.allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        error = self._check(scope, headers)
        if error is not None:
            # a refused client gets its connection closed too: it costs nothing while it retries
            error.headers["Connection"] = "close"
            await error.response()(scope, receive, send)
            return
        # Uploads (multipart audio) may be large; everything else is JSON, which is parsed on
        # the event loop, so it gets a much smaller cap.
        upload = headers.get("content-type", "").startswith("multipart/")
        cap = self.max_body if upload else self.max_json
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            await self._too_large(upload)(scope, receive, send)
            return
        # Read the whole body here, counting as it arrives (chunked uploads carry no length),
        # then hand it to the app in one piece.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > cap:
                await self._too_large(upload)(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        if not upload and (bad := textcheck.lone_surrogate(body)) is not None:
            await ApiError(400, f"{bad} holds a lone UTF-16 surrogate, which is not text",
                           param=bad, code="invalid_text").response()(scope, receive, send)
            return
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, upload: bool) -> JSONResponse:
        limit = (f"{self.settings.max_body_mb} MiB (max_body_mb)" if upload
                 else f"{self.settings.max_json_kb} KiB (max_json_kb)")
        return ApiError(413, f"request body is larger than {limit}",
                        code="request_too_large").response()

    def _check(self, scope: Scope, headers: dict[str, str]) -> ApiError | None:
        host = headers.get("host", "").lower()
        name = host if host.endswith("]") else host.rpartition(":")[0] or host
        if name not in self.hosts:
            return ApiError(421, "this appliance does not answer for that Host name",
                            code="misdirected_request")
        origin = headers.get("origin")
        if origin is not None and origin not in self.settings.allowed_origins:
            return ApiError(403, "cross-origin requests are not allowed", code="origin_denied")
        if scope["path"] in OPEN_PATHS or not self.settings.auth:
            return None
        auth = headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not key_matches(key.strip(), self.settings.api_key_hashes):
            return ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        mark_keyed(scope)
        return None


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif kind == "json_invalid":
        message, param = "the request body is not valid JSON", None
    else:
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    return ApiError(400, message, param=param)


def create_app(runtime: Runtime, settings: Settings) -> Any:
    """The ASGI app. The runtime is loaded by the caller; the app closes it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        runtime.close()

    app = FastAPI(title="appliance", version="1", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.runtime = runtime
    app.state.settings = settings
    app.state.audio_waiting = [0]  # transcriptions decoding or waiting for a core lane

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(Unsupported)
    async def _unsupported(request: Request, exc: Unsupported) -> JSONResponse:
        return ApiError(400, str(exc), param=exc.param).response()

    @app.exception_handler(ModelNotFound)
    async def _no_model(request: Request, exc: ModelNotFound) -> JSONResponse:
        return ApiError(404, f"{exc.message}; {exc.hint}", param="model",
                        code="model_not_found").response()

    @app.exception_handler(ModelUnavailable)
    async def _unavailable(request: Request, exc: ModelUnavailable) -> JSONResponse:
        return ApiError(503, exc.message, "server_error", param="model",
                        code="model_unavailable").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return ApiError(500, "internal error; see the appliance's journal", "server_error"
                        ).response()

    from appliance.api import audio as routes_audio
    from appliance.api import chat as routes
    from appliance.api import embeddings as routes_embeddings
    app.include_router(routes.router)
    app.include_router(routes_embeddings.router)
    app.include_router(routes_audio.router)
    return Guard(app, settings)


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def sse_error(message: str | None) -> bytes:
    """An error in the middle of a stream: the OpenAI SDK raises it as an APIError."""
    return sse(error_body(message or "generation failed", "server_error"))
