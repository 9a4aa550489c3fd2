"""The chat engine's prefix cache, as bookkeeping: which KV stream holds the longest reusable
prefix of a new prompt, and where to keep a just-decoded prompt. The engine does the KV copies.

Sources are of three kinds:
- spare streams (`slots`) that keep recent long prompts;
- running sequences, as far as their prompt is decoded;
- free generating streams, which keep what their last sequence left (its prompt and all but
  the last token of its answer) until another sequence takes them (`kept`). A follow-up turn
  of a conversation starts with the last turn's prompt and answer, and a repeated prompt with
  itself.

Copying another stream's KV copies the whole stream (llama.cpp's seq_cp across streams), so
it is done only for a shared prefix of at least `min_prefix` tokens. A request takes the
lowest free stream (see the chat engine), and what that stream kept is reused in place at any
length: it costs no copy. Requests admitted together share out the lowest free streams, each
taking the one that kept most of its prompt (`kept_best`), so a burst of repeated prompts
finds its streams in whatever order it came. A request whose long prefix another sequence is
still prefilling waits for it (`in_flight`): copying that KV a step or two later beats
computing it twice.
With no slots the cache is off: no source of any kind.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Protocol


class Running(Protocol):
    """What the cache needs to know of a running sequence."""

    seq_id: int
    done_prompt: int

    @property
    def prompt(self) -> list[int]: ...


class PrefixCache:
    def __init__(self, slots: list[int], min_prefix: int) -> None:
        self.min_prefix = min_prefix
        self._slots: dict[int, tuple[list[int], float]] = {s: ([], 0.0) for s in slots}
        self._kept: dict[int, list[int]] = {}  # free generating stream -> tokens its KV holds

    @property
    def enabled(self) -> bool:
        return bool(self._slots)

    def in_flight(self, prompt: list[int], running: Iterable[Running]) -> bool:
        """Whether a running sequence shares a long prefix with `prompt` that it has not
        finished decoding yet."""
        if not self._slots:
            return False
        for src in running:
            shared = min(_common_prefix(src.prompt, prompt), len(prompt) - 1)
            if shared >= self.min_prefix and src.done_prompt < shared:
                return True
        return False

    def source(self, prompt: list[int], running: Iterable[Running],
               own: int = -1) -> tuple[int, int]:
        """(stream to start from, tokens to keep), or (-1, 0) when nothing is worth it. `own`
        is the stream the request takes: what it kept wins ties, and needs no minimum."""
        if not self._slots:
            return -1, 0
        last = len(prompt) - 1  # at least one prompt token is decoded: its logits are needed
        best, slot = 0, -1
        for slot_id, (tokens, _) in self._slots.items():
            n = _common_prefix(tokens, prompt)
            if n > best:
                best, slot = n, slot_id
        for src in running:
            n = min(_common_prefix(src.prompt, prompt), src.done_prompt)
            if n > best:
                best, slot = n, src.seq_id
        for stream, tokens in self._kept.items():
            if stream != own and (n := _common_prefix(tokens, prompt)) > best:
                best, slot = n, stream
        mine = min(_common_prefix(self._kept.get(own, []), prompt), last)
        keep = min(best, last)
        if mine > 0 and mine >= keep:
            return own, mine
        return (slot, keep) if keep >= self.min_prefix else (-1, 0)

    def kept_best(self, prompt: list[int], streams: list[int]) -> int:
        """Of the free `streams`, the one whose kept tokens share the longest prefix with
        `prompt`; the first on ties, and with the cache off."""
        best, pick = 0, streams[0]
        for stream in streams:
            if (n := _common_prefix(self._kept.get(stream, []), prompt)) > best:
                best, pick = n, stream
        return pick

    def keep(self, stream: int, tokens: list[int]) -> None:
        """Stream `stream` is free and its KV holds `tokens`."""
        if self._slots and tokens:
            self._kept[stream] = tokens
        else:
            self._kept.pop(stream, None)

    def forget(self, stream: int) -> None:
        """Stream `stream` is taken, or emptied: what it kept is gone."""
        self._kept.pop(stream, None)

    def used(self, slot: int) -> None:
        if slot in self._slots:
            self._slots[slot] = (self._slots[slot][0], time.monotonic())

    def slot_for(self, prompt: list[int]) -> int | None:
        """The least recently used slot to keep `prompt` in; None if it is too short or a
        cached prompt already covers it."""
        if not self._slots or len(prompt) < self.min_prefix:
            return None
        for tokens, _ in self._slots.values():
            if len(tokens) >= len(prompt) and tokens[:len(prompt)] == prompt:
                return None
        return min(self._slots, key=lambda k: self._slots[k][1])

    def saved(self, slot: int, prompt: list[int]) -> None:
        self._slots[slot] = (list(prompt), time.monotonic())


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix, by bisection over slice comparisons (which run in C: a
    request is compared with every kept stream, each up to a context long)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    same, differs = 0, n  # a[:same] == b[:same], a[:differs] != b[:differs]
    while differs - same > 1:
        mid = (same + differs) // 2
        if a[:mid] == b[:mid]:
            same = mid
        else:
            differs = mid
    return same
