"""ASGI middleware in front of every route: the Host header must name this appliance (DNS
rebinding), a browser Origin must be allowed explicitly (no CORS `*`), bodies are capped while
they are read (JSON much lower than uploads), text that no tokenizer can encode is refused, and
API keys are checked in constant time. A key's own limits (requests in flight, requests per
rolling minute) are counted here, per process, whichever header carries the key
(`Authorization: Bearer`, or `x-api-key` as Anthropic's clients send it); the key is left in
`scope["state"]["api_key"]` for the routes, which show it only its models
(api/generation.py `allowed_models`)."""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from appliance.api import cors, textcheck
from appliance.api.connections import mark_keyed
from appliance.api.errors import error_response
from appliance.api.keyring import KeyRing
from appliance.device.apikeys import ApiKey
from appliance.errors import (
    ApplianceError,
    Forbidden,
    InvalidText,
    Misdirected,
    RateLimited,
    RequestError,
    TooLarge,
    Unauthorized,
)
from appliance.serve.settings import Settings

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
OPEN_PATHS = ("/healthz",)  # answered without an API key: says alive or not, nothing more
UPLOAD_PATHS = ("/v1/audio/",)  # the only routes that take large (multipart) bodies
WINDOW = 60.0  # seconds of a key's per_minute limit


class Guard:
    def __init__(self, app: Any, settings: Settings, keys: KeyRing) -> None:
        self.app = app
        self.settings = settings
        self.keys = keys
        self.in_flight: dict[str, int] = {}  # by key name
        self.started: dict[str, deque[float]] = {}  # by key name: admitted in the last WINDOW
        self.max_body = settings.max_body_mb * 1024 * 1024
        self.max_json = settings.max_json_kb * 1024
        # host names only: a port-forwarded client (qemu, ssh -L) sends another port
        self.hosts = {_bracketed(h.lower()) for h in
                      ("localhost", "127.0.0.1", "::1", settings.host, *settings.allowed_hosts)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        if origin is not None and origin in self.settings.allowed_origins:
            send = cors.with_headers(send, origin)  # on errors too: the page may read them
        try:
            key = self._check(scope, headers)
            if key is not None:
                self._admit(key)
        except ApplianceError as exc:
            # a refused client gets its connection closed too: it costs nothing while it retries
            exc.headers["Connection"] = "close"
            await error_response(exc, scope["path"])(scope, receive, send)
            return
        if cors.is_preflight(scope, headers):  # from a listed origin: _check refused the rest
            await cors.answer_preflight(send, headers)
            return
        if key is None:
            await self._pass(scope, receive, send, headers)
            return
        scope.setdefault("state", {})["api_key"] = key
        try:
            # a streamed answer is in flight until its last chunk: the app returns only then
            await self._pass(scope, receive, send, headers)
        finally:
            self._leave(key)

    async def _pass(self, scope: Scope, receive: Receive, send: Send,
                    headers: dict[str, str]) -> None:
        """The body read under its cap and checked, then the request handed to the app."""
        if scope["path"] in OPEN_PATHS and (headers.get("content-length", "0") != "0"
                                            or "transfer-encoding" in headers):
            # no key was asked for: nothing from such a client is read or buffered
            await error_response(RequestError("this path takes no request body", headers={
                "Connection": "close"}), scope["path"])(scope, receive, send)
            return
        # Uploads (multipart audio, on its routes only) may be large; everything else is JSON,
        # which is parsed on the event loop, so it gets a much smaller cap.
        upload = scope["path"].startswith(UPLOAD_PATHS)
        cap = self.max_body if upload else self.max_json
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            await error_response(self._too_large(upload), scope["path"])(scope, receive, send)
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
                await error_response(self._too_large(upload), scope["path"])(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        if body and not upload and json.detect_encoding(bytes(body[:4])) != "utf-8":
            # RFC 8259: JSON on the wire is UTF-8 (the surrogate check below reads UTF-8)
            await error_response(RequestError("the request body must be UTF-8 JSON"),
                                 scope["path"])(scope, receive, send)
            return
        if not upload and (bad := textcheck.lone_surrogate(body)) is not None:
            error = InvalidText(f"{bad} holds a lone UTF-16 surrogate, which is not text",
                                param=bad)
            await error_response(error, scope["path"])(scope, receive, send)
            return
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, upload: bool) -> TooLarge:
        limit = (f"{self.settings.max_body_mb} MiB (max_body_mb)" if upload
                 else f"{self.settings.max_json_kb} KiB (max_json_kb)")
        # the rest of the body is not read: the connection cannot be reused
        return TooLarge(f"request body is larger than {limit}", headers={"Connection": "close"})

    def _admit(self, key: ApiKey) -> None:
        """Count a request of `key` in, or refuse it (429) past the key's limits; a refused
        request counts for nothing."""
        busy = self.in_flight.get(key.name, 0)
        if key.concurrent and busy >= key.concurrent:
            raise RateLimited(f"this API key has {busy} requests in flight; it may have "
                              f"{key.concurrent} at once", retry_after=1)
        if key.per_minute:
            now = time.monotonic()
            started = self.started.setdefault(key.name, deque())
            while started and started[0] <= now - WINDOW:
                started.popleft()
            if len(started) >= key.per_minute:
                wait = max(1, math.ceil(started[0] + WINDOW - now))
                raise RateLimited(f"this API key may make {key.per_minute} requests a minute",
                                  retry_after=wait)
            started.append(now)
        self.in_flight[key.name] = busy + 1

    def _leave(self, key: ApiKey) -> None:
        left = self.in_flight.pop(key.name, 1) - 1
        if left:
            self.in_flight[key.name] = left

    def _check(self, scope: Scope, headers: dict[str, str]) -> ApiKey | None:
        """The request's API key (None on open paths and with auth off), or an error."""
        host = headers.get("host", "").lower()
        name = host if host.endswith("]") else host.rpartition(":")[0] or host
        if name not in self.hosts:
            raise Misdirected("this appliance does not answer for that Host name")
        origin = headers.get("origin")
        if origin is not None and origin not in self.settings.allowed_origins:
            raise Forbidden("cross-origin requests are not allowed")
        if scope["path"] in OPEN_PATHS or not self.settings.auth or cors.is_preflight(
                scope, headers):  # a browser sends no key with a preflight
            return None
        # OpenAI clients send `Authorization: Bearer`, Anthropic's send `x-api-key`
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            presented = headers.get("x-api-key", "")
        key = self.keys.match(presented.strip()) if presented.strip() else None
        if key is None:
            raise Unauthorized("Incorrect API key provided.")
        mark_keyed(scope)
        return key


def _bracketed(host: str) -> str:
    """IPv6 literals as a Host header carries them: in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
