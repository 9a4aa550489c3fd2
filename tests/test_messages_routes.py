"""POST /v1/messages and /v1/messages/count_tokens in the fast suite: Anthropic's own SDK against
the app in this process, over the fake chat engine (tests/fakes.py). Shapes, events, tool use,
Anthropic's error shape on every refusal, and `x-api-key` in the key guard with the same limits;
test_api_messages.py runs the same routes on the real model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import pytest
from fakes import CHAT, EMBED, KEY, Fakes, client, fake_settings

from appliance.api.app import create_app
from appliance.device.apikeys import ApiKey, hash_key
from appliance.serve.runtime import Runtime
from appliance.serve.settings import Settings

SCOPED, ONE = "sk-scoped-embed", "sk-one-at-a-time"
KEYS = (ApiKey("test", hash_key(KEY)), ApiKey("scoped", hash_key(SCOPED), models=(EMBED,)),
        ApiKey("one", hash_key(ONE), concurrent=1))
TOOLS: Any = [{"name": "get_weather", "description": "Weather for a city",
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                "required": ["city"]}}]
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
HI: Any = [{"role": "user", "content": "Q"}]


@pytest.fixture
def settings() -> Settings:
    return fake_settings(api_keys=KEYS)


@pytest.fixture
def sdk(http: httpx.Client) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url="http://testserver", api_key=KEY, http_client=http,
                               max_retries=0)


def _error(exc: pytest.ExceptionInfo[anthropic.APIStatusError]) -> dict[str, Any]:
    body = exc.value.body
    assert isinstance(body, dict) and body["type"] == "error" and set(body) == {"type", "error"}
    assert set(body["error"]) == {"type", "message"}
    return dict(body["error"])


def _events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of a raw SSE body."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_text_answer_system_and_usage(sdk: anthropic.Anthropic, fakes: Fakes) -> None:
    fakes.chat.answers.append("Paris.")
    m = sdk.messages.create(model=CHAT, max_tokens=50, system="Be brief", messages=HI)
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant"
    assert m.model == CHAT and m.content[0].type == "text" and m.content[0].text == "Paris."
    assert (m.stop_reason, m.stop_sequence) == ("end_turn", None)
    assert (m.usage.input_tokens, m.usage.output_tokens) == (23, 6)
    assert fakes.chat.prompts[-1] == "<system>Be brief<user>Q"
    fakes.chat.answers.append("Hi.")
    sdk.messages.create(model=CHAT, max_tokens=50, messages=[
        {"role": "user", "content": [{"type": "text", "text": "A"},
                                     {"type": "text", "text": "B",
                                      "cache_control": {"type": "ephemeral"}}]}],
        system=[{"type": "text", "text": "S1"}, {"type": "text", "text": "S2"}])
    assert fakes.chat.prompts[-1] == "<system>S1\nS2<user>AB"


def test_streamed_events(sdk: anthropic.Anthropic, http: httpx.Client, fakes: Fakes) -> None:
    fakes.chat.answers.append("abc")
    raw = http.post("/v1/messages", headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
                    json={"model": CHAT, "max_tokens": 50, "messages": HI, "stream": True})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = _events(raw.text)
    assert [name for name, _ in events] == [
        "message_start", "ping", "content_block_start", *["content_block_delta"] * 3,
        "content_block_stop", "message_delta", "message_stop"]
    assert all(name == data["type"] for name, data in events)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["usage"] == {"input_tokens": 7, "output_tokens": 0}
    assert events[3][1]["delta"] == {"type": "text_delta", "text": "a"}
    assert events[-2][1] == {"type": "message_delta", "usage": {
        "input_tokens": 7, "cache_read_input_tokens": 0, "output_tokens": 3},
        "delta": {"stop_reason": "end_turn", "stop_sequence": None}}
    fakes.chat.answers.append("Hello there")
    with sdk.messages.stream(model=CHAT, max_tokens=50, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello there" and final.content[0].type == "text"
    assert final.content[0].text == text and final.usage.output_tokens == 11
    assert final.stop_reason == "end_turn"


def test_tool_use_and_its_result(sdk: anthropic.Anthropic, fakes: Fakes) -> None:
    fakes.chat.answers.append(CALL)
    m = sdk.messages.create(model=CHAT, max_tokens=100, messages=HI, tools=TOOLS)
    assert m.stop_reason == "tool_use" and len(m.content) == 1
    use = m.content[0]
    assert use.type == "tool_use" and use.name == "get_weather" and use.id.startswith("toolu_")
    assert use.input == {"city": "Paris"}
    fakes.chat.answers.append("Sunny.")
    follow = sdk.messages.create(model=CHAT, max_tokens=100, tools=TOOLS, messages=[
        *HI, {"role": "assistant", "content": m.content},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": use.id, "content": "18 C"},
            {"type": "tool_result", "tool_use_id": use.id, "is_error": True,
             "content": [{"type": "text", "text": "no such city"}]},
            {"type": "text", "text": "And?"}]}])
    assert follow.content[0].type == "text" and follow.content[0].text == "Sunny."
    assert fakes.chat.prompts[-1] == (f"<tools>1<user>Q<assistant>{CALL}<tool>18 C"
                                      "<tool>Error: no such city<user>And?")


def test_streamed_tool_use(sdk: anthropic.Anthropic, http: httpx.Client, fakes: Fakes) -> None:
    fakes.chat.answers.append(CALL)
    with sdk.messages.stream(model=CHAT, max_tokens=100, messages=HI, tools=TOOLS,
                             tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].type == "tool_use"
    assert final.content[0].input == {"city": "Paris"}
    fakes.chat.answers.append(CALL)
    raw = http.post("/v1/messages", headers={"x-api-key": KEY}, json={
        "model": CHAT, "max_tokens": 100, "messages": HI, "tools": TOOLS, "stream": True})
    events = _events(raw.text)
    names = [name for name, _ in events]
    assert [k for i, k in enumerate(names) if i == 0 or names[i - 1] != k] == [
        "message_start", "ping", "content_block_start", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    block = events[2][1]["content_block"]
    assert block["type"] == "tool_use" and block["input"] == {} and block["name"] == "get_weather"
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert len(deltas) > 1 and {d["type"] for d in deltas} == {"input_json_delta"}
    assert json.loads("".join(d["partial_json"] for d in deltas)) == {"city": "Paris"}


def test_several_tool_uses_and_one_cut_short(sdk: anthropic.Anthropic, fakes: Fakes) -> None:
    oslo = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    fakes.chat.answers.append(f"{CALL}\n{oslo}")
    m = sdk.messages.create(model=CHAT, max_tokens=200, messages=HI, tools=TOOLS)
    assert [b.input for b in m.content if b.type == "tool_use"] == [
        {"city": "Paris"}, {"city": "Oslo"}]
    assert len({b.id for b in m.content if b.type == "tool_use"}) == 2
    fakes.chat.answers.append(f"{CALL}\n{oslo}")
    with sdk.messages.stream(model=CHAT, max_tokens=200, messages=HI, tools=TOOLS) as stream:
        final = stream.get_final_message()
    assert [b.input for b in final.content if b.type == "tool_use"] == [
        {"city": "Paris"}, {"city": "Oslo"}]
    fakes.chat.answers.append(f"{CALL}\n{oslo}")
    one = sdk.messages.create(model=CHAT, max_tokens=200, messages=HI, tools=TOOLS,
                              tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert len(one.content) == 1
    fakes.chat.answers.append(CALL)  # cut inside the arguments: max_tokens, input not parsed
    cut = sdk.messages.create(model=CHAT, max_tokens=40, messages=HI, tools=TOOLS)
    assert cut.stop_reason == "max_tokens" and cut.content[0].type == "tool_use"
    assert cut.content[0].input == {}


def test_tool_choice_translations(sdk: anthropic.Anthropic, fakes: Fakes) -> None:
    fakes.chat.answers.append("No tools.")
    sdk.messages.create(model=CHAT, max_tokens=50, messages=HI, tools=TOOLS,
                        tool_choice={"type": "none"})
    assert not fakes.chat.prompts[-1].startswith("<tools>")
    fakes.chat.answers.append(CALL)
    m = sdk.messages.create(model=CHAT, max_tokens=100, messages=HI, tools=TOOLS,
                            tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert m.stop_reason == "tool_use"


def test_stop_sequences_and_max_tokens(sdk: anthropic.Anthropic, fakes: Fakes) -> None:
    fakes.chat.answers.append("one two END three")
    m = sdk.messages.create(model=CHAT, max_tokens=50, messages=HI, stop_sequences=["END"])
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", "END")
    fakes.chat.answers.append("one two END three")
    with sdk.messages.stream(model=CHAT, max_tokens=50, messages=HI,
                             stop_sequences=["END"]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "END")
    fakes.chat.answers.append("a long answer")
    m = sdk.messages.create(model=CHAT, max_tokens=3, messages=HI)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3


def test_json_output_format(sdk: anthropic.Anthropic, fakes: Fakes) -> None:
    fakes.chat.answers.append('{"city": "Paris"}')
    m = sdk.messages.create(model=CHAT, max_tokens=50, messages=HI, output_config={"format": {
        "type": "json_schema", "schema": {"type": "object", "properties": {
            "city": {"type": "string"}}}}})
    assert m.content[0].type == "text" and json.loads(m.content[0].text) == {"city": "Paris"}


def test_count_tokens(sdk: anthropic.Anthropic, fakes: Fakes) -> None:
    assert sdk.messages.count_tokens(model=CHAT, messages=HI).input_tokens == len("<user>Q")
    counted = sdk.messages.count_tokens(model=CHAT, messages=HI, tools=TOOLS, system="S")
    assert counted.input_tokens == len("<tools>1<system>S<user>Q")
    fakes.chat.answers.append("x")
    m = sdk.messages.create(model=CHAT, max_tokens=5, messages=HI, tools=TOOLS, system="S")
    assert m.usage.input_tokens == counted.input_tokens
    with pytest.raises(anthropic.NotFoundError) as info:
        sdk.messages.count_tokens(model=EMBED, messages=HI)
    assert _error(info)["type"] == "not_found_error"


def test_engine_failure(sdk: anthropic.Anthropic, fakes: Fakes) -> None:
    fakes.chat.answers.append("!error")
    with pytest.raises(anthropic.InternalServerError) as info:
        sdk.messages.create(model=CHAT, max_tokens=50, messages=HI)
    assert _error(info)["type"] == "api_error"
    fakes.chat.answers.append("!error")
    with (pytest.raises(anthropic.APIStatusError, match="engine failure") as failed,
          sdk.messages.stream(model=CHAT, max_tokens=50, messages=HI) as stream):
        stream.get_final_message()
    assert _error(failed) == {"type": "api_error", "message": "engine failure"}


@pytest.mark.parametrize(("body", "status", "kind", "names"), [
    ({"model": "nope"}, 404, "not_found_error", "nope"),
    ({"max_tokens": None}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 10_000}, 400, "invalid_request_error", "context"),
    ({"messages": []}, 400, "invalid_request_error", "messages"),
    ({"messages": [{"role": "user", "content": "x" * 20_000}]}, 400, "invalid_request_error",
     "messages"),
    ({"messages": [*HI, {"role": "assistant", "content": "The answer is"}]}, 400,
     "invalid_request_error", "messages.1"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400,
     "invalid_request_error", "messages.0.content.0"),
    ({"messages": [{"role": "system", "content": "x"}]}, 400, "invalid_request_error",
     "messages.0.role"),
    ({"temperature": 1.5}, 400, "invalid_request_error", "temperature"),
    ({"stop_sequences": ["a", "b", "c", "d", "e"]}, 400, "invalid_request_error",
     "stop_sequences"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, 400, "invalid_request_error",
     "thinking"),
    ({"output_config": {"effort": "high"}}, 400, "invalid_request_error", "output_config.effort"),
    ({"output_config": {"format": {"type": "json_schema", "schema": {
        "type": "string", "maxLength": 10**9}}}}, 400, "invalid_request_error",
     "output_config.format.schema.maxLength"),
    ({"tools": [{**TOOLS[0], "input_schema": {"type": "object", "maxProperties": 10**9}}],
      "tool_choice": {"type": "any"}}, 400, "invalid_request_error",
     "tools.0.input_schema.maxProperties"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400,
     "invalid_request_error", "tools.0"),
    ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, 400,
     "invalid_request_error", "tool_choice"),
    ({"tool_choice": {"type": "tool"}}, 400, "invalid_request_error", "tool_choice"),
    ({"mcp_servers": []}, 400, "invalid_request_error", "mcp_servers"),
])
def test_refusals_in_anthropic_shape(http: httpx.Client, body: dict[str, Any], status: int,
                                     kind: str, names: str) -> None:
    request = {"model": CHAT, "max_tokens": 50, "messages": HI, **body}
    r = http.post("/v1/messages", headers={"x-api-key": KEY},
                  json={k: v for k, v in request.items() if v is not None})
    assert r.status_code == status, r.text
    assert set(r.json()) == {"type", "error"} and r.json()["type"] == "error"
    error = r.json()["error"]
    assert error["type"] == kind and names in error["message"], error
    assert "response_format" not in error["message"]  # named as this API calls it


def test_sdk_raises_the_right_classes(sdk: anthropic.Anthropic, fakes: Fakes) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        sdk.messages.create(model=CHAT, max_tokens=50, messages=HI,
                            extra_body={"temperature": 5})  # this SDK has no such argument
    assert "temperature" in _error(info)["message"]
    fakes.chat.max_queue = 0
    with pytest.raises(anthropic.APIStatusError) as busy:
        sdk.messages.create(model=CHAT, max_tokens=50, messages=HI)
    assert busy.value.status_code == 503 and _error(busy)["type"] == "overloaded_error"
    assert busy.value.response.headers["retry-after"] == "1"


def test_guard_refusals_in_anthropic_shape(http: httpx.Client, runtime: Runtime,
                                           settings: Settings) -> None:
    r = http.post("/v1/messages", json={"model": CHAT, "max_tokens": 5, "messages": HI})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = http.post("/v1/messages", headers={"x-api-key": "sk-wrong"}, json={})
    assert r.status_code == 401 and r.json()["type"] == "error"
    r = http.post("/v1/messages/count_tokens", headers={"x-api-key": KEY},
                  content=b"{" + b" " * (5 << 20) + b"}")
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    r = http.post("/v1/messages", headers={"x-api-key": KEY, "Origin": "http://evil.example"},
                  json={})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = http.get("/v1/messages", headers={"x-api-key": KEY})
    assert r.status_code == 405 and r.json()["type"] == "error"
    # other routes keep OpenAI's shape
    r = http.post("/v1/chat/completions", json={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_openapi_document_says_which_error_shape(http: httpx.Client) -> None:
    doc = http.get("/openapi.json", headers={"x-api-key": KEY}).json()
    paths, schemas = doc["paths"], doc["components"]["schemas"]
    assert {"/v1/responses", "/v1/messages", "/v1/messages/count_tokens"} <= set(paths)

    def refused(path: str) -> str:
        ref: str = paths[path]["post"]["responses"]["400"]["content"]["application/json"][
            "schema"]["$ref"]
        return ref.rsplit("/", 1)[1]

    assert refused("/v1/messages") == refused("/v1/messages/count_tokens") == "AnthropicError"
    assert refused("/v1/responses") == "Error"
    assert schemas["AnthropicError"]["properties"]["type"] == {"const": "error"}
    assert doc["components"]["securitySchemes"]["xApiKey"]["name"] == "x-api-key"


def test_x_api_key_has_the_keys_scopes(http: httpx.Client) -> None:
    """The x-api-key header is the same key: a key scoped to the embeddings model sees no
    chat model, on Anthropic's routes and OpenAI's alike."""
    models = http.get("/v1/models", headers={"x-api-key": SCOPED}).json()["data"]
    assert [m["id"] for m in models] == [EMBED]
    r = http.post("/v1/messages", headers={"x-api-key": SCOPED},
                  json={"model": CHAT, "max_tokens": 5, "messages": HI})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    sdk = anthropic.Anthropic(base_url="http://testserver", api_key=None, http_client=http,
                              default_headers={"x-api-key": KEY}, max_retries=0)
    assert sdk.messages.count_tokens(model=CHAT, messages=HI).input_tokens == 7


def test_x_api_key_has_the_keys_limits(runtime: Runtime, settings: Settings,
                                       fakes: Fakes) -> None:
    """A key that may have one request in flight: a second one, by x-api-key, gets 429 in
    Anthropic's shape while the first streams."""
    client(runtime, settings)  # writes the keys into the live configuration
    fakes.chat.gate.clear()
    app = create_app(runtime, settings)

    async def two() -> list[tuple[int, Callable[[], Any]]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            async def one() -> tuple[int, Any]:
                r = await c.post("/v1/messages", headers={"x-api-key": ONE}, json={
                    "model": CHAT, "max_tokens": 5, "messages": HI})
                return r.status_code, r.json

            first = asyncio.create_task(one())
            await asyncio.sleep(0.3)
            second = await one()
            fakes.chat.gate.set()
            return [await first, second]

    (ok, _), (refused, body) = asyncio.run(two())
    assert (ok, refused) == (200, 429)
    assert body()["error"]["type"] == "rate_limit_error"
