"""POST /v1/responses: OpenAI's Responses API, translated into a chat completion
(responses_protocol.py) and served by the chat path; the answer is read as a turn (turn.py) and
written as a Response object, or as the typed events the OpenAI SDK assembles one from."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from appliance.api import chat, turn
from appliance.api.errors import renamed
from appliance.api.responses_protocol import RENAMES, FunctionChoice, ResponsesRequest
from appliance.api.sse import sse_event
from appliance.engines.events import Finish

router = APIRouter()


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@router.post("/v1/responses", response_model=None)
async def create_response(req: ResponsesRequest, request: Request) -> Response | dict[str, Any]:
    req.check()
    with renamed(RENAMES):
        started = await chat.start(req.to_chat(), request)
    shape = Shape(req, started.served.id)
    if req.stream:
        return StreamingResponse(_stream(shape, started, request),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    got = await turn.whole(started, request)
    if got is None or got.finish is None:
        return Response(status_code=499)
    output = [shape.message(got.text, got.reason)] if got.text.strip() or not got.calls else []
    output += [shape.call(c.name, c.arguments, c.id, c.complete) for c in got.calls]
    return shape.response(output, got.reason, got.finish)


class Shape:
    """The Response object of one request: what it echoes of the request, in one place."""

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        fmt = req.text.format if req.text and req.text.format else None
        choice = req.tool_choice.model_dump() if isinstance(req.tool_choice,
                                                            FunctionChoice) else req.tool_choice
        self.base: dict[str, Any] = {
            "id": _id("resp"), "object": "response", "created_at": int(time.time()),
            "status": "in_progress", "error": None, "incomplete_details": None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {}, "model": model, "output": [],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None, "store": False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt
                     else {"type": "text"}},
            "tool_choice": choice or "auto",
            "tools": [t.model_dump() for t in req.tools or []],
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": "disabled", "usage": None, "user": req.user}

    def response(self, output: list[dict[str, Any]], reason: str | None,
                 finish: Finish | None, error: str | None = None) -> dict[str, Any]:
        """The Response; reason None: still running, or failed with `error`."""
        body = {**self.base, "output": output}
        if error is not None:
            body["status"] = "failed"
            body["error"] = {"code": "server_error", "message": error}
        elif reason == "length":
            body["status"] = "incomplete"
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        elif reason is not None:
            body["status"] = "completed"
        if finish is not None:
            body["usage"] = {"input_tokens": finish.prompt_tokens,
                             "input_tokens_details": {"cached_tokens": finish.cached_tokens},
                             "output_tokens": finish.completion_tokens,
                             "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": finish.prompt_tokens + finish.completion_tokens}
        return body

    @staticmethod
    def text_part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def message(self, text: str, reason: str | None, ident: str | None = None) -> dict[str, Any]:
        status = "in_progress" if reason is None else (
            "incomplete" if reason == "length" else "completed")
        return {"type": "message", "id": ident or _id("msg"), "status": status,
                "role": "assistant",
                "content": [] if reason is None else [self.text_part(text)]}

    @staticmethod
    def call(name: str, arguments: str, call_id: str, complete: bool | None,
             item_id: str | None = None) -> dict[str, Any]:
        """A function_call item; complete None: still being written (cut short: False)."""
        status = {None: "in_progress", True: "completed", False: "incomplete"}[complete]
        return {"type": "function_call", "id": item_id or _id("fc"), "call_id": call_id,
                "name": name, "arguments": arguments, "status": status}


class _Events:
    """The typed events of one streamed response, numbered in order; it keeps the output
    items so far, for the final Response."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.text: str | None = None  # of the open message item, if one is open
        self.calls: dict[int, dict[str, Any]] = {}  # open call items, by the turn's index

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse_event(payload)

    def lifecycle(self, kind: str, reason: str | None, finish: Finish | None = None,
                  error: str | None = None) -> bytes:
        return self.event(kind, response=self.shape.response(self.output, reason, finish, error))

    def open_message(self) -> list[bytes]:
        self.text = ""
        item = self.shape.message("", None)
        self.output.append(item)
        where = {"item_id": item["id"], "output_index": len(self.output) - 1}
        return [self.event("response.output_item.added", output_index=where["output_index"],
                           item=item),
                self.event("response.content_part.added", **where, content_index=0,
                           part=self.shape.text_part(""))]

    def text_delta(self, delta: str) -> list[bytes]:
        out = self.open_message() if self.text is None else []
        self.text = (self.text or "") + delta
        item = self.output[-1]
        out.append(self.event("response.output_text.delta", item_id=item["id"],
                              output_index=len(self.output) - 1, content_index=0, delta=delta,
                              logprobs=[]))
        return out

    def close_message(self, reason: str) -> list[bytes]:
        if self.text is None:
            return []
        text, self.text = self.text, None
        index = len(self.output) - 1
        item = self.output[index] = self.shape.message(text, reason, self.output[index]["id"])
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [self.event("response.output_text.done", **where, text=text, logprobs=[]),
                self.event("response.content_part.done", **where, part=item["content"][0]),
                self.event("response.output_item.done", output_index=index, item=item)]

    def open_call(self, index: int, call_id: str, name: str) -> list[bytes]:
        out = self.close_message("stop")
        item = self.shape.call(name, "", call_id, None)
        self.output.append(item)
        self.calls[index] = {"item": item, "at": len(self.output) - 1}
        return [*out, self.event("response.output_item.added", output_index=len(self.output) - 1,
                                 item=item)]

    def call_delta(self, index: int, delta: str) -> bytes:
        call = self.calls[index]
        return self.event("response.function_call_arguments.delta", item_id=call["item"]["id"],
                          output_index=call["at"], delta=delta)

    def close_call(self, index: int, arguments: str, complete: bool) -> list[bytes]:
        call = self.calls.pop(index)
        item = call["item"]
        done = self.shape.call(item["name"], arguments, item["call_id"], complete, item["id"])
        self.output[call["at"]] = done
        return [self.event("response.function_call_arguments.done", item_id=item["id"],
                           output_index=call["at"], name=item["name"], arguments=arguments),
                self.event("response.output_item.done", output_index=call["at"], item=done)]


async def _stream(shape: Shape, started: chat.Started, request: Request) -> AsyncIterator[bytes]:
    ev = _Events(shape)
    yield ev.lifecycle("response.created", None)
    yield ev.lifecycle("response.in_progress", None)
    async for got in turn.read(started, request):
        chunks: list[bytes] = []
        if isinstance(got, turn.Text):
            chunks = ev.text_delta(got.text)
        elif isinstance(got, turn.CallStart):
            chunks = ev.open_call(got.index, got.id, got.name)
        elif isinstance(got, turn.CallArgs):
            chunks = [ev.call_delta(got.index, got.delta)]
        elif isinstance(got, turn.CallEnd):
            chunks = ev.close_call(got.index, got.arguments, got.complete)
        elif isinstance(got, turn.End):
            if not ev.output:  # an empty answer is still a message
                chunks = ev.open_message()
            chunks += ev.close_message(got.reason)
            kind = "response.incomplete" if got.reason == "length" else "response.completed"
            chunks.append(ev.lifecycle(kind, got.reason, got.finish))
        elif isinstance(got, turn.Failed):
            chunks = [ev.event("error", code="server_error", message=got.message, param=None),
                      ev.lifecycle("response.failed", None, error=got.message)]
        for chunk in chunks:
            yield chunk
