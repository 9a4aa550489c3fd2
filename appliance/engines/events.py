"""What a chat engine hands back: token events and one Finish per choice (a request asks for
`n` choices; events carry the choice's index), carried from the scheduler thread to a consumer
(an event loop, or a plain thread in tests and benchmarks)."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["Event", "Finish", "Outbox", "PromptScores", "Stream", "TokenEvent"]


@dataclass(frozen=True)
class TokenEvent:
    text: str
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    index: int = 0  # the choice


@dataclass(frozen=True)
class PromptScores:
    """The log-probability of each prompt token given the ones before it (the first has none:
    None), with the `top` alternatives at each position; sent once the prompt is decoded, for
    requests that ask (echo with logprobs)."""

    logprobs: list[float | None]
    top: list[list[tuple[int, float]]]
    index: int = 0


@dataclass(frozen=True)
class Finish:
    reason: str  # stop, length, cancelled, error
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # text released at the very end (held-back partial stop strings)
    error: str | None = None
    ttft: float | None = None
    index: int = 0
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache, not decoded
    stop: str | None = None  # the stop string that ended it (reason stop), if one did


Event = TokenEvent | PromptScores | Finish


class Stream:
    """Events of one request, handed from the engine thread to a consumer without blocking it.

    With an event loop the events go to an asyncio queue through call_soon_threadsafe; without
    one (tests, benchmarks) to a thread-safe queue."""

    def __init__(self, loop: Any | None = None) -> None:
        self._loop = loop
        self._cancelled = threading.Event()
        if loop is not None:
            import asyncio
            self._aq: Any = asyncio.Queue()
        else:
            self._q: queue.Queue[Event] = queue.Queue()

    def push(self, event: Event) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, event)
            except RuntimeError:  # loop closed: nobody is listening any more
                self._cancelled.set()
        else:
            self._q.put(event)

    async def get(self) -> Event:
        result: Event = await self._aq.get()
        return result

    def get_sync(self, timeout: float | None = None) -> Event:
        return self._q.get(timeout=timeout)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Outbox:
    """The events of one engine step, handed to each event loop with a single wake-up instead
    of one per token: every wake-up runs Python on a core that llama_decode's threads want."""

    def __init__(self) -> None:
        self._held: dict[Any, list[tuple[Stream, Event]]] = {}

    def put(self, stream: Stream, event: Event) -> None:
        if stream._loop is None:
            stream.push(event)
        else:
            self._held.setdefault(stream._loop, []).append((stream, event))

    def flush(self) -> None:
        held, self._held = self._held, {}
        for loop, items in held.items():
            try:
                loop.call_soon_threadsafe(_hand_over, items)
            except RuntimeError:  # loop closed: nobody is listening any more
                for stream, _ in items:
                    stream.cancel()


def _hand_over(items: list[tuple[Stream, Event]]) -> None:
    for stream, event in items:
        stream._aq.put_nowait(event)
