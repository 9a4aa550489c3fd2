"""The prefix cache's bookkeeping, without a model: which stream to copy from, how much to
keep, where to save, and when to wait for a prefill in flight."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.engines.prefix import PrefixCache


@dataclass
class Seq:
    seq_id: int
    prompt: list[int]
    done_prompt: int


def test_source_and_keep() -> None:
    cache = PrefixCache([8, 9], min_prefix=4)
    system = list(range(100, 120))
    assert cache.source([*system, 1, 2], []) == (-1, 0)
    slot = cache.slot_for(system)
    assert slot in (8, 9)
    cache.saved(slot, system)
    assert cache.slot_for(system[:10]) is None  # covered by what is cached
    # the whole shared prefix is kept; a prompt equal to the cached one keeps all but one token
    assert cache.source([*system, 1, 2], []) == (slot, 20)
    assert cache.source(system, []) == (slot, 19)
    assert cache.source([1, 2, 3, *system], []) == (-1, 0)  # too short a shared prefix
    other = cache.slot_for(list(range(500, 520)))
    assert other is not None and other != slot  # the least recently used slot


def test_running_sequences_are_sources_and_make_others_wait() -> None:
    cache = PrefixCache([8], min_prefix=4)
    system = list(range(100, 130))
    running = [Seq(0, [*system, 7], done_prompt=10)]
    assert cache.in_flight([*system, 9], running)  # its prefill has not reached the shared part
    assert cache.source([*system, 9], running) == (0, 10)
    running[0].done_prompt = 31
    assert not cache.in_flight([*system, 9], running)
    assert cache.source([*system, 9], running) == (0, 30)
    assert not PrefixCache([], min_prefix=4).in_flight(system, running)  # no cache, no waiting
