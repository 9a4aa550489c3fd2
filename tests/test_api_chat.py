"""The chat API end to end: a real `appliance-ctl serve` with the demo bundle's SmolLM2, driven
by the official OpenAI SDK (and raw HTTP where the SDK cannot send the bad input)."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from conftest import Server, start_server

pytestmark = pytest.mark.models
MODEL = "smollm2-135m-instruct"
CONFIG = """
[server]
max_body_mb = 1
max_json_kb = 1024
[chat]
parallel = 4
kv_cells = 6144
ctx_per_seq = 1024
"""
# SmolLM2-135M answers well with a system prompt of its own (its template's default one leads
# it astray on this question).
ASK = [{"role": "system", "content": "You are a helpful assistant."},
       {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           demo_bundles: tuple[Path, Path]) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("api") / "root", demo_bundles, CONFIG)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=server.key, max_retries=0)


def test_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL, "all-minilm-l6-v2", "whisper-tiny.en"]
    assert client.models.retrieve(MODEL).owned_by == "demo"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_plain_chat(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=30)
    choice = r.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_matches_plain_and_reports_usage(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0,
                                           max_tokens=40)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0, max_tokens=40, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == plain.choices[0].finish_reason and finishes.count(None) == len(
        finishes) - 1
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0,
                                       max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage is not None
    assert r.usage.completion_tokens == 3


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "population"],
              "properties": {"city": {"type": "string"}, "population": {"type": "integer"}}}
    r = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=80,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    data = json.loads(r.choices[0].message.content or "")
    jsonschema.validate(data, schema)


def test_json_object_mode(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=200, response_format={"type": "json_object"},
        messages=[*ASK[:1], {"role": "user", "content":
                             'Reply in JSON with the key "capital" for France.'}])
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def test_tool_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=60, tools=TOOLS, tool_choice="required",
        messages=[{"role": "user", "content": "What's the weather in Paris?"}])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments),
                        TOOLS[0]["function"]["parameters"])  # type: ignore[index]
    # the result goes back to the model as a tool message
    follow = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=30, tools=TOOLS,
        messages=[{"role": "user", "content": "What's the weather in Paris?"},
                  {"role": "assistant", "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_call_streamed(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=60, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True,
        messages=[{"role": "user", "content": "Weather in Oslo?"}]))
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].function and calls[0].function.name == "get_weather"
    assert "city" in json.loads(calls[0].function.arguments or "")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_stop_sequence(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=30)
    content = full.choices[0].message.content or ""
    word = content.split()[2]
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=30,
                                       stop=[word])
    assert r.choices[0].message.content == content[: content.index(word)]
    assert r.choices[0].finish_reason == "stop"


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def ask(seed: int) -> str:
        r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0,
                                           max_tokens=25, seed=seed)
        return r.choices[0].message.content or ""

    assert ask(1234) == ask(1234)
    assert len({ask(s) for s in (1, 2, 3, 4)}) > 1


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=5,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs and r.choices[0].logprobs.content
    assert content and len(content) == r.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0])  # greedy picks the most likely token
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_batched_equals_unbatched(client: openai.OpenAI) -> None:
    prompts = ["Name a fruit.", "What is 2+2?", "Say hello in French.", "Name a colour."]

    def ask(p: str) -> str:
        r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=24,
                                           messages=[{"role": "user", "content": p}])
        return r.choices[0].message.content or ""

    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                  temperature=0, echo=True)
    assert r.choices[0].text.startswith("The capital of France is")
    many = client.completions.create(model=MODEL, prompt=["One, two,", "Red, green,"],
                                     max_tokens=4, temperature=0, logprobs=2)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].logprobs and len(many.choices[0].logprobs.tokens or []) == 4
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="One, two,", max_tokens=4, temperature=0, stream=True) if c.choices)
    assert streamed == many.choices[0].text


@pytest.mark.parametrize("kwargs,param,code", [
    ({"n": 2}, "n", None),
    ({"temperature": 5}, "temperature", None),
    ({"extra_body": {"mirostat": 2}}, "mirostat", None),
    ({"top_logprobs": 2}, "top_logprobs", None),
    ({"stop": ["x" * 300]}, "stop", None),
    ({"logit_bias": {"99999999": 5}}, "logit_bias", None),
    ({"messages": [{"role": "user", "content": "word " * 1100}]}, "messages",
     "context_length_exceeded"),
    ({"max_tokens": 5000}, "messages", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                  "image_url": {"url": "x"}}]}]}, None, None),
    ({"tool_choice": "required"}, "tool_choice", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, None, None),
])
def test_bad_requests(client: openai.OpenAI, kwargs: dict[str, object], param: str | None,
                      code: str | None) -> None:
    args: dict[str, object] = {"model": MODEL, "messages": ASK, "max_tokens": 5, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**args)  # type: ignore[call-overload]
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error"
    if param:
        assert body["param"] == param, body
    if code:
        assert body["code"] == code, body
    assert "/" not in body["message"] or "http" in body["message"]  # no file paths leak


def test_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_status_shows_the_runtime(server: Server) -> None:
    from conftest import run_tool
    out = run_tool("ctl", server.root, "status", "--json")
    rt = json.loads(out.stdout)["runtime"]
    assert rt["health"]["status"] == "ok"
    chat = rt["models"][MODEL]
    assert (chat["task"], chat["backend"], chat["quantization"]) == ("chat", "cpu", "Q4_1")
    assert chat["loaded"] and "no cuda device" in chat["reason"]
    text = run_tool("ctl", server.root, "status").stdout
    assert "health ok" in text and "why: CPU" in text


def test_auth(server: Server) -> None:
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=f"{server.base}/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    r = httpx.get(f"{server.base}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    engines = httpx.get(f"{server.base}/healthz").json()["engines"]
    assert engines == {MODEL: "ok", "all-minilm-l6-v2": "ok", "whisper-tiny.en": "ok"}


def _headers(server: Server, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.key}", **extra}


def test_body_limit(server: Server) -> None:
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    r = httpx.post(f"{server.base}/v1/chat/completions", json=big, headers=_headers(server))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(f"{server.base}/v1/chat/completions", headers=_headers(server),
                         content=iter([b"{" + b" " * (1 << 20), b" " * (1 << 20)]))
    assert chunked.status_code == 413


def test_host_and_origin_checks(server: Server) -> None:
    r = httpx.get(f"{server.base}/v1/models", headers=_headers(server, Host="evil.example"))
    assert r.status_code == 421
    r = httpx.get(f"{server.base}/v1/models",
                  headers=_headers(server, Origin="http://evil.example"))
    assert r.status_code == 403 and "cross-origin" in r.json()["error"]["message"]


def test_malformed_json_and_types(server: Server) -> None:
    url = f"{server.base}/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers=_headers(
        server, **{"content-type": "application/json"}))
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url, json={"model": MODEL, "messages": "hello"}, headers=_headers(server))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(url, json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
                   headers=_headers(server))
    assert r.status_code == 400
    assert "Traceback" not in r.text


def test_disconnect_frees_the_sequence(server: Server, client: openai.OpenAI) -> None:
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", headers=_headers(server),
                      json={"model": MODEL, "messages": ASK, "max_tokens": 900,
                            "temperature": 1.0, "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{server.base}/metrics", headers=_headers(server)).text
        if f'appliance_chat_active{{model="{MODEL}"}} 0' in metrics:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the sequence was not freed: {metrics}")


def test_saturated_queue_answers_503(tmp_path: Path, demo_bundles: tuple[Path, Path]) -> None:
    srv = start_server(tmp_path / "root", demo_bundles,
                       "[server]\nmax_queue = 1\n[chat]\nparallel = 1\n")
    try:
        def ask(_: int) -> tuple[int, str | None]:
            r = httpx.post(f"{srv.base}/v1/chat/completions", headers=_headers(srv), timeout=60,
                           json={"model": MODEL, "messages": ASK, "max_tokens": 200,
                                 "temperature": 1.0})
            return r.status_code, r.headers.get("retry-after")

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(ask, range(6)))
        codes = [c for c, _ in results]
        assert 200 in codes and 503 in codes, codes
        assert all(ra == "1" for c, ra in results if c == 503)
    finally:
        srv.stop()


def test_survives_a_disconnect_storm(server: Server, client: openai.OpenAI) -> None:
    """Many streaming clients that vanish after their first chunk: every sequence is freed
    and the engine keeps serving."""
    def hang_up(i: int) -> None:
        with httpx.stream("POST", f"{server.base}/v1/chat/completions", timeout=60,
                          headers=_headers(server),
                          json={"model": MODEL, "messages": ASK, "max_tokens": 500,
                                "temperature": 1.0, "seed": i, "stream": True}) as r:
            next(r.iter_lines())

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        list(pool.map(hang_up, range(24)))
    deadline = time.monotonic() + 20
    metrics = ""
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{server.base}/metrics", headers=_headers(server)).text
        if (f'appliance_chat_active{{model="{MODEL}"}} 0' in metrics
                and f'appliance_chat_queued{{model="{MODEL}"}} 0' in metrics):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(metrics)
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=8)
    assert r.choices[0].message.content
    assert httpx.get(f"{server.base}/healthz").status_code == 200


def test_slow_connection_flood_is_bounded(tmp_path: Path,
                                          demo_bundles: tuple[Path, Path]) -> None:
    """Connections that never finish their headers (slowloris) cannot pile up: one address
    holds at most max_connections_per_client (then 429, JSON, Retry-After), others are still
    served, and the server closes the slow ones after header_timeout (tests/test_connections.py
    has the rest of the connection limits)."""
    import socket as socket_mod
    srv = start_server(tmp_path / "root", demo_bundles,
                       "[server]\nmax_connections_per_client = 16\nheader_timeout = 2\n")
    held: list[socket_mod.socket] = []
    try:
        for _ in range(16):
            s = socket_mod.create_connection(("127.0.0.1", srv.port))
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
            held.append(s)
        time.sleep(0.5)
        refused = httpx.get(f"{srv.base}/healthz", timeout=10)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "too_many_connections"
        other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        assert other.get(f"{srv.base}/healthz", timeout=10).status_code == 200
        deadline = time.monotonic() + 10  # the slow ones are closed: the address is free again
        while httpx.get(f"{srv.base}/healthz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        for s in held:
            s.close()
        srv.stop()
