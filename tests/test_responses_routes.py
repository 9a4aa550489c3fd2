"""POST /v1/responses in the fast suite: the official OpenAI SDK (`client.responses`) against the
app in this process, over the fake chat engine (tests/fakes.py). Shapes, the event sequence,
tool calls, and every refusal; test_api_responses.py runs the same route on the real model."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from fakes import CHAT, EMBED, KEY, Fakes
from pydantic import BaseModel
from routefixtures import api_error

TOOLS: Any = [{"type": "function", "name": "get_weather", "description": "Weather for a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                              "required": ["city"]}, "strict": None}]
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]
TEXT_DONE = ["response.output_text.done", "response.content_part.done",
             "response.output_item.done"]


def test_text_input_instructions_and_usage(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.answers.append("Paris.")
    r = sdk.responses.create(model=CHAT, input="Q", instructions="Be brief",
                             max_output_tokens=50, metadata={"k": "v"})
    assert r.id.startswith("resp_") and r.object == "response" and r.model == CHAT
    assert (r.status, r.output_text, r.instructions) == ("completed", "Paris.", "Be brief")
    assert fakes.chat.prompts[-1] == "<system>Be brief<user>Q"
    item = r.output[0]
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.id.startswith("msg_") and item.content[0].type == "output_text"
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (23, 6, 29)
    assert r.metadata == {"k": "v"} and r.max_output_tokens == 50


def test_message_list_and_earlier_output_as_input(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.answers.extend(["First.", "Second."])
    first = sdk.responses.create(model=CHAT, input=[
        {"role": "developer", "content": "Rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "A"},
                                                        {"type": "input_text", "text": "B"}]}])
    assert fakes.chat.prompts[-1] == "<system>Rules<user>AB"
    # the SDK's own output objects go back as input, as a client keeps a conversation
    sdk.responses.create(model=CHAT, input=[{"role": "user", "content": "A"}, *first.output,
                                            {"role": "user", "content": "C"}])
    assert fakes.chat.prompts[-1] == "<user>A<assistant>First.<user>C"


def test_streamed_text_events(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.answers.append("abc")
    events = list(sdk.responses.create(model=CHAT, input="Q", stream=True))
    kinds = [e.type for e in events]
    assert kinds == [*TEXT_EVENTS, *["response.output_text.delta"] * 3, *TEXT_DONE,
                     "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "abc"
    created, completed = events[0], events[-1]
    assert created.type == "response.created" and created.response.status == "in_progress"
    assert completed.type == "response.completed" and completed.response.id == (
        created.response.id)
    assert completed.response.output_text == "abc"
    assert completed.response.usage is not None
    assert completed.response.usage.output_tokens == 3


def test_stream_helper_assembles_the_response(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.answers.append("Hello there")
    with sdk.responses.stream(model=CHAT, input="Q") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello there"


def test_tool_call_and_its_output(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.answers.append(CALL)
    r = sdk.responses.create(model=CHAT, input="W?", tools=TOOLS)
    assert len(r.output) == 1
    call = r.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.id and call.id.startswith("fc_")
    assert json.loads(call.arguments) == {"city": "Paris"} and r.status == "completed"
    assert r.tools[0].type == "function" and r.tools[0].name == "get_weather"
    fakes.chat.answers.append("Sunny.")
    follow = sdk.responses.create(model=CHAT, tools=TOOLS, input=[
        {"role": "user", "content": "W?"}, *r.output,
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}])
    assert follow.output_text == "Sunny."
    assert fakes.chat.prompts[-1] == f"<tools>1<user>W?<assistant>{CALL}<tool>18 C"


def test_streamed_tool_call_events(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.answers.append(CALL)
    with sdk.responses.stream(model=CHAT, input="W?", tools=TOOLS,
                              tool_choice={"type": "function", "name": "get_weather"}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert _runs(kinds) == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert len(deltas) > 1  # the arguments stream while the model writes them
    added = events[2]
    assert added.type == "response.output_item.added" and added.item.type == "function_call"
    assert added.item.status == "in_progress" and added.item.arguments == ""
    call = final.output[0]
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}
    assert "".join(deltas) == call.arguments and call.status == "completed"
    assert final.tool_choice.type == "function"  # type: ignore[union-attr]


def _runs(kinds: list[str]) -> list[str]:
    """Event types with repeats in a row said once."""
    return [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]


def test_several_calls_in_one_turn(sdk: openai.OpenAI, fakes: Fakes) -> None:
    oslo = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    fakes.chat.answers.append(f"{CALL}\n{oslo}")
    r = sdk.responses.create(model=CHAT, input="W?", tools=TOOLS)
    cities = [json.loads(item.arguments)["city"] for item in r.output
              if item.type == "function_call"]
    assert cities == ["Paris", "Oslo"] and len(r.output) == 2
    assert len({item.call_id for item in r.output if item.type == "function_call"}) == 2
    fakes.chat.answers.append(f"{CALL}\n{oslo}")
    with sdk.responses.stream(model=CHAT, input="W?", tools=TOOLS) as stream:
        kinds = _runs([e.type for e in stream])
        final = stream.get_final_response()
    assert kinds.count("response.output_item.added") == 2
    assert [item.type for item in final.output] == ["function_call", "function_call"]
    fakes.chat.answers.append(f"{CALL}\n{oslo}")
    one = sdk.responses.create(model=CHAT, input="W?", tools=TOOLS, parallel_tool_calls=False)
    assert len(one.output) == 1 and one.parallel_tool_calls is False


def test_call_cut_short(sdk: openai.OpenAI, fakes: Fakes) -> None:
    """max_output_tokens inside a call: the response is incomplete, so is the call."""
    fakes.chat.answers.append(CALL)
    r = sdk.responses.create(model=CHAT, input="W?", tools=TOOLS, max_output_tokens=40)
    call = r.output[0]
    assert r.status == "incomplete" and call.type == "function_call"
    assert call.status == "incomplete" and call.arguments == '{"c'  # what was written


def test_json_schema_format(sdk: openai.OpenAI, fakes: Fakes) -> None:
    class City(BaseModel):
        name: str
        population: int

    fakes.chat.answers.append('{"name": "Paris", "population": 2100000}')
    parsed = sdk.responses.parse(model=CHAT, input="Paris?", text_format=City)
    assert parsed.output_parsed == City(name="Paris", population=2100000)
    assert parsed.text is not None and parsed.text.format is not None
    assert parsed.text.format.type == "json_schema"


def test_length_makes_an_incomplete_response(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.answers.append("a long answer")
    r = sdk.responses.create(model=CHAT, input="Q", max_output_tokens=3)
    assert r.status == "incomplete" and r.output_text == "a l"
    assert r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete"  # type: ignore[union-attr]
    fakes.chat.answers.append("a long answer")
    events = list(sdk.responses.create(model=CHAT, input="Q", max_output_tokens=3, stream=True))
    last = events[-1]
    assert last.type == "response.incomplete" and last.response.status == "incomplete"


def test_empty_answer_is_an_empty_message(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.answers.append("")
    assert sdk.responses.create(model=CHAT, input="Q").output[0].type == "message"
    fakes.chat.answers.append("")
    with sdk.responses.stream(model=CHAT, input="Q") as stream:
        kinds = [e.type for e in stream]
        assert stream.get_final_response().output_text == ""
    assert kinds == [*TEXT_EVENTS, *TEXT_DONE, "response.completed"]


def test_engine_failure(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.answers.append("!error")
    with pytest.raises(openai.InternalServerError):
        sdk.responses.create(model=CHAT, input="Q")
    fakes.chat.answers.append("!error")
    events = list(sdk.responses.create(model=CHAT, input="Q", stream=True))
    error, failed = events[-2], events[-1]
    assert error.type == "error" and error.message == "engine failure"
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error is not None
    assert failed.response.error.message == "engine failure"


@pytest.mark.parametrize(("kwargs", "status", "param"), [
    ({"model": "nope"}, 404, "model"),
    ({"model": EMBED}, 404, "model"),
    ({"previous_response_id": "resp_1"}, 400, "previous_response_id"),
    ({"store": True}, 400, "store"),
    ({"background": True}, 400, "background"),
    ({"conversation": "conv_1"}, 400, "conversation"),
    ({"include": ["message.output_text.logprobs"]}, 400, "include"),
    ({"reasoning": {"effort": "low"}}, 400, "reasoning"),
    ({"truncation": "auto"}, 400, "truncation"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"max_tool_calls": 2}, 400, "max_tool_calls"),
    ({"text": {"verbosity": "low"}}, 400, "text.verbosity"),
    ({"service_tier": "flex"}, 400, "service_tier"),
    ({"temperature": 5}, 400, "temperature"),
    ({"max_output_tokens": 10_000}, 400, "input"),
    ({"input": "x" * 20_000}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     400, "input.0.content.0"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, 400,
     "input.0.content.0.text"),
    ({"input": [{"type": "reasoning", "summary": []}]}, 400, "input.0"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, 400, "input.0.call_id"),
    ({"tools": [{"type": "web_search"}]}, 400, "tools.0.type"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
    ({"tools": [{**TOOLS[0], "parameters": {"type": "string", "maxLength": 10**9}}],
      "tool_choice": "required"}, 400, "tools.0.parameters.maxLength"),
    ({"text": {"format": {"type": "json_schema", "name": "x",
                          "schema": {"type": "string", "maxLength": 10**9}}}}, 400,
     "text.format.schema.maxLength"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format"),
    ({"tools": TOOLS, "text": {"format": {"type": "json_object"}}}, 400, "text.format"),
    ({"extra_body": {"seed": 1}}, 400, "seed"),
])
def test_refusals_name_the_field(sdk: openai.OpenAI, kwargs: dict[str, Any], status: int,
                                 param: str) -> None:
    args: dict[str, Any] = {"model": CHAT, "input": "Q", **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        sdk.responses.create(**args)
    assert info.value.status_code == status
    body = api_error(info)
    assert body["param"] == param, body
    assert body["type"] == "invalid_request_error"
    if param.startswith(("text.format.", "tools.0.")):  # named as this API calls it
        assert param in body["message"] and "response_format" not in body["message"]


def test_stream_options_need_stream(http: httpx.Client) -> None:
    r = http.post("/v1/responses", headers={"Authorization": f"Bearer {KEY}"},
                  json={"model": CHAT, "input": "Q", "stream_options": {
                      "include_obfuscation": False}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_busy_engine_is_503(http: httpx.Client, fakes: Fakes) -> None:
    fakes.chat.max_queue = 0
    r = http.post("/v1/responses", headers={"Authorization": f"Bearer {KEY}"},
                  json={"model": CHAT, "input": "Q"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "server_busy"


def test_needs_a_key(http: httpx.Client) -> None:
    r = http.post("/v1/responses", json={"model": CHAT, "input": "Q"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
