"""The chat engine in-process, on the demo bundle's real GGUF."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.engines.chat import (
    SCORE_CHUNK,
    ChatEngine,
    ContextTooLong,
    EngineBusy,
    EngineConfig,
    Finish,
    GenerationRequest,
    GrammarError,
    Sampling,
    Stream,
    TokenEvent,
)
from appliance.engines.events import PromptScores
from appliance.errors import ApplianceError

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def engine(smollm_gguf: Path) -> Iterator[ChatEngine]:
    eng = ChatEngine(smollm_gguf, EngineConfig(parallel=2, ctx_per_seq=256, max_queue=2))
    yield eng
    if eng.alive():
        eng.close()


def collect(stream: Stream) -> tuple[str, Finish]:
    text = ""
    while True:
        ev = stream.get_sync(timeout=60)
        text += ev.text
        if isinstance(ev, Finish):
            return text, ev


def test_generates_and_frees(engine: ChatEngine) -> None:
    prompt = engine.tokenize("Once upon a time", add_special=True, parse_special=False)
    s = Stream()
    engine.submit(GenerationRequest(prompt, 8, Sampling(temperature=0)), s)
    text, fin = collect(s)
    assert fin.reason == "length" and fin.completion_tokens == 8 and text
    assert fin.prompt_tokens == len(prompt)
    deadline = time.monotonic() + 5
    while engine.active_count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.active_count == 0


def test_cancel_frees_the_sequence(engine: ChatEngine) -> None:
    prompt = engine.tokenize("Tell me everything", add_special=True, parse_special=False)
    s = Stream()
    engine.submit(GenerationRequest(prompt, 200, Sampling(temperature=1.0)), s)
    s.get_sync(timeout=30)
    s.cancel()
    _, fin = collect(s)
    assert fin.reason == "cancelled" and fin.completion_tokens < 200


def test_context_and_queue_limits(engine: ChatEngine) -> None:
    with pytest.raises(ContextTooLong):
        engine.check_fits(250, 10)
    assert engine.check_fits(200, None) == 56
    with pytest.raises(GrammarError):  # compiled before submit, off the scheduler thread
        engine.make_sampler(GenerationRequest([1, 2], 4, grammar="root ::= nonsense-rule"))
    with pytest.raises(ApplianceError, match="sampler made first"):
        engine.submit(GenerationRequest([1, 2], 4, grammar='root ::= "yes"'), Stream())
    constrained = GenerationRequest([1, 2], 4, Sampling(temperature=0), grammar='root ::= "yes"')
    constrained.sampler = engine.make_sampler(constrained)
    done = Stream()
    engine.submit(constrained, done)
    text, fin = collect(done)
    assert text == "yes" and fin.reason == "stop"
    streams = [Stream() for _ in range(6)]
    prompt = engine.tokenize("Count", add_special=True, parse_special=False)
    accepted = []
    with pytest.raises(EngineBusy):
        for s in streams:
            engine.submit(GenerationRequest(prompt, 30, Sampling(temperature=1.0)), s)
            accepted.append(s)
    for s in accepted:
        s.cancel()
        collect(s)


def test_health_reports_a_dead_engine(smollm_gguf: Path) -> None:
    eng = ChatEngine(smollm_gguf, EngineConfig(parallel=1, ctx_per_seq=128))
    assert eng.health() == "ok"
    eng.close()
    assert eng.health() == "dead"


def test_model_without_a_chat_template_cannot_chat(engine: ChatEngine) -> None:
    from appliance.engines.chat import NoTemplate
    kept, engine.template = engine.template, None
    try:
        with pytest.raises(NoTemplate) as info:
            engine.chat_prompt([{"role": "user", "content": "hi"}])
    finally:
        engine.template = kept
    assert info.value.status == 400 and info.value.code == "no_chat_template"
    assert engine.chat_prompt([{"role": "user", "content": "hi"}])  # with its template


def _answer(engine: ChatEngine, prompt: list[int], n: int = 12) -> str:
    s = Stream()
    engine.submit(GenerationRequest(prompt, n, Sampling(temperature=0)), s)
    return collect(s)[0]


def test_prefix_cache_reuses_a_shared_system_prompt(smollm_gguf: Path) -> None:
    """Restored prompts skip their shared prefix. The answers are the model's, but not always
    bit-identical to a cold start: llama.cpp's CPU kernels round differently for other batch
    shapes (llama-server's prompt cache has the same caveat), so this checks reuse and
    repeatability, and the batching test checks equality with unbatched decoding."""
    system = "You are the assistant of an offline appliance. " * 12
    questions = ["What is the capital of France?", "Name three fruits.", "What is a bundle?"]
    warm = ChatEngine(smollm_gguf, EngineConfig(parallel=2, ctx_per_seq=512, prefix_slots=2))
    try:
        prompts = [warm.tokenize(f"{system}\nQ: {q}\nA:", True, False) for q in questions]
        first = [_answer(warm, p) for p in prompts]
        shared = len(warm.tokenize(system, True, False))
        assert warm.stats["prefix_hits"] == 2
        assert warm.stats["prefix_tokens"] >= 2 * (shared - 2)
        assert _answer(warm, prompts[2]) == _answer(warm, prompts[2]) == first[2]
        assert warm.stats["prefix_hits"] == 4
    finally:
        warm.close()


def test_concurrent_requests_share_a_prefix_in_flight(smollm_gguf: Path) -> None:
    """Four users send the same long system prompt at once: it is prefilled once, the other
    three wait for that prefill and copy its KV instead of computing it again."""
    system = "You are the assistant of an offline appliance. " * 12
    questions = ["What is the capital of France?", "Name three fruits.", "What is a bundle?",
                 "Say hello."]
    eng = ChatEngine(smollm_gguf, EngineConfig(parallel=4, ctx_per_seq=512, prefix_slots=1,
                                               batch=64))
    try:
        prompts = [eng.tokenize(f"{system}\nQ: {q}\nA:", True, False) for q in questions]
        shared = len(eng.tokenize(system, True, False))
        streams = [Stream() for _ in prompts]
        for prompt, stream in zip(prompts, streams, strict=True):
            eng.submit(GenerationRequest(prompt, 8, Sampling(temperature=0)), stream)
        answers = [collect(s) for s in streams]
        assert all(a[1].reason in ("stop", "length") and a[1].error is None for a in answers)
        assert eng.stats["prefix_hits"] == 3
        assert eng.stats["prefix_tokens"] >= 3 * (shared - 2)
    finally:
        eng.close()


def _tokens(engine: ChatEngine, prompt: list[int], n: int) -> tuple[list[int], Finish]:
    s = Stream()
    engine.submit(GenerationRequest(prompt, n, Sampling(temperature=0)), s)
    tokens = []
    while not isinstance(ev := s.get_sync(timeout=60), Finish):
        if isinstance(ev, TokenEvent):
            tokens.append(ev.token)
    return tokens, ev


def test_a_freed_stream_keeps_the_prompt_and_answer(smollm_gguf: Path) -> None:
    """The next turn of a conversation restarts from what its stream kept: the last prompt and
    all but the last token of its answer, rejected drafts cut away. SmolLM2's Q4_1 rows round
    alike at any batch shape (see the draft tests), so below 512 cells the warm answer must
    equal the cold one token for token: a stale or drafted cell in the kept KV would show."""
    text = "Each file is hashed while it is copied, and the manifest is signed. "
    cold = ChatEngine(smollm_gguf, EngineConfig(parallel=1, ctx_per_seq=512, prefix_slots=0))
    warm = ChatEngine(smollm_gguf, EngineConfig(parallel=1, ctx_per_seq=512, prefix_slots=1,
                                                lookup_draft=4))
    try:
        first = warm.tokenize(f"Text: {text * 3}\nAgain: {text[:20]}", True, False)
        answer, fin = _tokens(warm, first, 30)
        assert fin.cached_tokens == 0 and warm.stats["draft_accepted"] > 0
        turn = first + answer + warm.tokenize("\nOnce more:", False, False)
        again, fin = _tokens(warm, turn, 20)
        assert fin.cached_tokens == len(first) + len(answer) - 1
        assert again == _tokens(cold, turn, 20)[0]
    finally:
        warm.close()
        cold.close()


def test_short_prompts_are_reused_in_place_never_copied(smollm_gguf: Path) -> None:
    """A stream reuses what it kept at any length (no copy), but a short prefix is neither
    copied from another stream nor saved in a slot: a copy moves the whole stream."""
    eng = ChatEngine(smollm_gguf, EngineConfig(parallel=2, ctx_per_seq=256, prefix_slots=2))
    try:
        short = eng.tokenize("Hello there, how are you today?", True, False)
        other = eng.tokenize("Count to ten slowly", True, False)
        assert short[0] != other[0]  # this model adds no BOS: nothing shared
        assert _tokens(eng, short, 8)[1].cached_tokens == 0
        assert _tokens(eng, short, 8)[1].cached_tokens == len(short) - 1  # stream 0 kept it
        # `other` takes stream 0 and `short` stream 1 ...
        streams = [Stream(), Stream()]
        eng.submit(GenerationRequest(other, 30, Sampling(temperature=0)), streams[0])
        eng.submit(GenerationRequest(short, 8, Sampling(temperature=0)), streams[1])
        assert collect(streams[1])[1].cached_tokens == 0
        collect(streams[0])
        # ... so stream 0, which the next request takes, holds nothing it can use, and stream
        # 1's copy of the short prompt is not worth a copy
        assert _tokens(eng, short, 8)[1].cached_tokens == 0
        assert all(not tokens for tokens, _ in eng._prefix._slots.values())
    finally:
        eng.close()


def test_a_burst_finds_the_streams_that_kept_its_prompts(smollm_gguf: Path) -> None:
    """Requests admitted together take the lowest free streams (so batches stay whole), each
    the one that kept its prompt, in whatever order they came."""
    eng = ChatEngine(smollm_gguf, EngineConfig(parallel=3, ctx_per_seq=256, prefix_slots=2))
    try:
        prompts = [eng.tokenize(text, True, False) for text in
                   ("Hello there, how are you today?", "Count to ten slowly", "Name a fruit")]
        assert len({p[0] for p in prompts}) == 3  # no BOS: nothing shared between them

        def burst(order: list[int]) -> dict[int, Finish]:
            streams = {i: Stream() for i in order}
            with eng._lock:  # all waiting when the scheduler next admits
                for i in order:
                    eng.submit(GenerationRequest(prompts[i], 6, Sampling(temperature=0)),
                               streams[i])
            return {i: collect(s)[1] for i, s in streams.items()}

        assert all(f.cached_tokens == 0 for f in burst([0, 1, 2]).values())
        again = burst([2, 0, 1])
        assert {i: f.cached_tokens for i, f in again.items()} == {
            i: len(prompts[i]) - 1 for i in range(3)}
    finally:
        eng.close()


def test_timed_drafts_kept_only_where_their_rows_pay(smollm_gguf: Path) -> None:
    """With `draft_timed`, the probe times steps of 1..k+1 rows and keeps the longest draft
    whose step costs less than as many single rows, within what verifies bit-identically."""
    config = EngineConfig(parallel=1, ctx_per_seq=512, prefix_slots=0, lookup_draft=4)
    eng = ChatEngine(smollm_gguf, config)
    identical = eng.draft_limit
    eng.close()
    assert identical == 4 and not eng.draft_costs  # untimed: the probe's outcome alone
    eng = ChatEngine(smollm_gguf, replace(config, draft_timed=True))
    try:
        cost = eng.draft_costs
        assert len(cost) == identical + 1 and all(c > 0 for c in cost)
        assert eng.draft_limit == max((k for k in range(1, identical + 1)
                                       if cost[k] < (k + 1) * cost[0]), default=0)
        assert eng.draft_below == (256 if eng.draft_limit else 0)
        # the timing left the probe's sequence empty: a request decodes as usual
        assert len(_tokens(eng, eng.tokenize("Count to five", True, False), 5)[0]) == 5
    finally:
        eng.close()


def test_a_failed_decode_keeps_nothing(smollm_gguf: Path) -> None:
    """llama.cpp refuses a token outside the vocabulary (the API checks ids first): the
    request ends with an error, its stream keeps nothing, and the next one is served."""
    eng = ChatEngine(smollm_gguf, EngineConfig(parallel=1, ctx_per_seq=256, prefix_slots=1))
    try:
        prompt = eng.tokenize("Hello there, how are you", True, False)
        _tokens(eng, prompt, 4)
        _, fin = _tokens(eng, [*prompt[:-1], eng.n_vocab + 7], 4)
        assert fin.reason == "error" and "llama_decode failed" in (fin.error or "")
        assert not eng._prefix._kept
        tokens, fin = _tokens(eng, prompt, 4)
        assert fin.reason == "length" and len(tokens) == 4 and fin.cached_tokens == 0
    finally:
        eng.close()


def test_prompt_lookup_speculation(smollm_gguf: Path) -> None:
    """Drafts are checked by the start-up probe and change no token."""
    text = ("The appliance verifies every bundle before installing it. Each file is hashed "
            "while it is copied, and the manifest is signed. ")
    outputs, accepted, limits = [], [], []
    for draft in (0, 2, 6):
        eng = ChatEngine(smollm_gguf, EngineConfig(parallel=2, ctx_per_seq=512, prefix_slots=0,
                                                   lookup_draft=draft))
        try:
            prompt = eng.tokenize(f"Text: {text * 3}\nThe same text again: {text}", True, False)
            outputs.append(_answer(eng, prompt, 60))
            accepted.append(eng.stats["draft_accepted"])
            limits.append(eng.draft_limit)
        finally:
            eng.close()
    # Q4_1 weights are multiplied row by row at any batch size: every draft length verifies
    # bit-identically, so the probe allows what was asked
    assert limits == [0, 2, 6]
    assert accepted[0] == 0 and accepted[1] > 10 and accepted[2] > 10
    assert outputs[0] == outputs[1] == outputs[2]


def test_draft_probe_past_256_with_one_thread(smollm_gguf: Path) -> None:
    """With one thread no row's attention is split, so a second probe past position 256 runs
    and allows drafts to the end of the context; its 260-token prefill goes in batch-sized
    pieces (here 64 rows)."""
    eng = ChatEngine(smollm_gguf, EngineConfig(threads=1, parallel=1, ctx_per_seq=512,
                                               prefix_slots=0, batch=64, lookup_draft=2))
    try:
        assert (eng.draft_limit, eng.draft_below) == (2, 512)
        prompt = eng.tokenize("Each file is hashed while it is copied. " * 3, True, False)
        assert _answer(eng, prompt, 8)
    finally:
        eng.close()


def test_a_failed_probe_fails_the_load_cleanly(smollm_gguf: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe runs on the scheduler thread; if it cannot decode, the constructor raises
    its error and the thread is gone (a load error the runtime reports, not a hang)."""
    from appliance.errors import ApplianceError

    def fail(self: ChatEngine, tokens: list[int], most: int, cached: int) -> int:
        raise ApplianceError("llama.cpp could not decode the probe")

    monkeypatch.setattr(ChatEngine, "_identical_drafts", fail)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(ApplianceError, match="could not decode the probe"):
        ChatEngine(smollm_gguf, EngineConfig(parallel=1, ctx_per_seq=512, lookup_draft=2))
    assert {t.name for t in threading.enumerate()} == before


def test_drafts_stop_where_verification_would_round_differently(smollm_gguf: Path) -> None:
    """Past 256 positions llama.cpp splits one row's attention over threads, so a draft
    there would not verify bit-identically: the probe finds the position, and an answer that
    crosses it drafts only before it, and equals plain decoding."""
    text = "Each file is hashed while it is copied, and the manifest is signed. "
    # two threads: with one, a row's attention is never split, and drafts are exact anywhere
    eng = ChatEngine(smollm_gguf, EngineConfig(threads=2, parallel=1, ctx_per_seq=512,
                                               prefix_slots=0, lookup_draft=4))
    try:
        assert (eng.draft_limit, eng.draft_below) == (4, 256)
        # why the probe stops there: past the split, drafts do not match one-at-a-time
        # decoding. Decoded on a thread of its own, as the scheduler's is idle: a decode
        # leaves its thread an OpenMP team, which must not outlive the check
        probe = eng.tokenize(text * 30, True, False)[:300]
        found: list[int] = []
        check = threading.Thread(target=lambda: found.append(eng._identical_drafts(probe, 4, 0)))
        check.start()
        check.join()
        assert found == [0]
        eng._ll.llama_memory_seq_rm(eng._mem, 0, -1, -1)
        prompt = eng.tokenize(f"Text: {text * 5}\nAgain: {text * 2}", True, False)
        room = eng.draft_below - len(prompt)
        assert 20 < room < 160
        s = Stream()
        eng.submit(GenerationRequest(prompt, 200, Sampling(temperature=0)), s)
        with_drafts, fin = collect(s)
        assert len(prompt) + fin.completion_tokens > eng.draft_below  # it crossed
        assert 10 < eng.stats["draft_accepted"] <= room
    finally:
        eng.close()
    plain = ChatEngine(smollm_gguf, EngineConfig(threads=2, parallel=1, ctx_per_seq=512,
                                                 prefix_slots=0))
    try:
        assert _answer(plain, prompt, 200) == with_drafts
    finally:
        plain.close()


def test_drafts_only_for_a_sequence_decoding_alone(smollm_gguf: Path) -> None:
    """Beside another sequence, extra rows would move it onto other kernels (and a batch is
    compute-bound already): two concurrent quoting requests decode without drafts."""
    text = "Each file is hashed while it is copied, and the manifest is signed. "
    eng = ChatEngine(smollm_gguf, EngineConfig(parallel=2, ctx_per_seq=512, prefix_slots=0,
                                               lookup_draft=4))
    try:
        prompt = eng.tokenize(f"Text: {text * 4}\nAgain: {text}", True, False)
        streams = [Stream(), Stream()]
        for s in streams:  # the same prompt twice: both finish in the same step
            eng.submit(GenerationRequest(prompt, 40, Sampling(temperature=0)), s)
        answers = [collect(s)[0] for s in streams]
        assert eng.stats["draft_accepted"] == 0
        assert answers[0] == answers[1] == _answer(eng, prompt, 40)  # ... and then alone
        assert eng.stats["draft_accepted"] > 10
    finally:
        eng.close()


def test_ngram_index_matches_a_scan() -> None:
    """The incremental index drafts what a backward scan of the history finds."""
    from appliance.engines.chat import NgramIndex

    def scan(history: list[int], most: int) -> list[int]:
        tail = history[-3:]
        for start in range(len(history) - 4, -1, -1):
            if history[start:start + 3] == tail:
                return history[start + 3:start + 3 + most]
        return []

    rng = random.Random(7)
    for _ in range(200):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        index = NgramIndex(tokens[:5])
        for token in tokens[5:]:
            index.append(token)
        for most in (0, 1, 3):
            assert index.draft(most) == scan(tokens, most)


def choices(stream: Stream, n: int) -> tuple[dict[int, list[TokenEvent]], dict[int, Finish],
                                             PromptScores | None]:
    """The events of a request with `n` choices, by choice."""
    tokens: dict[int, list[TokenEvent]] = {i: [] for i in range(n)}
    finishes: dict[int, Finish] = {}
    scores = None
    while len(finishes) < n:
        ev = stream.get_sync(timeout=60)
        if isinstance(ev, PromptScores):
            scores = ev
        elif isinstance(ev, Finish):
            finishes[ev.index] = ev
        else:
            tokens[ev.index].append(ev)
    return tokens, finishes, scores


def test_choices_decode_the_prompt_once(smollm_gguf: Path) -> None:
    """n choices: the first decodes the prompt, the others copy its KV stream and decode only
    its last token; more choices than parallel streams wait for a free one."""
    eng = ChatEngine(smollm_gguf, EngineConfig(parallel=2, ctx_per_seq=256, prefix_slots=0))
    try:
        prompt = eng.tokenize("Once upon a time, a cat", True, False)
        # no end of text: the first choice still runs when the others copy its prompt
        ends = [t for text in ("<|im_end|>", "<|endoftext|>")
                for t in eng.tokenize(text, False, True)]
        sampling = Sampling(temperature=1.0, seed=3, logit_bias={t: -100.0 for t in ends})
        s = Stream()
        eng.submit(GenerationRequest(prompt, 12, sampling, n=3), s)
        tokens, finishes, _ = choices(s, 3)
        assert sorted(finishes) == [0, 1, 2]
        assert [finishes[i].cached_tokens for i in range(3)] == [0] + [len(prompt) - 1] * 2
        texts = ["".join(ev.text for ev in tokens[i]) for i in range(3)]
        assert len(set(texts)) == 3  # each choice draws from its own seed
        again = Stream()  # ... and the same seed gives the same choices again
        eng.submit(GenerationRequest(prompt, 12, sampling, n=3), again)
        repeat = choices(again, 3)[0]
        assert ["".join(ev.text for ev in repeat[i]) for i in range(3)] == texts
        greedy = Stream()  # greedy choices after a copied prefill equal a plain answer
        eng.submit(GenerationRequest(prompt, 12, Sampling(temperature=0), n=2), greedy)
        tokens, _, _ = choices(greedy, 2)
        alone = _answer(eng, prompt)
        assert ["".join(ev.text for ev in tokens[i]) for i in range(2)] == [alone, alone]
    finally:
        eng.close()


def test_choices_each_follow_the_grammar(engine: ChatEngine) -> None:
    """The compiled grammar is cloned for every choice before the first one samples."""
    prompt = engine.tokenize("Pick a colour:", add_special=True, parse_special=False)
    req = GenerationRequest(prompt, 6, Sampling(temperature=1.5, seed=1),
                            grammar='root ::= "red" | "green" | "blue" | "pink"', n=4)
    req.sampler = engine.make_sampler(req)
    s = Stream()
    engine.submit(req, s)
    tokens, finishes, _ = choices(s, 4)
    texts = ["".join(ev.text for ev in tokens[i]) + finishes[i].text for i in range(4)]
    assert all(t in ("red", "green", "blue", "pink") for t in texts), texts
    assert len(set(texts)) > 1, texts
    assert all(f.reason == "stop" for f in finishes.values())


def test_prompt_scores_agree_with_generated_logprobs(engine: ChatEngine) -> None:
    """Echo scoring: the logprob of each prompt token given the ones before it equals the
    logprob the same token had when the model generated it."""
    prompt = engine.tokenize("The capital of France is", add_special=True, parse_special=False)
    s = Stream()
    engine.submit(GenerationRequest(prompt, 10, Sampling(temperature=0), logprobs=2), s)
    tokens, _, _ = choices(s, 1)
    made = tokens[0]
    scored = Stream()
    engine.submit(GenerationRequest(prompt + [ev.token for ev in made], 0,
                                    Sampling(temperature=0), logprobs=2, prompt_logprobs=True),
                  scored)
    none, finishes, scores = choices(scored, 1)
    assert scores is not None and none == {0: []}
    assert finishes[0].reason == "length" and finishes[0].completion_tokens == 0
    assert len(scores.logprobs) == len(prompt) + len(made)
    assert scores.logprobs[0] is None and scores.top[0] == []
    assert all(lp is not None and lp < 0 for lp in scores.logprobs[1:])
    for ev, lp, top in zip(made, scores.logprobs[len(prompt):], scores.top[len(prompt):],
                           strict=True):
        assert ev.logprob is not None and lp == pytest.approx(ev.logprob, abs=2e-3)
        assert top[0][0] == ev.token  # greedy: the chosen token was the most likely one
        assert len(top) == 2


def test_long_prompt_scored_in_chunks(smollm_gguf: Path) -> None:
    """A scored prompt longer than SCORE_CHUNK is decoded over several steps, whole (no prefix
    restored: restored positions have no logits), and the scores line up."""
    eng = ChatEngine(smollm_gguf, EngineConfig(parallel=2, ctx_per_seq=512, prefix_slots=1))
    try:
        prompt = eng.tokenize("one two three four five six seven eight nine ten " * 8,
                              True, False)
        assert len(prompt) > 2 * SCORE_CHUNK
        _answer(eng, prompt)  # cached now: a plain request would restore it
        s = Stream()
        eng.submit(GenerationRequest(prompt, 1, Sampling(temperature=0), logprobs=0,
                                     prompt_logprobs=True), s)
        _, finishes, scores = choices(s, 1)
        assert scores is not None and len(scores.logprobs) == len(prompt)
        assert finishes[0].cached_tokens == 0
        late = sorted(lp for lp in scores.logprobs[-20:] if lp is not None)
        assert late[len(late) // 2] > -0.5  # the repeated text is predictable: aligned
        head = Stream()  # a shorter prompt scores its tokens as the longer one did
        eng.submit(GenerationRequest(prompt[:40], 0, Sampling(temperature=0), logprobs=0,
                                     prompt_logprobs=True), head)
        shorter = choices(head, 1)[2]
        assert shorter is not None and shorter.logprobs[0] is None
        assert shorter.logprobs[1:] == pytest.approx(scores.logprobs[1:40], abs=2e-3)
    finally:
        eng.close()


def test_greedy_with_logit_bias_picks_what_llama_cpp_picks(smollm_gguf: Path) -> None:
    """The engine's greedy shortcut against llama.cpp's own chain (logit_bias, then greedy) on
    real logits: the top token forbidden, the runner-up lifted to a tie from either side."""
    import ctypes

    import llama_cpp as ll
    import numpy as np

    from appliance.engines.chat import greedy_token

    model = ll.llama_model_load_from_file(str(smollm_gguf).encode(),
                                          ll.llama_model_default_params())
    params = ll.llama_context_default_params()
    params.n_ctx = 256
    ctx = ll.llama_init_from_model(model, params)
    try:
        vocab = ll.llama_model_get_vocab(model)
        n_vocab = ll.llama_vocab_n_tokens(vocab)
        text = b"The capital of France is"
        buf = (ll.llama_token * 64)()
        n = ll.llama_tokenize(vocab, text, len(text), buf, 64, True, False)
        assert ll.llama_decode(ctx, ll.llama_batch_get_one(buf, n)) == 0
        row = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
        order = np.argsort(-row, kind="stable")
        first, second = int(order[0]), int(order[1])
        lift = float(np.float32(row[first]) - np.float32(row[second]))
        cases = [{}, {first: -100.0}, {second: lift}, {second: lift + 0.5},
                 {first: -100.0, second: -100.0, int(order[5]): 3.0},
                 {int(t): 1.5 for t in order[:20:3]}]
        for bias in cases:
            chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
            arr = (ll.llama_logit_bias * max(1, len(bias)))()
            for i, (tok, value) in enumerate(bias.items()):
                arr[i].token, arr[i].bias = tok, value
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_logit_bias(
                n_vocab, len(bias), ctypes.cast(arr, ctypes.POINTER(ll.llama_logit_bias))))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            try:
                assert greedy_token(row, bias) == ll.llama_sampler_sample(chain, ctx, -1), bias
            finally:
                ll.llama_sampler_free(chain)
    finally:
        ll.llama_free(ctx)
        ll.llama_model_free(model)
