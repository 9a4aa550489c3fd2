"""OpenAI-compatible routes for chat and completions, plus health and metrics."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from appliance import __version__
from appliance.api import grammar
from appliance.api.app import ApiError, sse, sse_error
from appliance.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    Sampled,
    Unsupported,
)
from appliance.bundle import manifest as mf
from appliance.engines import prompt as chat_template
from appliance.engines.chat import (
    ContextTooLong,
    EngineBusy,
    Finish,
    GenerationRequest,
    GrammarError,
    Sampling,
    Stream,
    TokenEvent,
)
from appliance.serve.runtime import LoadedModel, Runtime

router = APIRouter()
DISCONNECT_POLL = 0.5
# Text is measured before it is tokenised: no tokenizer here puts more characters than this in
# one token, so longer text cannot fit the context whatever it says.
MAX_CHARS_PER_TOKEN = 64
# Grammars are converted and compiled on one worker thread, one at a time, never on the event
# loop or the scheduler thread; the schema limits in grammar.py keep one build well below this.
GRAMMAR_WORKER = ThreadPoolExecutor(1, thread_name_prefix="grammar")
GRAMMAR_WAIT = 15.0


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _model_card(m: LoadedModel) -> dict[str, Any]:
    return {"id": m.id, "object": "model", "created": m.created, "owned_by": m.bundle}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(m) for m in _runtime(request).served()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    for m in _runtime(request).served():
        if m.id == model_id:
            return _model_card(m)
    raise ApiError(404, f"The model `{model_id}` does not exist", param="model",
                   code="model_not_found")


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    report = _runtime(request).health()
    return JSONResponse(report, status_code=503 if report["status"] == "unhealthy" else 200)


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    runtime = _runtime(request)
    lines = [f"appliance_{k} {v}" for k, v in runtime.lanes.report().items()]
    for model, load in runtime.load_report().items():
        task = load.pop("task")
        for key, value in load.items():
            lines.append(f'appliance_{task}_{key}{{model="{model}"}} {value}')
    return PlainTextResponse("\n".join(lines) + "\n")


# --- shared generation plumbing ---------------------------------------------------------------

def _sampling(req: Sampled) -> Sampling:
    return Sampling(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repeat_penalty=req.repetition_penalty or 1.0,
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
    )


def _submit(model: LoadedModel, gen: GenerationRequest) -> Stream:
    stream = Stream(asyncio.get_running_loop())
    try:
        model.engine.submit(gen, stream)
    except EngineBusy:
        raise ApiError(503, "the server is at capacity; retry shortly", "server_error",
                       code="server_busy", headers={"Retry-After": "1"}) from None
    except ContextTooLong as exc:
        raise ApiError(400, exc.message, param="messages",
                       code="context_length_exceeded") from None
    return stream


def _check_chars(texts: Iterable[str], tokens: int, param: str) -> None:
    """Refuse text that cannot fit `tokens` before spending time tokenising it."""
    limit = tokens * MAX_CHARS_PER_TOKEN
    total = 0
    for text in texts:
        total += len(text)
        if total > limit:
            raise ApiError(400, f"{param} holds more than {limit} characters; this model's "
                                f"context is {tokens} tokens", param=param,
                           code="context_length_exceeded")


async def _prepare_grammar(model: LoadedModel, gen: GenerationRequest,
                           build: Callable[[], str | None], param: str) -> None:
    """Convert the request's constraint into a grammar and compile its sampler, on the grammar
    worker. Sets gen.grammar and gen.sampler; a bad schema is a 400 naming the field."""

    def work() -> Any:
        gen.grammar = build()
        return model.engine.make_sampler(gen) if gen.grammar else None

    future = asyncio.get_running_loop().run_in_executor(GRAMMAR_WORKER, work)
    try:
        gen.sampler = await asyncio.wait_for(asyncio.shield(future), GRAMMAR_WAIT)
    except TimeoutError:
        def free(done: asyncio.Future[Any]) -> None:  # the build finishes on its own
            if not done.cancelled() and done.exception() is None:
                gen.sampler = done.result()
                model.engine.discard(gen)

        future.add_done_callback(free)
        raise ApiError(503, "grammar builds are backed up; retry shortly", "server_error",
                       code="server_busy", headers={"Retry-After": "5"}) from None
    except GrammarError as exc:
        raise ApiError(400, f"{param}: {exc.message}", param=param) from None


def _check_logit_bias(model: LoadedModel, req: Sampled) -> None:
    for key in req.logit_bias or {}:
        if int(key) >= model.engine.n_vocab:
            raise Unsupported("logit_bias", f"token id {key} is outside the vocabulary")


async def _events(stream: Stream, request: Request) -> AsyncIterator[TokenEvent | Finish]:
    """Events until Finish. A watcher cancels the sequence if the client goes away (the engine
    then ends the stream with a `cancelled` Finish); the token path itself waits on nothing
    else, so each token costs one queue hand-off."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL)
        stream.cancel()

    watcher = asyncio.create_task(watch())
    try:
        while True:
            event = await stream.get()
            yield event
            if isinstance(event, Finish):
                return
    finally:
        watcher.cancel()
        stream.cancel()  # no-op when finished; frees the sequence when we stop early


async def _collect(stream: Stream, request: Request) -> tuple[str, list[TokenEvent],
                                                             Finish | None]:
    """The whole answer of a non-streamed request; Finish is None if the client left."""
    text = ""
    events: list[TokenEvent] = []
    async for ev in _events(stream, request):
        text += ev.text
        if isinstance(ev, Finish):
            if ev.reason == "error":
                raise ApiError(500, ev.error or "generation failed", "server_error")
            return text, events, None if ev.reason == "cancelled" else ev
        events.append(ev)
    return text, events, None


def _usage(f: Finish) -> dict[str, int]:
    return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
            "total_tokens": f.prompt_tokens + f.completion_tokens}


def _logprob_entry(model: LoadedModel, ev: TokenEvent) -> dict[str, Any]:
    engine = model.engine

    def one(token: int, lp: float) -> dict[str, Any]:
        piece = engine.piece(token)
        return {"token": piece.decode("utf-8", "replace"), "logprob": lp, "bytes": list(piece)}

    entry = one(ev.token, ev.logprob or 0.0)
    entry["top_logprobs"] = [one(t, lp) for t, lp in ev.top or []]
    return entry


# --- chat ---------------------------------------------------------------------------------------

def _messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                               "content": m.text()}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [tc.model_dump() for tc in m.tool_calls]
            if not msg["content"]:
                msg["content"] = "\n".join(
                    f'{{"name": "{tc.function.name}", "arguments": {tc.function.arguments}}}'
                    for tc in m.tool_calls)
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _forced_tool(req: ChatCompletionRequest) -> bool:
    return bool(req.tools) and req.tool_choice not in (None, "none", "auto")


def _chat_grammar(req: ChatCompletionRequest) -> str | None:
    """The grammar the answer must follow, if any (slow: run on the grammar worker)."""
    if _forced_tool(req):
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


def _prompt_tokens(model: LoadedModel, req: ChatCompletionRequest) -> list[int]:
    if not model.template:
        raise ApiError(400, f"model {model.id} has no chat template; use /v1/completions",
                       param="model", code="no_chat_template")
    tools = None
    if req.tools and req.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
    try:
        text = chat_template.render(model.template, _messages(req), bos=model.bos,
                                    eos=model.eos, tools=tools)
    except chat_template.TemplateFailure as exc:
        raise ApiError(400, str(exc), param="messages") from None
    engine = model.engine
    add_bos = not (model.bos and text.startswith(model.bos))
    return list(engine.tokenize(text, add_special=add_bos, parse_special=True))


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response | dict[
        str, Any]:
    req.check()
    model = _runtime(request).get(req.model, mf.Task.CHAT)
    _check_logit_bias(model, req)
    _check_chars((m.text() for m in req.messages), model.engine.ctx_per_seq, "messages")
    prompt = await asyncio.to_thread(_prompt_tokens, model, req)
    try:
        max_tokens = model.engine.check_fits(len(prompt), req.token_limit)
    except ContextTooLong as exc:
        raise ApiError(400, exc.message, param="messages",
                       code="context_length_exceeded") from None
    forced_tool = _forced_tool(req)
    top = (req.top_logprobs or 0) if req.logprobs else None
    gen = GenerationRequest(prompt, max_tokens, _sampling(req), req.stops, None, top)
    if forced_tool or (req.response_format and req.response_format.type != "text"):
        await _prepare_grammar(model, gen, lambda: _chat_grammar(req),
                               "tools" if forced_tool else "response_format")
    stream = _submit(model, gen)
    ident = f"chatcmpl-{secrets.token_hex(12)}"
    tools_possible = bool(req.tools) and req.tool_choice != "none"
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _chat_stream(model, req, stream, request, ident, include_usage, tools_possible,
                         forced_tool),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    text, events, finish = await _collect(stream, request)
    if finish is None:
        return Response(status_code=499)
    logprobs = [_logprob_entry(model, ev) for ev in events] if req.logprobs else []
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    reason = finish.reason
    call = grammar.parse_tool_call(text, req.tools) if tools_possible and req.tools else None
    if call is not None:
        message["content"] = None
        message["tool_calls"] = [_tool_call_json(call)]
        reason = "tool_calls"
    return {
        "id": ident, "object": "chat.completion", "created": int(time.time()),
        "model": model.id, "system_fingerprint": _fingerprint(model),
        "choices": [{"index": 0, "message": message, "finish_reason": reason,
                     "logprobs": {"content": logprobs, "refusal": None} if req.logprobs
                     else None}],
        "usage": _usage(finish),
    }


def _tool_call_json(call: tuple[str, str], index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": f"call_{secrets.token_hex(12)}", "type": "function",
                           "function": {"name": call[0], "arguments": call[1]}}
    if index is not None:
        out["index"] = index
    return out


def _fingerprint(model: LoadedModel) -> str:
    return f"appliance-{__version__}-{model.bundle}-{model.sequence}"


async def _chat_stream(model: LoadedModel, req: ChatCompletionRequest, stream: Stream,
                       request: Request, ident: str, include_usage: bool,
                       tools_possible: bool, forced_tool: bool) -> AsyncIterator[bytes]:
    created = int(time.time())
    base = {"id": ident, "object": "chat.completion.chunk", "created": created,
            "model": model.id, "system_fingerprint": _fingerprint(model)}

    def chunk(delta: dict[str, Any], finish: str | None = None,
              logprobs: Any = None) -> bytes:
        body: dict[str, Any] = {**base, "choices": [
            {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    yield chunk({"role": "assistant", "content": ""})
    # A tool call is only known once its JSON is complete: hold text back while it may be one.
    held, holding = "", forced_tool
    async for ev in _events(stream, request):
        if isinstance(ev, Finish):
            if ev.reason == "error":
                yield sse_error(ev.error)
                break
            held += ev.text
            call = grammar.parse_tool_call(held, req.tools or []) if tools_possible else None
            reason = ev.reason
            if call is not None:
                yield chunk({"tool_calls": [_tool_call_json(call, 0)]})
                reason = "tool_calls"
            elif held:
                yield chunk({"content": held})
            yield chunk({}, reason)
            if include_usage:
                yield sse({**base, "choices": [], "usage": _usage(ev)})
            break
        lp = {"content": [_logprob_entry(model, ev)], "refusal": None} if req.logprobs else None
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
    yield sse("[DONE]")


# --- completions ----------------------------------------------------------------------------

@router.post("/v1/completions", response_model=None)
async def completions(req: CompletionRequest, request: Request) -> Response | dict[str, Any]:
    req.check()
    model = _runtime(request).get(req.model, mf.Task.CHAT)
    _check_logit_bias(model, req)
    engine = model.engine
    for i, text in enumerate(req.prompts):
        _check_chars([text], engine.ctx_per_seq, "prompt" if len(req.prompts) == 1 else
                     f"prompt.{i}")

    def tokenize() -> list[list[int]]:
        return [engine.tokenize(p, add_special=True, parse_special=False) for p in req.prompts]

    prompts = await asyncio.to_thread(tokenize)
    gens = []
    for tokens in prompts:
        try:
            limit = engine.check_fits(len(tokens), req.max_tokens or 16)
        except ContextTooLong as exc:
            raise ApiError(400, exc.message, param="prompt",
                           code="context_length_exceeded") from None
        gens.append(GenerationRequest(tokens, limit, _sampling(req), req.stops, None,
                                      req.logprobs))
    streams = [_submit(model, g) for g in gens]
    ident = f"cmpl-{secrets.token_hex(12)}"
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _completion_stream(model, req, streams[0], request, ident, include_usage),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for i, (prompt, stream) in enumerate(zip(req.prompts, streams, strict=True)):
        text, events, finish = await _collect(stream, request)
        if finish is None:
            return Response(status_code=499)
        text = (prompt if req.echo else "") + text
        for key, value in _usage(finish).items():
            usage[key] += value
        choices.append({"index": i, "text": text, "finish_reason": finish.reason,
                        "logprobs": _legacy_logprobs(model, events) if req.logprobs is not None
                        else None})
    return {"id": ident, "object": "text_completion", "created": int(time.time()),
            "model": model.id, "system_fingerprint": _fingerprint(model), "choices": choices,
            "usage": usage}


def _legacy_logprobs(model: LoadedModel, events: list[TokenEvent]) -> dict[str, Any]:
    tokens, lps, tops, offsets, offset = [], [], [], [], 0
    for ev in events:
        piece = model.engine.piece(ev.token).decode("utf-8", "replace")
        tokens.append(piece)
        lps.append(ev.logprob)
        tops.append({model.engine.piece(t).decode("utf-8", "replace"): lp
                     for t, lp in ev.top or []})
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def _completion_stream(model: LoadedModel, req: CompletionRequest, stream: Stream,
                             request: Request, ident: str,
                             include_usage: bool) -> AsyncIterator[bytes]:
    base = {"id": ident, "object": "text_completion", "created": int(time.time()),
            "model": model.id, "system_fingerprint": _fingerprint(model)}

    def chunk(text: str, finish: str | None = None) -> bytes:
        body: dict[str, Any] = {**base, "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    if req.echo:
        yield chunk(req.prompts[0])
    async for ev in _events(stream, request):
        if isinstance(ev, Finish):
            if ev.reason == "error":
                yield sse_error(ev.error)
                break
            yield chunk(ev.text, ev.reason)
            if include_usage:
                yield sse({**base, "choices": [], "usage": _usage(ev)})
            break
        if ev.text:
            yield chunk(ev.text)
    yield sse("[DONE]")
