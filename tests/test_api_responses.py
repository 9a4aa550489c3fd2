"""POST /v1/responses end to end: a real `appliance-ctl serve` with the demo bundle's SmolLM2,
driven by the official OpenAI SDK (`client.responses`), streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from conftest import Server, start_server
from pydantic import BaseModel

pytestmark = pytest.mark.models
MODEL = "smollm2-135m-instruct"
CONFIG = "[chat]\nparallel = 2\nctx_per_seq = 1024\n"
SYSTEM = "You are a helpful assistant."  # SmolLM2-135M answers well with one
ASK = "What is the capital of France?"
TOOLS: Any = [{"type": "function", "name": "get_weather",
               "description": "Current weather in a city", "strict": None,
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                              "required": ["city"]}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           demo_bundles: tuple[Path, Path]) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("responses") / "root", demo_bundles, CONFIG)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=server.key, max_retries=0)


def test_answer_and_usage(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, instructions=SYSTEM, input=ASK, temperature=0,
                                max_output_tokens=30)
    assert r.status in ("completed", "incomplete") and "Paris" in r.output_text
    assert r.usage is not None and r.usage.input_tokens > 5
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_stream_matches_the_plain_answer(client: openai.OpenAI) -> None:
    args: Any = {"model": MODEL, "temperature": 0, "max_output_tokens": 40,
                 "input": [{"role": "system", "content": SYSTEM},
                           {"role": "user", "content": ASK}]}
    plain = client.responses.create(**args)
    with client.responses.stream(**args) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == plain.output_text
    assert final.usage is not None and plain.usage is not None  # (cached_tokens may differ)
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        plain.usage.input_tokens, plain.usage.output_tokens)
    assert final.status == plain.status
    events = list(client.responses.create(**args, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type in (
        "response.completed", "response.incomplete")


def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input=ASK, temperature=0, max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 3


def test_json_schema_output(client: openai.OpenAI) -> None:
    class City(BaseModel):
        city: str
        population: int

    r = client.responses.parse(model=MODEL, input="Describe Paris as JSON.", temperature=0,
                               max_output_tokens=80, text_format=City)
    assert isinstance(r.output_parsed, City)
    jsonschema.validate(json.loads(r.output_text), City.model_json_schema())


def test_tool_call_and_its_output(client: openai.OpenAI) -> None:
    question: Any = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = client.responses.create(model=MODEL, input=question, tools=TOOLS, temperature=0,
                                tool_choice="required", max_output_tokens=60)
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), TOOLS[0]["parameters"])
    follow = client.responses.create(
        model=MODEL, tools=TOOLS, temperature=0, max_output_tokens=30,
        input=[*question, *r.output, {"type": "function_call_output",
                                      "call_id": calls[0].call_id, "output": "18 C, sunny"}])
    assert follow.status in ("completed", "incomplete") and follow.output


def test_tool_call_streamed(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input="Weather in Oslo?", tools=TOOLS,
                                 tool_choice={"type": "function", "name": "get_weather"},
                                 temperature=0, max_output_tokens=60) as stream:
        deltas = [e.delta for e in stream
                  if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    call = final.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert "".join(deltas) == call.arguments and "city" in json.loads(call.arguments)


def test_refusals(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input=ASK, previous_response_id="resp_1")
    assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input=ASK, max_output_tokens=5000)
    assert info.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-4o", input=ASK)
