"""POST /v1/messages and /v1/messages/count_tokens end to end: a real `appliance-ctl serve` with
the demo bundle's SmolLM2, driven by Anthropic's own SDK (`client.messages`), streamed and not,
and by raw HTTP with the `x-api-key` header Anthropic's clients send."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from conftest import Server, start_server

pytestmark = pytest.mark.models
MODEL = "smollm2-135m-instruct"
CONFIG = "[chat]\nparallel = 2\nctx_per_seq = 1024\n"
SYSTEM = "You are a helpful assistant."  # SmolLM2-135M answers well with one
ASK: Any = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY: Any = {"temperature": 0}  # this SDK has no temperature argument; the API has
TOOLS: Any = [{"name": "get_weather", "description": "Current weather in a city",
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                "required": ["city"]}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           demo_bundles: tuple[Path, Path]) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("messages") / "root", demo_bundles, CONFIG)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base, api_key=server.key, max_retries=0)


def test_answer_and_usage(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model=MODEL, max_tokens=30, system=SYSTEM, messages=ASK,
                               extra_body=GREEDY)
    assert m.content[0].type == "text" and "Paris" in m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens") and m.usage.input_tokens > 5


def test_stream_matches_the_plain_answer(client: anthropic.Anthropic) -> None:
    args: Any = {"model": MODEL, "max_tokens": 40, "messages": ASK, "extra_body": GREEDY,
                 "system": [{"type": "text", "text": SYSTEM}]}
    plain = client.messages.create(**args)
    with client.messages.stream(**args) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert plain.content[0].type == "text" and text == plain.content[0].text
    assert final.stop_reason == plain.stop_reason
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert _prompt_tokens(final.usage) == _prompt_tokens(plain.usage)


def _prompt_tokens(usage: anthropic.types.Usage) -> int:
    """Anthropic counts prompt tokens read from the (prefix) cache apart."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)


def test_max_tokens_and_stop_sequences(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model=MODEL, max_tokens=3, messages=ASK, extra_body=GREEDY)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3
    full = client.messages.create(model=MODEL, max_tokens=30, system=SYSTEM, messages=ASK,
                                  extra_body=GREEDY)
    assert full.content[0].type == "text"
    text = full.content[0].text
    word = text.split()[2]
    cut = client.messages.create(model=MODEL, max_tokens=30, system=SYSTEM, messages=ASK,
                                 extra_body=GREEDY, stop_sequences=[word])
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", word)
    assert cut.content[0].type == "text" and cut.content[0].text == text[:text.index(word)]


def test_json_output(client: anthropic.Anthropic) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "population"],
              "properties": {"city": {"type": "string"}, "population": {"type": "integer"}}}
    m = client.messages.create(
        model=MODEL, max_tokens=80, extra_body=GREEDY,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        output_config={"format": {"type": "json_schema", "schema": schema}})
    assert m.content[0].type == "text"
    jsonschema.validate(json.loads(m.content[0].text), schema)


def test_tool_use_and_its_result(client: anthropic.Anthropic) -> None:
    question: Any = [{"role": "user", "content": "What's the weather in Paris?"}]
    m = client.messages.create(model=MODEL, max_tokens=60, messages=question, tools=TOOLS,
                               tool_choice={"type": "any"}, extra_body=GREEDY)
    assert m.stop_reason == "tool_use"
    use = m.content[-1]
    assert use.type == "tool_use" and use.name == "get_weather"
    jsonschema.validate(use.input, TOOLS[0]["input_schema"])
    follow = client.messages.create(
        model=MODEL, max_tokens=30, tools=TOOLS, extra_body=GREEDY, messages=[
            *question, {"role": "assistant", "content": m.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                          "content": "18 C, sunny"}]}])
    assert follow.stop_reason in ("end_turn", "max_tokens", "tool_use") and follow.content


def test_tool_use_streamed(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=MODEL, max_tokens=60, tools=TOOLS, extra_body=GREEDY,
                                tool_choice={"type": "tool", "name": "get_weather"},
                                messages=[{"role": "user", "content": "Weather in Oslo?"}]
                                ) as stream:
        final = stream.get_final_message()
    use = final.content[-1]
    assert final.stop_reason == "tool_use" and use.type == "tool_use"
    assert use.name == "get_weather" and "city" in use.input


def test_count_tokens_is_the_prompt(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=ASK,
                                           tools=TOOLS)
    m = client.messages.create(model=MODEL, max_tokens=2, system=SYSTEM, messages=ASK,
                               tools=TOOLS, extra_body=GREEDY)
    assert counted.input_tokens == _prompt_tokens(m.usage) > 20


def test_x_api_key_and_anthropic_errors(server: Server) -> None:
    url = f"{server.base}/v1/messages"
    headers = {"x-api-key": server.key, "anthropic-version": "2023-06-01"}
    r = httpx.post(url, headers=headers, timeout=60,
                   json={"model": MODEL, "max_tokens": 5, "messages": ASK, "temperature": 0})
    assert r.status_code == 200 and r.json()["type"] == "message"
    r = httpx.post(url, headers={**headers, "x-api-key": "sk-wrong"},
                   json={"model": MODEL, "max_tokens": 5, "messages": ASK})
    assert r.status_code == 401
    assert r.json() == {"type": "error", "error": {"type": "authentication_error",
                                                   "message": "Incorrect API key provided."}}
    r = httpx.post(url, headers=headers, json={"model": MODEL, "max_tokens": 5000,
                                               "messages": ASK})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "context is 1024 tokens" in r.json()["error"]["message"]
