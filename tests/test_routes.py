"""The route logic in the fast suite: the official OpenAI SDK against the app in this process,
over fake engines (tests/fakes.py). Error mapping, tool calls, SSE framing and the queue bounds;
the same routes run against the real models in test_api_chat.py and test_api_media.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import httpx
import openai
import pytest
from fakes import CHAT, EMBED, KEY, WHISPER, Fakes, client, wav
from routefixtures import api_error

from appliance.api.app import create_app
from appliance.serve.runtime import Runtime
from appliance.serve.settings import Settings

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


# --- chat -------------------------------------------------------------------------------------

def test_chat_answer_usage_and_fingerprint(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.answers.append("Paris.")
    r = sdk.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Q"}])
    assert r.choices[0].message.content == "Paris."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens == 6
    assert r.system_fingerprint is not None and r.system_fingerprint.endswith("-demo-1")
    assert fakes.chat.prompts[-1] == "<user>Q"


def test_streamed_chat_framing(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.answers.append("abc")
    chunks = list(sdk.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Q"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "abc"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert len({c.id for c in chunks}) == 1


def test_error_mid_stream_reaches_the_sdk(sdk: openai.OpenAI, http: httpx.Client,
                                          fakes: Fakes) -> None:
    fakes.chat.answers.append("!error")
    with pytest.raises(openai.APIError, match="engine failure"):
        list(sdk.completions.create(model=CHAT, prompt="x", stream=True))
    fakes.chat.answers.append("!error")
    raw = http.post("/v1/completions", json={"model": CHAT, "prompt": "x", "stream": True},
                    headers={"Authorization": f"Bearer {KEY}"})
    events = [line.removeprefix("data: ") for line in raw.text.splitlines() if line]
    assert json.loads(events[0])["choices"][0]["text"] == "Hel"
    assert json.loads(events[1]) == {"error": {"message": "engine failure", "type":
                                               "server_error", "param": None, "code": None}}
    assert events[-1] == "[DONE]" and len(events) == 3
    fakes.chat.answers.append("!error")
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Q"}])


def test_tool_call_parsed_streamed_and_not(sdk: openai.OpenAI, fakes: Fakes) -> None:
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    fakes.chat.answers.append(call)
    r = sdk.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "W?"}],
                                    tools=TOOLS)  # type: ignore[arg-type]
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert msg.tool_calls is not None
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}
    fakes.chat.answers.append(call)
    chunks = list(sdk.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "W?"}], tools=TOOLS,  # type: ignore[arg-type]
        stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function is not None and calls[0].function.name == "get_weather"
    assert not any(c.choices[0].delta.content for c in chunks)
    fakes.chat.answers.append("No tool needed.")
    r = sdk.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}],
                                    tools=TOOLS)  # type: ignore[arg-type]
    assert r.choices[0].message.content == "No tool needed."


def test_tool_call_history_with_quotes_in_the_name(sdk: openai.OpenAI, fakes: Fakes) -> None:
    """An assistant turn with tool calls and no content is shown to the template as JSON: a
    quote in a client's function name or arguments must not break it (it was an f-string)."""
    history: list[Any] = [
        {"role": "user", "content": "W?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": 'we"ird', "arguments": '{"city": "Pa\\"ris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    sdk.chat.completions.create(model=CHAT, messages=history)
    shown = fakes.chat.prompts[-1]
    turn = shown.split("<assistant>")[1].split("<tool>")[0]
    assert json.loads(turn) == {"name": 'we"ird', "arguments": {"city": 'Pa"ris'}}


@pytest.mark.parametrize(("kwargs", "status", "param", "code"), [
    ({"model": "nope"}, 404, "model", "model_not_found"),
    ({"model": EMBED}, 404, "model", "model_not_found"),
    ({"n": 9}, 400, "n", None),  # past max_n
    ({"n": 0}, 400, "n", None),
    ({"logit_bias": {"9999999": 1}}, 400, "logit_bias", None),
    ({"logit_bias": {"\u00b2": 1}}, 400, "logit_bias", None),
    ({"logit_bias": {"1" * 5000: 1}}, 400, "logit_bias", None),
    ({"max_tokens": 10_000}, 400, "messages", "context_length_exceeded"),
    ({"temperature": 5}, 400, "temperature", None),
    ({"tool_choice": "required"}, 400, "tool_choice", None),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "maxLength": 10**9}}}}, 400,
     "response_format.json_schema.schema.maxLength", None),
    ({"messages": [{"role": "user", "content": "x" * 20_000}]}, 400, "messages",
     "context_length_exceeded"),
])
def test_chat_errors_map_to_openai_shape(sdk: openai.OpenAI, kwargs: dict[str, Any],
                                         status: int, param: str, code: str | None) -> None:
    args: dict[str, Any] = {"model": CHAT, "messages": [{"role": "user", "content": "Q"}],
                            **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        sdk.chat.completions.create(**args)
    assert info.value.status_code == status
    body = api_error(info)
    assert (body["param"], body["code"]) == (param, code), body


def test_busy_engine_is_503_with_retry_after(http: httpx.Client, fakes: Fakes) -> None:
    fakes.chat.max_queue = 0
    r = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                  json={"model": CHAT, "messages": [{"role": "user", "content": "Q"}]})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "server_busy"


def test_base_model_cannot_chat(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.template = False
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Q"}])
    assert api_error(info)["code"] == "no_chat_template"
    assert sdk.completions.create(model=CHAT, prompt="Once").choices[0].text


def test_completions_echo_logprobs_and_stops(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.answers.append("one two three")
    r = sdk.completions.create(model=CHAT, prompt="Count:", echo=True, logprobs=1,
                               stop=["two"], max_tokens=50)
    choice = r.choices[0]
    assert choice.text.startswith("Count:") and choice.finish_reason == "stop"
    assert choice.logprobs is not None and choice.logprobs.tokens
    fakes.chat.answers.extend(["a", "b"])
    many = sdk.completions.create(model=CHAT, prompt=["1", "2"])
    assert [c.index for c in many.choices] == [0, 1]
    assert many.usage is not None and many.usage.completion_tokens == 2


# --- embeddings ---------------------------------------------------------------------------

def test_embeddings_and_their_errors(sdk: openai.OpenAI, fakes: Fakes) -> None:
    r = sdk.embeddings.create(model=EMBED, input=["a b", "c"])
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == 8
    assert r.usage.prompt_tokens == 7
    with pytest.raises(openai.BadRequestError) as info:
        sdk.embeddings.create(model=EMBED, input=" ".join(["w"] * 100))
    error = api_error(info)
    assert (error["param"], error["code"]) == ("input", "context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as info:
        sdk.embeddings.create(model=EMBED, input=[[1, 99999]])
    assert api_error(info)["code"] == "invalid_token_id"


def test_embeddings_queue_is_bounded(sdk: openai.OpenAI, fakes: Fakes, runtime: Runtime,
                                     settings: Settings) -> None:
    """A full embeddings queue answers 503 with Retry-After instead of growing."""
    fakes.embed.hold.clear()  # batches wait: the queue fills
    fakes.embed.max_queue = 2
    app = create_app(runtime, settings)

    async def burst() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            async def one() -> int:
                r = await c.post("/v1/embeddings", json={"model": EMBED, "input": "x"},
                                 headers={"Authorization": f"Bearer {KEY}"})
                return r.status_code

            tasks = [asyncio.create_task(one()) for _ in range(5)]
            await asyncio.sleep(0.3)
            fakes.embed.hold.set()
            return sorted(await asyncio.gather(*tasks))

    assert asyncio.run(burst()) == [200, 200, 503, 503, 503]


# --- audio --------------------------------------------------------------------------------

def test_transcription_formats_and_errors(sdk: openai.OpenAI) -> None:
    assert sdk.audio.transcriptions.create(model=WHISPER, file=("a.wav", wav())).text == (
        "Hello world.")
    srt = sdk.audio.transcriptions.create(model=WHISPER, file=("a.wav", wav()),
                                          response_format="srt")
    assert "00:00:00,000 --> 00:00:00,500" in str(srt)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.audio.translations.create(model=WHISPER, file=("a.wav", wav()))
    assert api_error(info)["param"] == "model"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.audio.transcriptions.create(model=WHISPER, file=("a.wav", b"not audio"))
    assert api_error(info)["param"] == "file"


def test_streamed_transcription(http: httpx.Client) -> None:
    r = http.post("/v1/audio/transcriptions", headers={"Authorization": f"Bearer {KEY}"},
                  files={"file": ("a.wav", wav())},
                  data={"model": WHISPER, "stream": "true"})
    events = [json.loads(line.removeprefix("data: ")) for line in r.text.splitlines()
              if line.startswith("data: {")]
    assert [e["type"] for e in events] == ["transcript.text.delta"] * 2 + [
        "transcript.text.done"]
    assert events[-1]["text"] == "Hello world."


def test_clients_leaving_a_streamed_transcription_give_their_place_back(
        runtime: Runtime, settings: Settings, fakes: Fakes) -> None:
    """Clients that go away before the first chunk (the response never gets to stream) once
    kept their queue place for good: after max_queue of them every transcription got 503."""
    fakes.whisper.gate.clear()  # decoding waits until the clients have gone
    app = create_app(runtime, settings)
    body, content_type = _multipart({"model": WHISPER, "stream": "true"}, wav())

    async def leave_early() -> None:
        sent: list[dict[str, Any]] = []
        done = False

        async def receive() -> dict[str, Any]:
            nonlocal done
            if not done:
                done = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}  # gone at once

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.start":
                raise OSError("client went away")

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                 "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/audio/transcriptions", "raw_path": b"/v1/audio/transcriptions",
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
                 "server": ("testserver", 80),
                 "headers": [(b"host", b"testserver"), (b"content-type", content_type.encode()),
                             (b"authorization", f"Bearer {KEY}".encode())]}
        with contextlib.suppress(OSError):  # the send above: the client is gone
            await app(scope, receive, send)

    async def five() -> None:  # more than max_queue (2)
        for _ in range(5):
            await leave_early()

    asyncio.run(five())
    fakes.whisper.gate.set()
    deadline = time.monotonic() + 10
    while fakes.whisper.slots.taken and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fakes.whisper.slots.taken == 0
    sdk = client(runtime, settings)[0]
    assert sdk.audio.transcriptions.create(model=WHISPER, file=("a.wav", wav())).text


def _multipart(fields: dict[str, str], audio: bytes) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", data=fields, files={"file": ("a.wav", audio)})
    return request.read(), request.headers["content-type"]


# --- the rest -----------------------------------------------------------------------------

def test_models_health_metrics_and_guards(http: httpx.Client, sdk: openai.OpenAI) -> None:
    assert [m.id for m in sdk.models.list()] == [CHAT, EMBED, WHISPER]
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("nope")
    assert http.get("/healthz").json() == {"status": "ok"}  # no key needed: nothing more
    assert http.get("/v1/models").status_code == 401
    assert 'appliance_chat_requests{model="fake-chat"}' in http.get(
        "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    wrong_host = http.get("/v1/models", headers={"Host": "evil.example"})
    assert wrong_host.status_code == 421
    assert wrong_host.json()["error"]["code"] == "misdirected_request"
    unknown = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                        json={"model": CHAT, "messages": [{"role": "user", "content": "Q"}],
                              "frobnicate": 1})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "frobnicate"
    assert http.get("/v1/nowhere", headers={"Authorization": f"Bearer {KEY}"}).json()[
        "error"]["code"] == "not_found"
    wrong_method = http.delete("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert wrong_method.status_code == 405 and "GET" in wrong_method.headers["allow"]
