"""Generation shapes in the fast suite: streamed tool calls, calls cut off by max_tokens,
several choices (n), and the completions API's logprobs (streamed, echoed, prompt scoring).
The official SDK against the app in this process over the fake chat engine, whose tokens are
characters (tests/fakes.py); test_api_chat.py runs the same against the real models."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from fakes import CHAT, KEY, Fakes, fake_settings

from appliance.serve.settings import Settings

TOOLS: Any = [{"type": "function", "function": {
    "name": name, "description": "x",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    for name in ("get_weather", "get_time")]
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TIME = '{"name": "get_time", "arguments": {"city": "Oslo"}}'
ASK: Any = [{"role": "user", "content": "Q"}]


@pytest.fixture
def settings() -> Settings:
    return fake_settings(max_n=4)


def _events(r: httpx.Response) -> list[Any]:
    return [json.loads(line.removeprefix("data: ")) for line in r.text.splitlines()
            if line.startswith("data: {")]


# --- tool calls ---------------------------------------------------------------------------

def test_tool_calls_stream_incrementally_one_entry_per_call(sdk: openai.OpenAI,
                                                            fakes: Fakes) -> None:
    fakes.chat.answers.append(f"{WEATHER}\n{TIME}")
    chunks = list(sdk.chat.completions.create(model=CHAT, messages=ASK, tools=TOOLS,
                                              stream=True))
    deltas = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    firsts = [d for d in deltas if d.id]
    assert [(d.index, d.type, d.function and d.function.name) for d in firsts] == [
        (0, "function", "get_weather"), (1, "function", "get_time")]
    assert all(d.function and d.function.arguments == "" for d in firsts)
    rest = [d for d in deltas if not d.id]
    assert all(d.function and d.function.name is None for d in rest)
    for index, city in ((0, "Paris"), (1, "Oslo")):
        pieces = [d.function.arguments for d in rest if d.index == index and d.function]
        assert len(pieces) > 3  # fragments as the model writes them, not one final delta
        assert json.loads("".join(p or "" for p in pieces)) == {"city": city}
    assert not any(c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the same answer, not streamed
    fakes.chat.answers.append(f"{WEATHER}\n{TIME}")
    r = sdk.chat.completions.create(model=CHAT, messages=ASK, tools=TOOLS)
    calls = r.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[1].function.arguments) == {"city": "Oslo"}
    assert r.choices[0].message.content is None and r.choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls_false(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.answers.append(f"{WEATHER}\n{TIME}")
    r = sdk.chat.completions.create(model=CHAT, messages=ASK, tools=TOOLS,
                                    parallel_tool_calls=False, tool_choice="required")
    assert [c.function.name for c in r.choices[0].message.tool_calls or []] == ["get_weather"]
    assert fakes.chat.prompts[-1].startswith("<tools>2!")  # the prompt was told so too
    grammar = fakes.chat.requests[-1].grammar or ""
    assert "one-tool-call" not in grammar  # the forced grammar allows one call
    fakes.chat.answers.append(WEATHER)
    sdk.chat.completions.create(model=CHAT, messages=ASK, tools=TOOLS, tool_choice="required")
    assert "one-tool-call" in (fakes.chat.requests[-1].grammar or "")  # several allowed


def test_forced_call_cut_off_by_max_tokens_is_a_call(sdk: openai.OpenAI, fakes: Fakes) -> None:
    """Decision: a forced call cut short comes back as a tool call whose arguments are as far
    as the model got (not valid JSON), with finish_reason "length"; never as content."""
    cut = len('{"name": "get_weather", "arguments": {"ci')
    fakes.chat.answers.append(WEATHER)
    r = sdk.chat.completions.create(model=CHAT, messages=ASK, tools=TOOLS, max_tokens=cut,
                                    tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []] == [
        ("get_weather", '{"ci')]
    fakes.chat.answers.append(WEATHER)
    chunks = list(sdk.chat.completions.create(
        model=CHAT, messages=ASK, tools=TOOLS, max_tokens=cut, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert not any(c.choices[0].delta.content for c in chunks)
    deltas = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas if d.function) == '{"ci'
    assert chunks[-1].choices[0].finish_reason == "length"
    # cut inside the name: the only tool whose name fits
    fakes.chat.answers.append(WEATHER)
    r = sdk.chat.completions.create(model=CHAT, messages=ASK, tools=TOOLS, max_tokens=16,
                                    tool_choice="required")
    calls = r.choices[0].message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", "")]


def test_unforced_text_stays_content_with_its_logprobs(sdk: openai.OpenAI,
                                                       fakes: Fakes) -> None:
    fakes.chat.answers.append('{"capital": "Paris"}')
    chunks = list(sdk.chat.completions.create(model=CHAT, messages=ASK, tools=TOOLS,
                                              stream=True, logprobs=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == '{"capital": "Paris"}'
    tokens = [t.token for c in chunks if c.choices[0].logprobs
              for t in c.choices[0].logprobs.content or []]
    assert "".join(tokens) == text  # held-back tokens keep their logprobs


# --- n ------------------------------------------------------------------------------------

def test_n_choices(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.answers.extend(["one", "three", WEATHER])
    r = sdk.chat.completions.create(model=CHAT, messages=ASK, n=3, tools=TOOLS, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == ["one", "three", None]
    assert r.choices[2].finish_reason == "tool_calls"
    assert r.usage is not None and r.usage.prompt_tokens == len("<tools>2<user>Q")  # once
    assert r.usage.completion_tokens == 3 + 5 + len(WEATHER)
    assert r.usage.prompt_tokens_details and r.usage.prompt_tokens_details.cached_tokens == 0
    assert fakes.chat.requests[-1].n == 3  # one request: the engine shares the prompt

    fakes.chat.answers.extend(["ab", "cde"])
    chunks = list(sdk.chat.completions.create(model=CHAT, messages=ASK, n=2, stream=True,
                                              stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    finishes = {}
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert texts == {0: "ab", 1: "cde"} and finishes == {0: "stop", 1: "stop"}
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens == 5


def test_n_in_completions_orders_choices_by_prompt(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.answers.extend(["a", "b", "c", "d"])
    r = sdk.completions.create(model=CHAT, prompt=["xy", "z"], n=2)
    assert [(c.index, c.text) for c in r.choices] == [(0, "a"), (1, "b"), (2, "c"), (3, "d")]
    assert r.usage and (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 4)


def test_n_error_mid_stream_ends_the_request(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.answers.extend(["fine", "!error"])
    with pytest.raises(openai.APIError, match="engine failure"):
        list(sdk.chat.completions.create(model=CHAT, messages=ASK, n=2, stream=True))
    fakes.chat.answers.extend(["fine", "!error"])
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(model=CHAT, messages=ASK, n=2)


# --- completions logprobs -----------------------------------------------------------------

def _check_offsets(text: str, lp: Any) -> None:
    """Each text_offset indexes the returned text where its token's text is."""
    ends = [*lp.text_offset[1:], len(text)]
    assert [text[a:b] for a, b in zip(lp.text_offset, ends, strict=True)] == lp.tokens


def test_streamed_completion_chunks_carry_their_logprobs(sdk: openai.OpenAI,
                                                         fakes: Fakes) -> None:
    fakes.chat.answers.append("abc")
    chunks = list(sdk.completions.create(model=CHAT, prompt="Count:", logprobs=1,
                                         stream=True))
    with_tokens = [c.choices[0] for c in chunks if c.choices[0].logprobs
                   and c.choices[0].logprobs.tokens]
    assert [(c.text, c.logprobs and c.logprobs.tokens) for c in with_tokens] == [
        ("a", ["a"]), ("b", ["b"]), ("c", ["c"])]
    lp = with_tokens[2].logprobs
    assert lp and lp.text_offset == [2] and lp.token_logprobs == [-0.1]
    assert lp.top_logprobs == [{"c": -0.1}]
    fakes.chat.answers.append("abc")
    chunks = list(sdk.completions.create(model=CHAT, prompt="Count:", stream=True))
    assert all(c.choices[0].logprobs is None for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_echo_logprobs_cover_the_prompt(sdk: openai.OpenAI, fakes: Fakes, stream: bool) -> None:
    fakes.chat.answers.append("xyz")
    args: Any = {"model": CHAT, "prompt": "Count:", "echo": True, "logprobs": 1,
                 "max_tokens": 2}
    if stream:
        chunks = [c.choices[0] for c in sdk.completions.create(**args, stream=True)]
        text = "".join(c.text for c in chunks)
        assert chunks[0].text == "Count:"
        tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens or []]
        lps = [t for c in chunks if c.logprobs for t in c.logprobs.token_logprobs or []]
        offsets = [t for c in chunks if c.logprobs for t in c.logprobs.text_offset or []]
        tops = [t for c in chunks if c.logprobs for t in c.logprobs.top_logprobs or []]
    else:
        choice = sdk.completions.create(**args).choices[0]
        assert choice.logprobs is not None
        text, tokens = choice.text, choice.logprobs.tokens or []
        lps, offsets = choice.logprobs.token_logprobs or [], choice.logprobs.text_offset or []
        tops = choice.logprobs.top_logprobs or []
        _check_offsets(text, choice.logprobs)
    assert text == "Count:xy" and tokens == list("Count:xy")
    assert lps == [None] + [-0.5] * 5 + [-0.1, -0.1]  # the first token has nothing before it
    assert offsets == list(range(8)) and tops[0] is None and tops[1] == {"o": -0.5}


def test_prompt_scoring_with_max_tokens_zero(sdk: openai.OpenAI, fakes: Fakes,
                                            http: httpx.Client) -> None:
    r = sdk.completions.create(model=CHAT, prompt="Paris", echo=True, logprobs=0, max_tokens=0)
    choice = r.choices[0]
    assert choice.text == "Paris" and choice.finish_reason == "length"
    assert choice.logprobs and choice.logprobs.token_logprobs == [None, -0.5, -0.5, -0.5, -0.5]
    assert r.usage and r.usage.completion_tokens == 0
    assert fakes.chat.requests[-1].prompt_logprobs and fakes.chat.requests[-1].max_tokens == 0
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model=CHAT, prompt="Paris", max_tokens=0)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "max_tokens"
    raw = http.post("/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                    json={"model": CHAT, "prompt": "P", "max_tokens": -1, "echo": True})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "max_tokens"
