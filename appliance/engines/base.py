"""The interface of each engine task, as the runtime and the API see it. The real engines
(chat.py, embed.py, transcribe.py) and the fakes of the fast tests (tests/fakes.py) both
satisfy these protocols; nothing above the engines depends on a concrete engine class."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from appliance.engines.chat import GenerationRequest
    from appliance.engines.events import Stream
    from appliance.engines.transcribe import Segment, Transcript


class Engine(Protocol):
    stats: dict[str, Any]

    def health(self) -> str:
        """ok, or dead / stuck: what a restart would cure."""

    def idle(self) -> bool:
        """No request running or waiting: the engine may be closed."""

    def close(self) -> None: ...


class ChatBackend(Engine, Protocol):
    ctx_per_seq: int
    n_vocab: int
    template: str | None  # the chat template; None for a base model (completions only)

    @property
    def active_count(self) -> int: ...

    @property
    def queue_depth(self) -> int: ...

    def chat_prompt(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None,
                    parallel: bool = True) -> list[int]: ...

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]: ...

    def piece(self, token: int, special: bool = False) -> bytes: ...

    def check_fits(self, n_prompt: int, max_tokens: int | None) -> int: ...

    def make_sampler(self, req: GenerationRequest) -> Any: ...

    def discard(self, req: GenerationRequest) -> None: ...

    def submit(self, req: GenerationRequest, stream: Stream) -> None: ...


class EmbedBackend(Engine, Protocol):
    max_tokens: int
    dimensions: int

    def encode(self, texts: list[str]) -> list[list[int]]: ...

    def wrap(self, token_lists: list[list[int]]) -> list[list[int]]: ...

    def submit(self, ids: list[list[int]]) -> Future[np.ndarray]: ...


class TranscribeBackend(Engine, Protocol):
    multilingual: bool
    languages: tuple[str, ...]  # the ones it takes (language codes)

    def check(self, language: str | None, translate: bool) -> None: ...

    def admit(self) -> None:
        """Take a place in the queue, or raise Busy."""

    def leave(self) -> None: ...

    def transcribe(self, audio: np.ndarray, **kw: Any) -> Transcript: ...

    def segments(self, audio: np.ndarray, **kw: Any) -> Iterator[Segment]:
        """Segments as they are decoded (holding a core lane while it runs)."""
