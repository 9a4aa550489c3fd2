"""POST /v1/completions (the legacy text API: base models, evaluation harnesses)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from appliance.api import responses
from appliance.api.errors import blame
from appliance.api.generation import (
    allowed_models,
    check_chars,
    check_logit_bias,
    collect,
    events,
    runtime,
    sampling,
    submit,
)
from appliance.api.protocol import CompletionRequest
from appliance.api.sse import DONE, sse, sse_error
from appliance.engines.base import ChatBackend
from appliance.engines.chat import GenerationRequest
from appliance.engines.events import Finish, Stream, TokenEvent
from appliance.serve.runtime import Served

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def completions(req: CompletionRequest, request: Request) -> Response | dict[str, Any]:
    req.check()
    served = runtime(request).chat(req.model, allowed_models(request))
    engine = served.engine
    check_logit_bias(engine, req)
    where = ["prompt"] if len(req.prompts) == 1 else [f"prompt.{i}" for i in
                                                        range(len(req.prompts))]
    for text, param in zip(req.prompts, where, strict=True):
        check_chars([text], engine.ctx_per_seq, param)

    def tokenize() -> list[list[int]]:
        return [engine.tokenize(p, add_special=True, parse_special=False) for p in req.prompts]

    # OpenAI's default for completions, unless the settings' cap is smaller
    default = min(16, runtime(request).settings.default_max_tokens)
    gens = []
    for tokens, param in zip(await asyncio.to_thread(tokenize), where, strict=True):
        with blame(param):
            limit = engine.check_fits(len(tokens), req.max_tokens or default)
        gens.append(GenerationRequest(tokens, limit, sampling(req), req.stops, None,
                                      req.logprobs))
    streams: list[Stream] = []
    try:
        for gen in gens:
            streams.append(submit(engine, gen))
    except BaseException:
        for s in streams:  # the ones already queued must not run for nobody
            s.cancel()
        raise
    envelope = responses.Envelope(served, responses.new_id("cmpl"), "text_completion")
    if req.stream:
        return StreamingResponse(_stream(req, streams[0], request, envelope),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    try:
        for i, (prompt, stream) in enumerate(zip(req.prompts, streams, strict=True)):
            text, got, finish = await collect(stream, request)
            if finish is None:
                return Response(status_code=499)
            for key, value in responses.usage(finish).items():
                usage[key] += value
            choices.append({"index": i, "text": (prompt if req.echo else "") + text,
                            "finish_reason": finish.reason,
                            "logprobs": _legacy_logprobs(served, got)
                            if req.logprobs is not None else None})
    finally:
        for s in streams:  # the client left or one failed: the rest stop too (no-op if done)
            s.cancel()
    return {**envelope.base, "choices": choices, "usage": usage}


def _legacy_logprobs(served: Served[ChatBackend], got: list[TokenEvent]) -> dict[str, Any]:
    engine = served.engine
    tokens, lps, tops, offsets, offset = [], [], [], [], 0
    for ev in got:
        piece = engine.piece(ev.token).decode("utf-8", "replace")
        tokens.append(piece)
        lps.append(ev.logprob)
        tops.append({engine.piece(t).decode("utf-8", "replace"): lp for t, lp in ev.top or []})
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def _stream(req: CompletionRequest, stream: Stream, request: Request,
                  envelope: responses.Envelope) -> AsyncIterator[bytes]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(text: str, finish: str | None = None) -> bytes:
        return sse(envelope.completion_chunk(text, finish, include_usage))

    if req.echo:
        yield chunk(req.prompts[0])
    async for ev in events(stream, request):
        if isinstance(ev, Finish):
            if ev.reason == "error":
                yield sse_error(ev.error)
                break
            yield chunk(ev.text, ev.reason)
            if include_usage:
                yield sse(envelope.usage_chunk(ev))
            break
        if ev.text:
            yield chunk(ev.text)
    yield DONE
