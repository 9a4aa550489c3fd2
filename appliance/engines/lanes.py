"""Sharing the CPU cores between the engines of one process.

llama.cpp's decode threads wait for each other at every step; when another engine takes one of
their cores they stall (measured here: 2-thread decoding fell from about 40 to 0.6-3 tok/s while
another process held a core). So cores are split into lanes instead of being fought over: the chat
engines decode on all cores while nothing else runs, and on `cores - aux` cores while an
embeddings batch or a transcription holds one of the `aux` auxiliary lanes (each such job runs on
one thread). Jobs beyond `aux` wait for a lane rather than oversubscribe the machine.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.errors import Busy


class CoreLanes:
    def __init__(self, cores: int, aux: int = 1) -> None:
        if cores < 1:
            raise ValueError("cores must be at least 1")
        self.cores = cores
        self.aux = max(1, min(aux, cores - 1)) if cores > 1 else 1
        self._lanes = threading.Semaphore(self.aux)
        self._lock = threading.Lock()
        self._busy: dict[str, int] = {}

    @contextmanager
    def borrow(self, who: str) -> Iterator[None]:
        """Hold one auxiliary lane (one core) while the block runs."""
        with self._lanes:
            with self._lock:
                self._busy[who] = self._busy.get(who, 0) + 1
            try:
                yield
            finally:
                with self._lock:
                    self._busy[who] -= 1

    @property
    def borrowed(self) -> int:
        return sum(self._busy.values())

    def chat_threads(self) -> int:
        """Threads a chat engine should decode with right now."""
        return max(1, self.cores - self.borrowed) if self.cores > 1 else 1

    def report(self) -> dict[str, int]:
        return {"cores": self.cores, "aux_lanes": self.aux, "borrowed": self.borrowed,
                "chat_threads": self.chat_threads()}


def physical_cores() -> int:
    """Physical cores from /proc/cpuinfo (SMT siblings share one), else the CPU count."""
    try:
        pairs = set()
        phys = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                phys = value.strip()
            elif key == "core id":
                core = value.strip()
            elif not line.strip() and core is not None:
                pairs.add((phys, core))
                phys = core = None
        if core is not None:
            pairs.add((phys, core))
        if pairs:
            return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


class Slots:
    """At most `limit` jobs admitted at once (running or waiting); past that, Busy."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit, self.what, self.taken = limit, what, 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.taken >= self.limit:
                raise Busy(f"the {self.what} queue is full; retry shortly", retry_after=5)
            self.taken += 1

    def give(self) -> None:
        with self._lock:
            self.taken = max(0, self.taken - 1)
