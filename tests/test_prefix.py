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


def test_freed_streams_are_sources() -> None:
    cache = PrefixCache([8], min_prefix=4)
    talk = list(range(200, 230))
    cache.keep(0, talk)  # stream 0 is free and holds a prompt and answer
    follow_up = [*talk, 5, 6]
    assert cache.source(follow_up, [], own=0) == (0, 30)  # in place: no copy
    assert cache.source(follow_up, [], own=1) == (0, 30)  # copied: long enough
    assert cache.source(talk[:3], [], own=0) == (0, 2)  # in place at any length
    assert cache.source(talk[:3], [], own=1) == (-1, 0)  # too short to copy
    cache.keep(1, talk[:20])
    assert cache.source(follow_up, [], own=1) == (0, 30)  # the longer one wins ...
    cache.keep(0, talk[:20])
    assert cache.source(follow_up, [], own=1) == (1, 20)  # ... and the own one a tie
    cache.forget(1)
    assert cache.source(follow_up, [], own=1) == (0, 20)
    cache.keep(0, [])
    assert cache.source(follow_up, [], own=0) == (-1, 0)


def test_a_burst_shares_out_the_streams_by_what_they_kept() -> None:
    cache = PrefixCache([8], min_prefix=4)
    cache.keep(0, [1, 2, 3])
    cache.keep(2, [5, 6, 7, 8])
    assert cache.kept_best([5, 6, 9], [0, 1, 2]) == 2  # the longest shared prefix
    assert cache.kept_best([1, 2, 9], [0, 1, 2]) == 0
    assert cache.kept_best([4, 4], [0, 1, 2]) == 0  # nothing shared: the first offered
    assert cache.kept_best([5, 6], [1, 0]) == 1  # only the streams offered
    cache.forget(2)
    assert cache.kept_best([5, 6, 9], [0, 1, 2]) == 0


def test_no_slots_no_cache_of_any_kind() -> None:
    cache = PrefixCache([], min_prefix=4)
    cache.keep(0, list(range(50)))
    assert not cache.enabled
    assert cache.source(list(range(60)), [], own=0) == (-1, 0)
    assert cache.kept_best(list(range(60)), [3, 0]) == 3


def test_common_prefix_by_bisection() -> None:
    from appliance.engines.prefix import _common_prefix
    base = list(range(1000))
    for cut in (0, 1, 2, 499, 998, 999):
        other = [*base[:cut], -1, *base[cut + 1:]]
        assert _common_prefix(base, other) == cut
    assert _common_prefix(base, base[:10]) == 10
    assert _common_prefix([], base) == 0
