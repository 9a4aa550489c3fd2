"""POST /v1/completions (the legacy text API: base models, evaluation harnesses)."""

from __future__ import annotations

import asyncio
import codecs
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
    choice_count,
    collect_choices,
    events,
    runtime,
    sampling,
    submit,
)
from appliance.api.protocol import CompletionRequest
from appliance.api.sse import DONE, sse, sse_error
from appliance.engines.base import ChatBackend
from appliance.engines.chat import GenerationRequest
from appliance.engines.events import Finish, PromptScores, Stream, TokenEvent
from appliance.serve.runtime import Served

router = APIRouter()


class LegacyLogprobs:
    """The completions API's logprobs object, built token by token. `text_offset` counts
    characters of the returned text, so offsets follow whole characters even where a token
    holds part of one."""

    def __init__(self, engine: ChatBackend, offset: int = 0) -> None:
        self.engine = engine
        self.offset = offset
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
        piece = self.engine.piece(token)
        self.tokens.append(piece.decode("utf-8", "replace"))
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(None if logprob is None else {
            self.engine.piece(t).decode("utf-8", "replace"): lp for t, lp in top or []})
        self.text_offset.append(self.offset)
        self.offset += len(self._decoder.decode(piece))

    def prompt(self, tokens: list[int], scores: PromptScores) -> None:
        for token, lp, top in zip(tokens, scores.logprobs, scores.top, strict=True):
            self.add(token, lp, top)

    def restart(self, offset: int) -> None:
        """Generated text follows the echoed prompt as the client sent it."""
        self.offset = offset
        self._decoder.reset()

    def take(self) -> dict[str, Any]:
        """The entries added since the last take."""
        out = {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
               "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out


@router.post("/v1/completions", response_model=None)
async def completions(req: CompletionRequest, request: Request) -> Response | dict[str, Any]:
    req.check()
    n = choice_count(req, request)
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
    score = bool(req.echo) and req.logprobs is not None
    for tokens, param in zip(await asyncio.to_thread(tokenize), where, strict=True):
        with blame(param):
            limit = engine.check_fits(len(tokens), default if req.max_tokens is None
                                      else req.max_tokens)
        gens.append(GenerationRequest(tokens, limit, sampling(req), req.stops, None,
                                      req.logprobs, n=n, prompt_logprobs=score))
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
        return StreamingResponse(_stream(served, req, n, gens[0], streams[0], request,
                                         envelope),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    choices, finishes = [], []
    try:
        for p, (prompt, gen, stream) in enumerate(zip(req.prompts, gens, streams, strict=True)):
            got = await collect_choices(stream, request, n)
            if got is None:
                return Response(status_code=499)
            for k, choice in enumerate(got):
                assert choice.finish is not None
                finishes.append(choice.finish)
                choices.append({"index": p * n + k,
                                "text": (prompt if req.echo else "") + choice.text,
                                "finish_reason": choice.finish.reason,
                                "logprobs": _logprobs(served, req, prompt, gen, got[0].prompt,
                                                      choice.tokens)})
    finally:
        for s in streams:  # the client left or one failed: the rest stop too (no-op if done)
            s.cancel()
    return {**envelope.base, "choices": choices, "usage": responses.usage(finishes)}


def _logprobs(served: Served[ChatBackend], req: CompletionRequest, prompt: str,
              gen: GenerationRequest, scores: PromptScores | None,
              got: list[TokenEvent]) -> dict[str, Any] | None:
    if req.logprobs is None:
        return None
    out = LegacyLogprobs(served.engine)
    if req.echo:
        assert scores is not None
        out.prompt(gen.prompt, scores)
        out.restart(len(prompt))
    for ev in got:
        out.add(ev.token, ev.logprob, ev.top)
    return out.take()


async def _stream(served: Served[ChatBackend], req: CompletionRequest, n: int,
                  gen: GenerationRequest, stream: Stream, request: Request,
                  envelope: responses.Envelope) -> AsyncIterator[bytes]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    prompt = req.prompts[0]
    lps = [LegacyLogprobs(served.engine, len(prompt) if req.echo else 0) for _ in range(n)]

    def chunk(i: int, text: str, finish: str | None = None) -> bytes:
        lp = lps[i].take() if req.logprobs is not None else None
        return sse(envelope.completion_chunk(text, finish, include_usage, i, lp))

    if req.echo and req.logprobs is None:
        for i in range(n):
            yield chunk(i, prompt)
    finishes: list[Finish] = []
    async for ev in events(stream, request, n):
        if isinstance(ev, PromptScores):  # the first choice's; every choice echoes the prompt
            for i in range(n):
                lps[i].restart(0)
                lps[i].prompt(gen.prompt, ev)
                lps[i].restart(len(prompt))
                yield chunk(i, prompt)
        elif isinstance(ev, Finish):
            if ev.reason == "error":
                yield sse_error(ev.error)
                break
            if ev.reason == "cancelled":
                break
            finishes.append(ev)
            yield chunk(ev.index, ev.text, ev.reason)
        else:
            if req.logprobs is not None:
                lps[ev.index].add(ev.token, ev.logprob, ev.top)
            if ev.text or req.logprobs is not None:
                yield chunk(ev.index, ev.text)
    if include_usage and len(finishes) == n:
        yield sse(envelope.usage_chunk(finishes))
    yield DONE
