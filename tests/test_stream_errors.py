"""An engine failure in the middle of a streamed answer reaches the client as an OpenAI error
event (the SDK raises it), and the stream still ends with [DONE]."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from appliance.api.chat import _completion_stream
from appliance.api.protocol import CompletionRequest
from appliance.engines.chat import Finish, Stream, TokenEvent


class _Connected:
    """Stands in for a Starlette request whose client stays connected."""

    async def is_disconnected(self) -> bool:
        return False


async def _collect() -> list[str]:
    stream = Stream(asyncio.get_running_loop())
    stream.push(TokenEvent("Hel", 1))
    stream.push(Finish("error", 3, 1, error="engine failure: RuntimeError"))
    model: Any = type("M", (), {"id": "m", "bundle": "b", "sequence": 1})()
    req = CompletionRequest(model="m", prompt="x", stream=True)
    chunks = [c.decode() async for c in _completion_stream(model, req, stream, _Connected(),
                                                           "cmpl-1", False)]  # type: ignore[arg-type]
    return chunks


def test_error_event_mid_stream() -> None:
    chunks = asyncio.run(_collect())
    payloads = [c.removeprefix("data: ").strip() for c in chunks]
    assert json.loads(payloads[0])["choices"][0]["text"] == "Hel"
    error = json.loads(payloads[1])["error"]
    assert error == {"message": "engine failure: RuntimeError", "type": "server_error",
                     "param": None, "code": None}
    assert payloads[-1] == "[DONE]" and len(payloads) == 3
