"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from appliance.api import grammar, responses, toolcalls
from appliance.api.errors import blame
from appliance.api.generation import (
    allowed_models,
    answer_limit,
    check_chars,
    check_logit_bias,
    choice_count,
    collect_choices,
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
from appliance.engines.events import Finish, PromptScores, Stream
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
        return grammar.tool_call(req.tools, only, parallel=only is None
                                 and req.parallel_tool_calls is not False)
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return grammar.json_object()
    assert rf.json_schema is not None and rf.json_schema.schema_ is not None
    return grammar.json_schema(rf.json_schema.schema_)


def tool_parser(req: ChatCompletionRequest) -> toolcalls.Parser | None:
    """A reader of the tool calls in one answer; None when no call is possible."""
    if not req.tools or req.tool_choice == "none":
        return None
    only = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
    names = [only] if only else [t.function.name for t in req.tools]
    return toolcalls.Parser(names, forced=forced_tool(req),
                            parallel=req.parallel_tool_calls is not False)


def finish_reason(reason: str, parser: toolcalls.Parser | None) -> str:
    """A call cut off by max_tokens still ends with `length`, so the client knows its
    arguments may be incomplete."""
    if parser is not None and parser.calls and reason != "length":
        return "tool_calls"
    return reason


@dataclass(frozen=True)
class Started:
    """A chat request running on its engine (Responses and Messages are translated into one)."""

    req: ChatCompletionRequest
    served: Served[ChatBackend]
    stream: Stream
    n: int
    prompt_tokens: int


async def prompt(req: ChatCompletionRequest, request: Request) -> tuple[Served[ChatBackend],
                                                                        list[int]]:
    """The request checked, its model looked up and its prompt rendered (not yet fitted)."""
    req.check()
    choice_count(req, request)
    served = runtime(request).chat(req.model, allowed_models(request))
    engine = served.engine
    refuse_media(req.messages, served.id)
    check_logit_bias(engine, req)
    check_chars((m.text() for m in req.messages), engine.ctx_per_seq, "messages")
    tools = None
    if req.tools and req.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
    parallel = req.parallel_tool_calls is not False
    with blame("messages"):
        return served, await asyncio.to_thread(engine.chat_prompt, messages(req), tools,
                                               parallel)


async def start(req: ChatCompletionRequest, request: Request) -> Started:
    """The request fitted to the context, its grammar built, and queued on its engine."""
    served, tokens = await prompt(req, request)
    engine, n = served.engine, choice_count(req, request)
    with blame("messages"):
        max_tokens = answer_limit(engine, len(tokens), req.token_limit,
                                  runtime(request).settings.default_max_tokens)
    forced = forced_tool(req)
    top = (req.top_logprobs or 0) if req.logprobs else None
    gen = GenerationRequest(tokens, max_tokens, sampling(req), req.stops, None, top, n=n)
    if forced or (req.response_format and req.response_format.type != "text"):
        with blame("tools" if forced else "response_format"):
            await prepare_grammar(engine, gen, lambda: answer_grammar(req))
    with blame("messages"):
        stream = submit(engine, gen)
    return Started(req, served, stream, n, len(tokens))


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response | dict[
        str, Any]:
    started = await start(req, request)
    served, stream, n = started.served, started.stream, started.n
    envelope = responses.Envelope(served, responses.new_id("chatcmpl"), "chat.completion")
    if req.stream:
        envelope.base["object"] = "chat.completion.chunk"
        return StreamingResponse(_stream(served, req, n, stream, request, envelope),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    got = await collect_choices(stream, request, n)
    if got is None:
        return Response(status_code=499)
    choices = []
    for i, choice in enumerate(got):
        assert choice.finish is not None
        message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
        parser = tool_parser(req)
        if parser is not None:
            said = "".join(ev.text for ev in parser.feed(choice.text) + parser.close()
                           if isinstance(ev, toolcalls.Text))
            if parser.calls:
                message["content"] = said if said.strip() else None
                message["tool_calls"] = [responses.tool_call(c) for c in parser.calls]
        logprobs = ({"content": [logprob_entry(served, ev) for ev in choice.tokens],
                     "refusal": None} if req.logprobs else None)
        choices.append({"index": i, "message": message, "logprobs": logprobs,
                        "finish_reason": finish_reason(choice.finish.reason, parser)})
    return envelope.chat(choices, responses.usage(c.finish for c in got if c.finish))


def _deltas(evs: Sequence[toolcalls.ToolEvent]) -> list[dict[str, Any]]:
    """Chunk deltas for the events of one token: text, or a call's start or arguments."""
    out: list[dict[str, Any]] = []
    for ev in evs:
        if isinstance(ev, toolcalls.Text):
            out.append({"content": ev.text})
        elif (call := responses.tool_call_delta(ev)) is not None:
            out.append({"tool_calls": [call]})
    return out


async def _stream(served: Served[ChatBackend], req: ChatCompletionRequest, n: int,
                  stream: Stream, request: Request,
                  envelope: responses.Envelope) -> AsyncIterator[bytes]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    parsers = [tool_parser(req) for _ in range(n)]
    # logprobs of tokens whose text is not out yet (held back, or inside a call) ride along
    # with the next chunk of their choice
    pending: list[list[dict[str, Any]]] = [[] for _ in range(n)]

    def chunk(i: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        lp = None
        if req.logprobs:
            lp, pending[i] = {"content": pending[i], "refusal": None}, []
        return sse(envelope.chat_chunk(delta, finish, lp, include_usage, i))

    for i in range(n):
        yield sse(envelope.chat_chunk({"role": "assistant", "content": ""}, None, None,
                                      include_usage, i))
    finishes: list[Finish] = []
    async for ev in events(stream, request, n):
        i, parser = ev.index, parsers[ev.index]
        if isinstance(ev, PromptScores):
            continue
        if isinstance(ev, Finish):
            if ev.reason == "error":
                yield sse_error(ev.error)
                break
            if ev.reason == "cancelled":
                break
            last = (parser.feed(ev.text) + parser.close() if parser else
                    [toolcalls.Text(ev.text)] if ev.text else [])
            for delta in _deltas(last):
                yield chunk(i, delta)
            yield chunk(i, {}, finish_reason(ev.reason, parser))
            finishes.append(ev)
            continue
        if req.logprobs:
            pending[i].append(logprob_entry(served, ev))
        said = (parser.feed(ev.text) if parser else
                [toolcalls.Text(ev.text)] if ev.text else [])
        for delta in _deltas(said):
            yield chunk(i, delta)
    if include_usage and len(finishes) == n:
        yield sse(envelope.usage_chunk(finishes))
    yield DONE
