"""CORS for the browser origins that `allowed_origins` lists, so that a web page on the LAN can
call the API; every other origin is refused by the Guard (api/guard.py) and gets no CORS header.

A listed origin gets its own name back in Access-Control-Allow-Origin (never `*`) with
`Vary: Origin`, on every answer, errors included, so the page can read a 401 or a 429. A
preflight (OPTIONS with Access-Control-Request-Method) is answered here, without an API key:
browsers never send one with it. No credentials mode: the key travels in a header the page
sets, which CORS does not count as credentials.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
METHODS = "GET, POST"
# What the OpenAI and Anthropic clients send (the browser builds of their SDKs add telemetry
# headers named x-stainless-*, allowed below by prefix).
HEADERS = ("authorization", "content-type", "x-api-key", "anthropic-version", "anthropic-beta",
           "anthropic-dangerous-direct-browser-access", "openai-organization", "openai-project")
SDK_HEADER = re.compile(r"x-stainless-[a-z0-9-]{1,64}")
EXPOSE = "Retry-After"  # how long to wait after a 429 or 503
MAX_AGE = "600"  # seconds a browser may reuse a preflight's answer


def is_preflight(scope: Scope, headers: dict[str, str]) -> bool:
    return (scope["method"] == "OPTIONS" and "origin" in headers
            and "access-control-request-method" in headers)


def with_headers(send: Send, origin: str) -> Send:
    """`send` that adds the CORS headers for a listed `origin` to the response."""

    async def wrapped(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = _vary([*message.get("headers", []),
                                        (b"access-control-allow-origin", origin.encode()),
                                        (b"access-control-expose-headers", EXPOSE.encode())])
        await send(message)

    return wrapped


async def answer_preflight(send: Send, headers: dict[str, str]) -> None:
    """204 naming what the actual request may use; the browser compares and decides. The
    origin's own headers are added by `with_headers`."""
    asked = [h.strip().lower() for h in headers.get("access-control-request-headers",
                                                     "").split(",")]
    allowed = [*HEADERS, *(h for h in asked if SDK_HEADER.fullmatch(h))]
    out = [(b"access-control-allow-methods", METHODS.encode()),
           (b"access-control-allow-headers", ", ".join(allowed).encode()),
           (b"access-control-max-age", MAX_AGE.encode()), (b"content-length", b"0"),
           (b"vary", b"Access-Control-Request-Method, Access-Control-Request-Headers")]
    if headers.get("access-control-request-private-network") == "true":
        out.append((b"access-control-allow-private-network", b"true"))  # a LAN address
    await send({"type": "http.response.start", "status": 204, "headers": out})
    await send({"type": "http.response.body", "body": b""})


def _vary(headers: list[Any]) -> list[Any]:
    """The headers with Origin added to Vary (one Vary header)."""
    names = [v.decode("latin-1") for k, v in headers if k.lower() == b"vary"]
    rest = [(k, v) for k, v in headers if k.lower() != b"vary"]
    return [*rest, (b"vary", ", ".join([*names, "Origin"]).encode("latin-1"))]
