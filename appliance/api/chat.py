"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from appliance.api import grammar, responses
from appliance.api.errors import blame
from appliance.api.generation import (
    allowed_models,
    answer_limit,
    check_chars,
    check_logit_bias,
    collect,
    events,
    logprob_entry,
    prepare_grammar,
    runtime,
    sampling,
    submit,
)
from appliance.api.protocol import ChatCompletionRequest, NamedToolChoice, refuse_media
from appliance.api.sse import DONE, sse, sse_error
from appliance.engines.base import ChatBackend
from appliance.engines.chat import GenerationRequest
from appliance.engines.events import Finish, Stream
from appliance.serve.runtime import Served

router = APIRouter()


def messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The conversation as the chat template reads it."""
    out = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                               "content": m.text()}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [tc.model_dump() for tc in m.tool_calls]
            if not msg["content"]:  # templates without tool support see the call as text
                msg["content"] = "\n".join(json.dumps(
                    {"name": tc.function.name, "arguments": _arguments(tc.function.arguments)},
                    ensure_ascii=False) for tc in m.tool_calls)
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _arguments(text: str) -> Any:
    """A call's arguments as sent (a JSON string), parsed when they are JSON."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def forced_tool(req: ChatCompletionRequest) -> bool:
    return bool(req.tools) and req.tool_choice not in (None, "none", "auto")


def answer_grammar(req: ChatCompletionRequest) -> str | None:
    """The grammar the answer must follow, if any (slow: run on the grammar worker)."""
    if forced_tool(req):
        assert req.tools is not None
        only = req.tool_choice.function.name if isinstance(req.tool_choice,
                                                           NamedToolChoice) else None
        return grammar.tool_call(req.tools, only)
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return grammar.json_object()
    assert rf.json_schema is not None and rf.json_schema.schema_ is not None
    return grammar.json_schema(rf.json_schema.schema_)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response | dict[
        str, Any]:
    req.check()
    served = runtime(request).chat(req.model, allowed_models(request))
    engine = served.engine
    refuse_media(req.messages, served.id)
    check_logit_bias(engine, req)
    check_chars((m.text() for m in req.messages), engine.ctx_per_seq, "messages")
    tools = None
    if req.tools and req.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
    with blame("messages"):
        prompt = await asyncio.to_thread(engine.chat_prompt, messages(req), tools)
        max_tokens = answer_limit(engine, len(prompt), req.token_limit,
                                  runtime(request).settings.default_max_tokens)
    forced = forced_tool(req)
    top = (req.top_logprobs or 0) if req.logprobs else None
    gen = GenerationRequest(prompt, max_tokens, sampling(req), req.stops, None, top)
    if forced or (req.response_format and req.response_format.type != "text"):
        with blame("tools" if forced else "response_format"):
            await prepare_grammar(engine, gen, lambda: answer_grammar(req))
    with blame("messages"):
        stream = submit(engine, gen)
    envelope = responses.Envelope(served, responses.new_id("chatcmpl"), "chat.completion")
    tools_possible = bool(req.tools) and req.tool_choice != "none"
    if req.stream:
        envelope.base["object"] = "chat.completion.chunk"
        return StreamingResponse(
            _stream(served, req, stream, request, envelope, tools_possible, forced),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    text, got, finish = await collect(stream, request)
    if finish is None:
        return Response(status_code=499)
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    reason = finish.reason
    call = grammar.parse_tool_call(text, req.tools) if tools_possible and req.tools else None
    if call is not None:
        message["content"] = None
        message["tool_calls"] = [responses.tool_call(*call)]
        reason = "tool_calls"
    logprobs = ({"content": [logprob_entry(served, ev) for ev in got], "refusal": None}
                if req.logprobs else None)
    return envelope.chat([{"index": 0, "message": message, "finish_reason": reason,
                           "logprobs": logprobs}], responses.usage(finish))


async def _stream(served: Served[ChatBackend], req: ChatCompletionRequest, stream: Stream,
                  request: Request, envelope: responses.Envelope, tools_possible: bool,
                  forced_tool: bool) -> AsyncIterator[bytes]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        return sse(envelope.chat_chunk(delta, finish, logprobs, include_usage))

    yield chunk({"role": "assistant", "content": ""})
    # A tool call is only known once its JSON is complete: hold text back while it may be one.
    held, holding = "", forced_tool
    async for ev in events(stream, request):
        if isinstance(ev, Finish):
            if ev.reason == "error":
                yield sse_error(ev.error)
                break
            held += ev.text
            call = grammar.parse_tool_call(held, req.tools or []) if tools_possible else None
            reason = ev.reason
            if call is not None:
                yield chunk({"tool_calls": [responses.tool_call(*call, index=0)]})
                reason = "tool_calls"
            elif held:
                yield chunk({"content": held})
            yield chunk({}, reason)
            if include_usage:
                yield sse(envelope.usage_chunk(ev))
            break
        lp = {"content": [logprob_entry(served, ev)], "refusal": None} if req.logprobs else None
        if tools_possible and not holding and not held and not ev.text.strip():
            held += ev.text
            continue
        if tools_possible and not holding and (held + ev.text).lstrip()[:1] in ("{", "<"):
            holding = True
        if holding:
            held += ev.text
            continue
        text, held = held + ev.text, ""
        if text or lp:
            yield chunk({"content": text}, logprobs=lp)
    yield DONE
