"""The chat engine's prefix cache, as bookkeeping: which KV stream holds the longest reusable
prefix of a new prompt, and where to keep a just-decoded prompt. The engine does the KV copies.

Cached prompts live in spare streams (`slots`); running sequences count as sources too, as far
as their prompt is decoded. A request whose long prefix another sequence is still prefilling
waits for it (`in_flight`): copying that KV a step or two later beats computing it twice.
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

    def source(self, prompt: list[int], running: Iterable[Running]) -> tuple[int, int]:
        """(stream to copy from, tokens to keep), or (-1, 0) when nothing is worth it."""
        best, slot = 0, -1
        for slot_id, (tokens, _) in self._slots.items():
            n = _common_prefix(tokens, prompt)
            if n > best:
                best, slot = n, slot_id
        if self._slots:
            for src in running:
                n = min(_common_prefix(src.prompt, prompt), src.done_prompt)
                if n > best:
                    best, slot = n, src.seq_id
        keep = min(best, len(prompt) - 1)
        return (slot, keep) if keep >= self.min_prefix else (-1, 0)

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
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
