"""The API surface end to end: a real `appliance-ctl serve` with the demo bundle, driven by the
official OpenAI SDK and by httpx as a browser's page and a token-counting client use it:
model cards, tokenize/detokenize with the real SmolLM2 tokenizer, CORS, the default answer cap,
media parts and the OpenAPI document."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import Server, start_server

pytestmark = pytest.mark.models
MODEL = "smollm2-135m-instruct"
PAGE = "http://chat.lan:5173"
CONFIG = f"""
[server]
allowed_origins = ["{PAGE}"]
[chat]
parallel = 2
kv_cells = 4096
ctx_per_seq = 1024
default_max_tokens = 12
"""
ASK: Any = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
TOOLS: Any = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           demo_bundles: tuple[Path, Path]) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("surface") / "root", demo_bundles, CONFIG)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def sdk(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=server.key, max_retries=0)


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base, timeout=120,
                      headers={"Authorization": f"Bearer {server.key}"}) as c:
        yield c


def _caps(model: Any) -> dict[str, Any]:
    found: dict[str, Any] = (model.model_extra or {})["capabilities"]
    return found


def test_model_cards(sdk: openai.OpenAI) -> None:
    cards = {m.id: _caps(m) for m in sdk.models.list()}
    chat = cards[MODEL]
    # kv_cells / (parallel + prefix_slots) = 4096 / 4 = 1024, within ctx_per_seq
    assert (chat["task"], chat["context_length"]) == ("chat", 1024)
    assert chat["endpoints"][0] == "/v1/chat/completions" and "/tokenize" in chat["endpoints"]
    assert chat["tools"] and chat["json_schema"]
    assert chat["limits"]["default_max_tokens"] == 12
    embed = cards["all-minilm-l6-v2"]
    assert (embed["task"], embed["dimensions"], embed["context_length"]) == (
        "embeddings", 384, 256)
    assert embed["endpoints"] == ["/v1/embeddings", "/v1/rerank"]
    whisper = cards["whisper-tiny.en"]
    assert (whisper["languages"], whisper["translation"]) == (["en"], False)
    assert whisper["endpoints"] == ["/v1/audio/transcriptions"]
    assert _caps(sdk.models.retrieve(MODEL)) == chat


def test_tokenize_round_trip_with_the_real_tokenizer(http: httpx.Client) -> None:
    text = "The quick brown fox — naïve café, 東京, 🦙!"
    r = http.post("/tokenize", json={"content": text, "with_pieces": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODEL and body["max_model_len"] == 1024
    assert body["count"] == len(body["tokens"]) < len(text)
    raw = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"])
                   for p in body["tokens"])
    assert raw.decode() == text
    # byte-level BPE splits some characters over tokens: those pieces come as bytes
    assert any(isinstance(p["piece"], list) for p in body["tokens"])
    ids = [p["id"] for p in body["tokens"]]
    back = http.post("/v1/detokenize", json={"model": MODEL, "tokens": ids}).json()
    assert back["content"] == back["prompt"] == text
    plain = http.post("/v1/tokenize", json={"model": MODEL, "content": text}).json()
    assert plain["tokens"] == ids


def test_token_counts_match_what_the_routes_report(http: httpx.Client,
                                                   sdk: openai.OpenAI) -> None:
    for tools in (None, TOOLS):
        extra: dict[str, Any] = {"tools": tools} if tools else {}
        counted = http.post("/tokenize", json={"messages": ASK, **extra}).json()
        r = sdk.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1,
                                        temperature=0, **extra)
        assert r.usage is not None and counted["count"] == r.usage.prompt_tokens
    template = http.post("/detokenize", json={"tokens": counted["tokens"]}).json()["content"]
    assert "<|im_start|>" in template and "get_weather" in template  # special tokens written
    prompt = "Once upon a time"
    counted = http.post("/tokenize", json={"model": MODEL, "prompt": prompt}).json()
    done = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert done.usage is not None and counted["count"] == done.usage.prompt_tokens


def test_tokenizer_errors(http: httpx.Client, server: Server) -> None:
    vocab = http.post("/detokenize", json={"tokens": [10**6]})
    assert vocab.status_code == 400 and vocab.json()["error"]["param"] == "tokens.0"
    embed = http.post("/tokenize", json={"model": "all-minilm-l6-v2", "content": "x"})
    assert embed.status_code == 404 and "serves embeddings" in embed.json()["error"]["message"]
    long = http.post("/tokenize", json={"content": "x" * (1024 * 64 + 1)})
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.post(f"{server.base}/tokenize", json={"content": "x"}).status_code == 401


def test_browser_preflight_then_request(server: Server) -> None:
    """The sequence a page's fetch() with an Authorization header makes: a preflight without
    key or body, then the request, whose answer the page may read."""
    with httpx.Client(base_url=server.base, timeout=120) as browser:
        pre = browser.options("/v1/chat/completions", headers={
            "Origin": PAGE, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == PAGE
        allowed = {h.strip() for h in pre.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type"} <= allowed
        assert "POST" in pre.headers["access-control-allow-methods"]
        r = browser.post("/v1/chat/completions", headers={
            "Origin": PAGE, "Authorization": f"Bearer {server.key}",
            "Content-Type": "application/json"},
            json={"model": MODEL, "messages": ASK, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        assert r.headers["access-control-allow-origin"] == PAGE and r.headers["vary"] == "Origin"
        denied = browser.options("/v1/chat/completions", headers={
            "Origin": "http://elsewhere.lan", "Access-Control-Request-Method": "POST"})
        assert denied.status_code == 403
        assert "access-control-allow-origin" not in denied.headers


def test_default_cap_and_client_values(sdk: openai.OpenAI) -> None:
    story: Any = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
    capped = sdk.chat.completions.create(model=MODEL, messages=story, temperature=0)
    assert capped.usage is not None and capped.usage.completion_tokens == 12
    assert capped.choices[0].finish_reason == "length"
    longer = sdk.chat.completions.create(model=MODEL, messages=story, temperature=0,
                                         max_tokens=20)
    assert longer.usage is not None and longer.usage.completion_tokens == 20
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=MODEL, messages=story, max_tokens=5000)
    assert isinstance(info.value.body, dict) and info.value.body["code"] == (
        "context_length_exceeded")


def test_an_image_part_is_a_clean_400(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == "messages.0.content.1"
    assert body["message"].startswith(f"the model `{MODEL}` takes no images")


def test_openapi_document(http: httpx.Client, server: Server) -> None:
    assert httpx.get(f"{server.base}/openapi.json").status_code == 401
    doc = http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/tokenize", "/detokenize"} <= set(doc["paths"])


def test_multilingual_whisper_card(tmp_path_factory: pytest.TempPathFactory,
                                   multilingual_bundle: tuple[Path, Path]) -> None:
    """whisper base (bundles/multilingual.toml): its card names its languages and the
    translations route; with no chat model served, /tokenize says so."""
    srv = start_server(tmp_path_factory.mktemp("multi") / "root", multilingual_bundle, "",
                       bundles=("multilingual-1.bundle",))
    try:
        sdk = openai.OpenAI(base_url=f"{srv.base}/v1", api_key=srv.key, max_retries=0)
        caps = _caps(sdk.models.retrieve("whisper-base"))
        assert caps["task"] == "transcription" and caps["translation"] and caps["multilingual"]
        assert caps["endpoints"] == ["/v1/audio/transcriptions", "/v1/audio/translations"]
        assert {"en", "de", "fr", "ja", "sw"} <= set(caps["languages"])
        assert len(caps["languages"]) >= 99
        none = httpx.post(f"{srv.base}/tokenize", json={"content": "x"},
                          headers={"Authorization": f"Bearer {srv.key}"})
        assert none.status_code == 404 and "no chat model" in none.json()["error"]["message"]
    finally:
        srv.stop()
