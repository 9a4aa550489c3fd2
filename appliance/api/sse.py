"""Server-sent events, as the OpenAI and Anthropic SDKs read them."""

from __future__ import annotations

import json
from typing import Any

from appliance.errors import ApplianceError


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def sse_event(payload: dict[str, Any]) -> bytes:
    """A typed event (Responses, Messages): its `type` is also the SSE event name, which
    Anthropic's SDK needs (it skips events without one)."""
    data = json.dumps(payload, ensure_ascii=False)
    return f"event: {payload['type']}\ndata: {data}\n\n".encode()


def sse_error(message: str | None) -> bytes:
    """An error in the middle of a stream: the OpenAI SDK raises it as an APIError."""
    return sse(ApplianceError(message or "generation failed").body())


DONE = sse("[DONE]")
