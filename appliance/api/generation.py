"""What chat and completions share: sampling parameters, limits checked before any work,
grammars built off the event loop, and the events of one generation; and what every route
shares: the runtime, and the models the request's API key may use."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from appliance.api.protocol import Sampled
from appliance.engines.base import ChatBackend
from appliance.engines.chat import GenerationRequest, Sampling
from appliance.engines.events import Event, Finish, PromptScores, Stream, TokenEvent
from appliance.errors import ApplianceError, Busy, ContextTooLong, Unsupported
from appliance.serve.runtime import Runtime, Served

DISCONNECT_POLL = 0.5
# Text is measured before it is tokenised: no tokenizer here puts more characters than this in
# one token, so longer text cannot fit the context whatever it says.
MAX_CHARS_PER_TOKEN = 64
# Grammars are converted and compiled on one worker thread, one at a time, never on the event
# loop or the scheduler thread; the schema limits in grammar.py keep one build well below this.
GRAMMAR_WORKER = ThreadPoolExecutor(1, thread_name_prefix="grammar")
GRAMMAR_WAIT = 15.0
GRAMMAR_BACKLOG = 8  # builds queued or running; past that, 503 at once
_grammar_pending = [0]


def runtime(request: Request) -> Runtime:
    found: Runtime = request.app.state.runtime
    return found


def allowed_models(request: Request) -> frozenset[str] | None:
    """The model ids the request's API key may use (set by the Guard); None: every model.
    Every lookup of a model by id goes through the runtime with this."""
    key = request.scope.get("state", {}).get("api_key")
    return frozenset(key.models) if key is not None and key.models else None


def sampling(req: Sampled) -> Sampling:
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


def choice_count(req: Sampled, request: Request) -> int:
    """The number of choices asked for (`n`), within the server's bound."""
    n = 1 if req.n is None else req.n
    limit = runtime(request).settings.max_n
    if not 1 <= n <= limit:
        raise Unsupported("n", f"n must be between 1 and {limit} on this server")
    return n


def check_logit_bias(engine: ChatBackend, req: Sampled) -> None:
    for key in req.logit_bias or {}:
        if int(key) >= engine.n_vocab:
            raise Unsupported("logit_bias", f"token id {key} is outside the vocabulary")


def answer_limit(engine: ChatBackend, n_prompt: int, asked: int | None, default: int) -> int:
    """The most tokens to generate: what the client asked for (ContextTooLong if that does
    not fit), else the room left in the context, at most `default` (the settings'
    default_max_tokens), so that a request without max_tokens cannot run for minutes."""
    fits = engine.check_fits(n_prompt, asked)
    return fits if asked is not None else min(fits, default)


def check_chars(texts: Iterable[str], tokens: int, param: str) -> None:
    """Refuse text that cannot fit `tokens` before spending time tokenising it."""
    limit = tokens * MAX_CHARS_PER_TOKEN
    total = 0
    for text in texts:
        total += len(text)
        if total > limit:
            raise ContextTooLong(f"{param} holds more than {limit} characters; this model's "
                                 f"context is {tokens} tokens", param=param)


async def prepare_grammar(engine: ChatBackend, gen: GenerationRequest,
                          build: Callable[[], str | None]) -> None:
    """Convert the request's constraint into a grammar and compile its sampler, on the grammar
    worker. Sets gen.grammar and gen.sampler."""

    if _grammar_pending[0] >= GRAMMAR_BACKLOG:
        raise Busy("grammar builds are backed up; retry shortly", retry_after=5)

    def work() -> Any:
        gen.grammar = build()
        return engine.make_sampler(gen) if gen.grammar else None

    _grammar_pending[0] += 1
    future = asyncio.get_running_loop().run_in_executor(GRAMMAR_WORKER, work)
    future.add_done_callback(lambda _: _grammar_pending.__setitem__(0, _grammar_pending[0] - 1))
    try:
        gen.sampler = await asyncio.wait_for(asyncio.shield(future), GRAMMAR_WAIT)
    except TimeoutError:
        if not future.cancel():  # already running: it finishes on its own; free what it makes
            def free(done: asyncio.Future[Any]) -> None:
                if not done.cancelled() and done.exception() is None:
                    gen.sampler = done.result()
                    engine.discard(gen)

            future.add_done_callback(free)
        raise Busy("grammar builds are backed up; retry shortly", retry_after=5) from None


def submit(engine: ChatBackend, gen: GenerationRequest) -> Stream:
    stream = Stream(asyncio.get_running_loop())
    engine.submit(gen, stream)
    return stream


async def events(stream: Stream, request: Request, n: int = 1) -> AsyncIterator[Event]:
    """Events until every one of the `n` choices has finished, or one ended the request
    (error, cancelled). A watcher cancels the sequences if the client goes away (the engine
    then ends them with `cancelled`); the token path itself waits on nothing else, so each
    token costs one queue hand-off."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL)
        stream.cancel()

    watcher = asyncio.create_task(watch())
    left = n
    try:
        while True:
            event = await stream.get()
            yield event
            if isinstance(event, Finish):
                left -= 1
                if not left or event.reason in ("error", "cancelled"):
                    return
    finally:
        watcher.cancel()
        stream.cancel()  # no-op when finished; frees the sequences when we stop early


@dataclass
class Choice:
    """One choice of a non-streamed answer."""

    text: str = ""
    tokens: list[TokenEvent] = field(default_factory=list)
    prompt: PromptScores | None = None
    finish: Finish | None = None


async def collect_choices(stream: Stream, request: Request, n: int = 1) -> list[Choice] | None:
    """The `n` whole answers of a non-streamed request; None if the client left."""
    choices = [Choice() for _ in range(n)]
    async for ev in events(stream, request, n):
        choice = choices[ev.index]
        if isinstance(ev, TokenEvent):
            choice.text += ev.text
            choice.tokens.append(ev)
        elif isinstance(ev, PromptScores):
            choice.prompt = ev
        else:
            if ev.reason == "error":
                raise ApplianceError(ev.error or "generation failed")
            if ev.reason == "cancelled":
                return None
            choice.text += ev.text
            choice.finish = ev
    return choices if all(c.finish for c in choices) else None


async def collect(stream: Stream, request: Request) -> tuple[str, list[TokenEvent],
                                                            Finish | None]:
    """The whole answer of a non-streamed request of one choice; Finish is None if the client
    left."""
    got = await collect_choices(stream, request)
    if got is None:
        return "", [], None
    return got[0].text, got[0].tokens, got[0].finish


def logprob_entry(served: Served[ChatBackend], ev: TokenEvent) -> dict[str, Any]:
    engine = served.engine

    def one(token: int, lp: float) -> dict[str, Any]:
        piece = engine.piece(token)
        return {"token": piece.decode("utf-8", "replace"), "logprob": lp, "bytes": list(piece)}

    entry = one(ev.token, ev.logprob or 0.0)
    entry["top_logprobs"] = [one(t, lp) for t, lp in ev.top or []]
    return entry
