"""Connection limits below HTTP: what keeps one LAN neighbour from taking the API away from
everyone else before any request is parsed, let alone authenticated.

uvicorn closes nothing that never sent a request, buffers headers without bound, and answers
its own concurrency limit with plain text. `guarded_protocol` wraps its httptools protocol so
that, per server:

- a connection must finish its request headers within `header_timeout` seconds of connecting
  (or of the end of its previous response), and headers larger than `max_header_bytes` are
  refused with 431 before the parser sees them;
- a request body that stops arriving for `idle_timeout` seconds is dropped;
- one address holds at most `per_client` connections (429 past that);
- all addresses together hold at most `max_connections`. A new connection past that closes the
  oldest connection that is not in the middle of a request, preferring ones that have never
  presented a valid API key; only when every connection is busy is the newcomer refused (503).
  So a flood of idle or slow connections costs a keyed client at most one reconnect.

Every refusal is an OpenAI-shaped JSON error with `Retry-After`, sent before the write side is
shut; the connection is then read and discarded briefly so the client sees the answer, not a
reset.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)
EXTENSION = "appliance.connection"  # scope["extensions"] key of a connection's Marks
LINGER = 2.0  # seconds a refused connection is drained before it is closed
MAX_LINGERING = 128  # past this many at once, refused connections close at once
REASONS = {400: "Bad Request", 408: "Request Timeout", 429: "Too Many Requests",
           431: "Request Header Fields Too Large", 503: "Service Unavailable"}


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 256
    per_client: int = 32
    header_timeout: float = 10.0
    idle_timeout: float = 30.0
    max_header_bytes: int = 32 * 1024


@dataclass
class Marks:
    """What the ASGI app tells the connection about itself: a valid key was seen on it."""

    keyed: bool = False


@dataclass
class _Registry:
    """Connections of one server: counts per address, and the ones that may be evicted (not in
    a request), oldest first."""

    limits: ConnectionLimits
    per_address: dict[str, int] = field(default_factory=dict)
    total: int = 0
    waiting: OrderedDict[GuardedProtocol, None] = field(default_factory=OrderedDict)
    refused: int = 0
    evicted: int = 0
    lingering: int = 0

    def evict_one(self, newcomer: GuardedProtocol) -> bool:
        """Close the oldest waiting connection, unkeyed first. False if none may go."""
        victims = [c for c in self.waiting if c is not newcomer]
        if not victims:
            return False
        victim = next((c for c in victims if not c.marks.keyed), victims[0])
        self.evicted += 1
        victim.drop()
        return True


def error_response(status: int, message: str, code: str, retry_after: int | None) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500
                                 else "invalid_request_error", "param": None, "code": code}})
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
            "content-type: application/json", f"content-length: {len(body)}",
            "connection: close"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n" + body).encode()


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of this module. One per connection."""

    registry: _Registry  # set on the subclass that guarded_protocol makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.marks = Marks()
        self._address = ""
        self._counted = False
        self._refused = False
        self._in_request = False  # from a request's headers until its response is done
        self._in_body = False  # from a request's headers until its body is all in
        self._header_bytes = 0
        self._tail = b""  # the last bytes seen, to find a header end split across reads
        self._deadline: asyncio.TimerHandle | None = None

    # --- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        reg, limits = self.registry, self.registry.limits
        self._address = self.client[0] if self.client else ""
        reg.per_address[self._address] = reg.per_address.get(self._address, 0) + 1
        reg.total += 1
        self._counted = True
        if reg.per_address[self._address] > limits.per_client:
            self.refuse(429, f"too many connections from {self._address} (at most "
                             f"{limits.per_client}); reuse a keep-alive connection",
                        "too_many_connections", retry_after=1)
            return
        if reg.total > limits.max_connections and not reg.evict_one(self):
            self.refuse(503, "the server is at its connection limit; retry shortly",
                        "server_busy", retry_after=1)
            return
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def _forget(self) -> None:
        self._cancel_deadline()
        reg = self.registry
        reg.waiting.pop(self, None)
        if self._counted:
            self._counted = False
            reg.total -= 1
            left = reg.per_address.get(self._address, 1) - 1
            if left > 0:
                reg.per_address[self._address] = left
            else:
                reg.per_address.pop(self._address, None)

    # --- reading ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # draining before the close
        if self._in_body:
            self._arm(self.registry.limits.idle_timeout, self._body_stalled)
        elif not self._headers_fit(data):  # the next request's headers, even mid-response
            self.refuse(431, "request headers are larger than "
                             f"{self.registry.limits.max_header_bytes} bytes",
                        "headers_too_large", retry_after=None)
            return
        super().data_received(data)

    def _headers_fit(self, data: bytes) -> bool:
        """Count header bytes before the parser buffers them (httptools has no limit)."""
        cap = self.registry.limits.max_header_bytes
        window = self._tail + data
        end = window.find(b"\r\n\r\n")
        used = len(data) if end < 0 else end + 4 - len(self._tail)
        if self._header_bytes + used > cap:
            return False
        self._header_bytes += len(data) if end < 0 else 0
        self._tail = window[-3:]
        return True

    def on_message_begin(self) -> None:
        super().on_message_begin()
        scope: dict[str, Any] = self.scope  # type: ignore[assignment]
        scope["extensions"] = {EXTENSION: self.marks}

    def on_headers_complete(self) -> None:
        self._in_request = self._in_body = True
        self._header_bytes, self._tail = 0, b""
        self.registry.waiting.pop(self, None)
        super().on_headers_complete()
        if self.pipeline:  # queued behind a running request: uvicorn stopped reading
            self._cancel_deadline()
        else:
            self._arm(self.registry.limits.idle_timeout, self._body_stalled)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._cancel_deadline()  # the body is in; the answer may take as long as it takes
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request
        if self.transport.is_closing():
            return
        if self._in_body:  # answered before its body was read (401, 413): not reusable
            self.drop()
        elif self.cycle is None or self.cycle.response_complete:
            self._await_headers()

    def _await_headers(self) -> None:
        self._in_request = False
        self.registry.waiting[self] = None
        self._arm(self.registry.limits.header_timeout, self._headers_late)

    # --- timers -------------------------------------------------------------------------------

    def _arm(self, seconds: float, then: Any) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(seconds, then)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        if self._in_request or self.transport.is_closing():
            return
        if self._header_bytes or self._tail:
            self.refuse(408, "request headers took too long", "request_timeout", retry_after=None)
        else:
            self.drop()  # idle (fresh or keep-alive): close quietly, as keep-alive expiry does

    def _body_stalled(self) -> None:
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            log.info("closing %s: the request body stopped arriving", self._address)
            self.drop()

    # --- ending -------------------------------------------------------------------------------

    def drop(self) -> None:
        self._forget()
        if not self.transport.is_closing():
            self.transport.close()

    def refuse(self, status: int, message: str, code: str, retry_after: int | None) -> None:
        """Answer with JSON, shut the write side, drain what the client still sends for a
        moment (so it reads the answer instead of a reset), then close."""
        self.registry.refused += 1
        self._refused = True
        self._forget()
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(error_response(status, message, code, retry_after))
        reg = self.registry
        if reg.lingering >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        reg.lingering += 1

        def close() -> None:
            reg.lingering -= 1
            transport.close()

        self.loop.call_later(LINGER, close)

    def send_400_response(self, msg: str) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            self.drop()  # garbage after a request whose answer is still being written
            return
        self.refuse(400, "the request is not valid HTTP/1.1", "invalid_http", retry_after=None)


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedProtocol]:
    """A protocol class for uvicorn's `http=` option, with its own registry."""
    return type("ApplianceHttpProtocol", (GuardedProtocol,), {"registry": _Registry(limits)})


def mark_keyed(scope: dict[str, Any] | Any) -> None:
    """Called by the API guard when a request carried a valid key."""
    marks = scope.get("extensions", {}).get(EXTENSION)
    if isinstance(marks, Marks):
        marks.keyed = True
