"""The chat engine on a sliding-window model (gemma-3-270m: a 512-position window in 15 of 18
layers). Its streams keep only the window, so every cut of a stream is checked against what
is left: a prefix restore, and the rollback of rejected lookup drafts.

Engines here decode 256 tokens per step, so a stream's sliding-window cache holds 768 cells
(the window plus a step, padded to 256) and a longer sequence has dropped its first positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.engines.chat import (
    ChatEngine,
    EngineConfig,
    Finish,
    GenerationRequest,
    Sampling,
    Stream,
)

pytestmark = pytest.mark.models

CONFIG = EngineConfig(threads=2, parallel=2, ctx_per_seq=1024, batch=256, prefix_slots=0)
# a list: prompt lookup finds the pattern, but drafts the wrong numbers and colours
COLOURS = ("red", "blue", "green", "small")
LIST = " ".join(f"Item {i} is a {COLOURS[i * 7 % 4]} box." for i in range(400))


def answer(engine: ChatEngine, prompt: list[int], n: int = 8) -> tuple[list[int], Finish]:
    s = Stream()
    engine.submit(GenerationRequest(prompt, n, Sampling(temperature=0)), s)
    tokens = []
    while True:
        ev = s.get_sync(timeout=120)
        if isinstance(ev, Finish):
            return tokens, ev
        tokens.append(ev.token)


@pytest.fixture(scope="module")
def cold(gemma_gguf: Path) -> Iterator[ChatEngine]:
    """No prefix cache, no drafts: every answer from a cold prefill."""
    eng = ChatEngine(gemma_gguf, CONFIG)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def cached(gemma_gguf: Path) -> Iterator[tuple[ChatEngine, list[int]]]:
    """An engine whose prefix cache holds a 1000-token prompt, and that prompt: its stream has
    dropped positions 0-231 (decoded 256 at a time into 768 cells)."""
    eng = ChatEngine(gemma_gguf, replace(CONFIG, prefix_slots=3))
    long = eng.tokenize(LIST, True, False)[:1000]
    answer(eng, long, 1)
    assert eng.stats["prefix_hits"] == 0
    assert eng._ll.llama_memory_seq_pos_min(eng._mem, CONFIG.parallel) == 232  # the first slot
    yield eng, long
    eng.close()


def tail(engine: ChatEngine, prompt: list[int], at: int) -> list[int]:
    """`prompt` cut at `at`, then a question that leaves the list."""
    new = prompt[:at] + engine.tokenize(" Question: what colour is the last box? Answer:",
                                        False, False)
    assert new[at] != prompt[at]
    return new


def test_restore_inside_the_window_is_used(cached: tuple[ChatEngine, list[int]],
                                           cold: ChatEngine) -> None:
    """A cut the cached stream still has the window for is restored: at 743 (the token there
    sees 232-742, exactly what is left) and at 768. A restored prefix may round differently
    from a cold prefill (other micro-batches; measured here: 0.2 apart in logprob, enough to
    flip a near tie), so the answer is compared at 768 only: a multiple of the 256-token
    step, so both engines decode every position in the same micro-batches, and the cells the
    answer attends to sit in the same places."""
    eng, long = cached
    for at in (743, 768):
        hits = eng.stats["prefix_hits"]
        warm, fin = answer(eng, tail(eng, long, at))
        assert eng.stats["prefix_hits"] == hits + 1 and fin.cached_tokens == at
    assert warm == answer(cold, tail(eng, long, 768))[0]


def test_restore_past_the_window_decodes_afresh(cached: tuple[ChatEngine, list[int]],
                                                cold: ChatEngine) -> None:
    """Cut at 300, the token there would attend to positions 0-299, but the cached stream
    starts at 232; cut at 742, it would need 231 too. No restore: a cold prefill, the cold
    answer."""
    eng, long = cached
    for at in (300, 742):
        prompt = tail(eng, long, at)
        hits = eng.stats["prefix_hits"]
        got, fin = answer(eng, prompt)
        assert eng.stats["prefix_hits"] == hits and fin.cached_tokens == 0
        assert got == answer(cold, prompt)[0]


def test_draft_rollback_keeps_the_window(gemma_gguf: Path) -> None:
    """Lookup drafts rolled back past position 768, where the stream drops positions as it
    grows: after every verify it still holds the next token's window, and the greedy answer is
    the one without drafts. One thread: with two, llama.cpp splits one row's attention across
    them from 512 cells on, so the start-up probe allows no draft past position 256."""
    config = replace(CONFIG, threads=1, parallel=1)
    eng = ChatEngine(gemma_gguf, replace(config, lookup_draft=2))
    try:
        assert eng.draft_limit == 2 and eng.draft_below == 1024
        prompt = eng.tokenize(LIST, True, False)[:800]
        rejected: list[tuple[int, int]] = []  # (next position, first position held)
        lost = []
        verify = eng._verify

        def checked(seq, idx):  # type: ignore[no-untyped-def]
            drafted, before = len(seq.draft), seq.generated
            verify(seq, idx)
            pos = len(seq.prompt) + seq.generated - 1  # of the next token
            if seq in eng._active and seq.generated - before <= drafted:
                rejected.append((pos, eng._ll.llama_memory_seq_pos_min(eng._mem, seq.seq_id)))
                if not eng._holds_window(seq.seq_id, pos):
                    lost.append(pos)

        eng._verify = checked  # type: ignore[method-assign]
        drafted, _ = answer(eng, prompt, 48)
        assert eng.stats["draft_accepted"] > 0 and not lost, (rejected, lost)
        assert any(first > 0 for _, first in rejected)  # rolled back where positions were dropped
    finally:
        eng.close()
    plain = ChatEngine(gemma_gguf, config)
    try:
        assert answer(plain, prompt, 48)[0] == drafted
    finally:
        plain.close()
