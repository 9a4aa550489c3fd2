"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, translated into a
chat completion (anthropic_protocol.py) and served by the chat path; the answer is read as a
turn (turn.py) and written as a Message, or as the events Anthropic's SDK assembles one from.
Errors on these routes are Anthropic's shape (api/errors.py)."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from appliance.api import chat, turn
from appliance.api.anthropic_protocol import RENAMES, CountTokensRequest, MessagesRequest
from appliance.api.errors import anthropic_body, renamed
from appliance.api.sse import sse_event
from appliance.engines.events import Finish
from appliance.errors import ApplianceError

router = APIRouter()


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def stop_reason(reason: str, finish: Finish) -> str:
    if reason == "tool_calls":
        return "tool_use"
    if reason == "length":
        return "max_tokens"
    return "stop_sequence" if finish.stop is not None else "end_turn"


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as the input object; one cut short by max_tokens may not parse
    (its text went out in the stream's input_json_delta, and stop_reason says max_tokens)."""
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


@router.post("/v1/messages", response_model=None)
async def create_message(req: MessagesRequest, request: Request) -> Response | dict[str, Any]:
    req.check()
    with renamed(RENAMES):
        started = await chat.start(req.to_chat(), request)
    message: dict[str, Any] = {"id": _id("msg"), "type": "message", "role": "assistant",
               "model": started.served.id, "content": [], "stop_reason": None,
               "stop_sequence": None,
               "usage": {"input_tokens": started.prompt_tokens, "output_tokens": 0}}
    if req.stream:
        return StreamingResponse(_stream(message, started, request),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    got = await turn.whole(started, request)
    if got is None or got.finish is None:
        return Response(status_code=499)
    content: list[dict[str, Any]] = [{"type": "text", "text": got.text}] if got.text.strip() or (
        got.text and not got.calls) else []
    content += [{"type": "tool_use", "id": tool_use_id(c.id), "name": c.name,
                 "input": tool_input(c.arguments)} for c in got.calls]
    return {**message, "content": content, "stop_reason": stop_reason(got.reason, got.finish),
            "stop_sequence": got.finish.stop, "usage": usage(got.finish)}


def usage(finish: Finish) -> dict[str, int]:
    """Anthropic counts the prompt tokens read from a cache apart from the others."""
    return {"input_tokens": finish.prompt_tokens - finish.cached_tokens,
            "cache_read_input_tokens": finish.cached_tokens,
            "output_tokens": finish.completion_tokens}


@router.post("/v1/messages/count_tokens")
async def count_tokens(req: CountTokensRequest, request: Request) -> dict[str, Any]:
    """The prompt's tokens as the model sees it: the chat template's, tools included."""
    req.check()
    with renamed(RENAMES):
        _, tokens = await chat.prompt(req.to_chat(), request)
    return {"input_tokens": len(tokens)}


async def _stream(message: dict[str, Any], started: chat.Started,
                  request: Request) -> AsyncIterator[bytes]:
    yield sse_event({"type": "message_start", "message": message})
    yield sse_event({"type": "ping"})
    blocks = 0  # content blocks so far
    text_open = False
    calls: dict[int, int] = {}  # the turn's call index -> its block index

    def stop_text() -> list[bytes]:
        nonlocal text_open, blocks
        if not text_open:
            return []
        text_open = False
        blocks += 1
        return [sse_event({"type": "content_block_stop", "index": blocks - 1})]

    async for got in turn.read(started, request):
        chunks: list[bytes] = []
        if isinstance(got, turn.Text):
            if not text_open:
                text_open = True
                chunks.append(sse_event({"type": "content_block_start", "index": blocks,
                                         "content_block": {"type": "text", "text": ""}}))
            chunks.append(sse_event({"type": "content_block_delta", "index": blocks,
                                     "delta": {"type": "text_delta", "text": got.text}}))
        elif isinstance(got, turn.CallStart):
            chunks = stop_text()
            calls[got.index] = blocks
            blocks += 1
            chunks.append(sse_event({"type": "content_block_start", "index": calls[got.index],
                                     "content_block": {"type": "tool_use",
                                                       "id": tool_use_id(got.id),
                                                       "name": got.name, "input": {}}}))
        elif isinstance(got, turn.CallArgs):
            chunks = [sse_event({"type": "content_block_delta", "index": calls[got.index],
                                 "delta": {"type": "input_json_delta",
                                           "partial_json": got.delta}})]
        elif isinstance(got, turn.CallEnd):
            chunks = [sse_event({"type": "content_block_stop", "index": calls.pop(got.index)})]
        elif isinstance(got, turn.End):
            chunks = stop_text()
            chunks.append(sse_event({
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason(got.reason, got.finish),
                          "stop_sequence": got.finish.stop},
                "usage": usage(got.finish)}))
            chunks.append(sse_event({"type": "message_stop"}))
        elif isinstance(got, turn.Failed):
            chunks = [sse_event(anthropic_body(ApplianceError(got.message)))]
        for chunk in chunks:
            yield chunk
