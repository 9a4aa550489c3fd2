"""The API surface in the fast suite, over fake engines (tests/fakes.py): clean errors for
content parts and unions, the default answer cap, CORS, tokenize/detokenize, model cards and
the OpenAPI document. The same routes run against the real models in test_api_surface.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fakes import CHAT, KEY, Fakes, client, fake_runtime, fake_settings
from routefixtures import api_error

from appliance.serve.runtime import Runtime

AUTH = {"Authorization": f"Bearer {KEY}"}
HI: Any = [{"role": "user", "content": "Q"}]
TOOLS: Any = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}}}}]


# --- content parts and other unions -----------------------------------------------------------

@pytest.mark.parametrize(("part", "says"), [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "takes no images"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
     "takes no audio input"),
    ({"type": "file", "file": {"file_id": "file-1"}}, "takes no files"),
])
def test_media_parts_say_the_model_takes_none(sdk: openai.OpenAI, fakes: Fakes,
                                               part: dict[str, Any], says: str) -> None:
    content = [{"type": "text", "text": "What is this?"}, part]
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=CHAT, messages=[
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": content}])
    body = api_error(info)
    assert body["param"] == "messages.1.content.1"
    assert body["message"].startswith(f"the model `{CHAT}` {says}"), body
    assert body["type"] == "invalid_request_error"
    assert fakes.chat.prompts == []  # nothing reached the engine


def test_text_parts_are_joined(sdk: openai.OpenAI, fakes: Fakes) -> None:
    sdk.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]}])
    assert fakes.chat.prompts[-1] == "<user>Hello, world"


@pytest.mark.parametrize(("change", "param", "message"), [
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": "x"}]}]},
     "messages.0.content.0", "a content part's type is text, image_url, input_audio or file"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages.0.content.0.text", "Field required"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "lang": "en"}]}]},
     "messages.0.content.0.lang", "Unrecognized request argument supplied"),
    ({"messages": [{"role": "user", "content": 5}]},
     "messages.0.content", "Input should be a valid string or a valid list"),
    ({"stop": 5}, "stop", "Input should be a valid string or a valid list"),
    ({"tool_choice": "maybe"}, "tool_choice", "'required' or a valid dictionary"),
    ({"tool_choice": {"type": "function"}}, "tool_choice.function", "Field required"),
    # keys the client chose stay in param, whatever they look like
    ({"metadata": {"Str": 5}}, "metadata.Str", "Input should be a valid string"),
    ({"List[X]": 1}, "List[X]", "Unrecognized request argument supplied"),
    ({"messages": [{"role": "user", "content": "Q", "Name": "x"}]}, "messages.0.Name",
     "Unrecognized request argument supplied"),
])
def test_union_errors_name_the_field_not_the_branch(http: httpx.Client, change: dict[str, Any],
                                                    param: str, message: str) -> None:
    r = http.post("/v1/chat/completions", headers=AUTH,
                  json={"model": CHAT, "messages": HI, **change})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param, error
    assert message in error["message"]
    for noise in ("list[", "str]", "TextPart", "MediaPart", "NamedToolChoice", "tagged-union"):
        assert noise not in error["message"].replace(param, "")


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"model": CHAT, "prompt": [1, 2]}, "prompt.0"),
    ("/v1/completions", {"model": CHAT, "prompt": {"text": "x"}}, "prompt"),
    ("/v1/embeddings", {"model": "fake-embed", "input": 5}, "input"),
    ("/v1/embeddings", {"model": "fake-embed"}, "input"),  # missing: the field not sent
    ("/v1/completions", {"model": CHAT, "prompt": "x", "stop": [1]}, "stop.0"),
])
def test_union_errors_of_other_routes(http: httpx.Client, path: str, body: dict[str, Any],
                                      param: str) -> None:
    r = http.post(path, headers=AUTH, json=body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param, error
    assert "[" not in error["message"], error


# --- the default answer cap -------------------------------------------------------------------

def test_default_max_tokens_caps_answers_without_max_tokens(tmp_path: Path, fakes: Fakes) -> None:
    settings = fake_settings(default_max_tokens=5)
    rt = fake_runtime(tmp_path / "root", fakes, settings)
    try:
        sdk = client(rt, settings)[0]
        fakes.chat.answers.extend(["abcdefghijkl"] * 3)
        capped = sdk.chat.completions.create(model=CHAT, messages=HI)
        assert capped.choices[0].message.content == "abcde"
        assert capped.choices[0].finish_reason == "length"
        asked = sdk.chat.completions.create(model=CHAT, messages=HI, max_tokens=8)
        assert asked.choices[0].message.content == "abcdefgh"  # the client's value wins
        text = sdk.completions.create(model=CHAT, prompt="x")  # OpenAI's 16, capped at 5
        assert text.choices[0].text == "abcde" and text.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError) as info:  # above the context: as before
            sdk.chat.completions.create(model=CHAT, messages=HI, max_tokens=10_000)
        assert api_error(info)["code"] == "context_length_exceeded"
    finally:
        rt.close()


def test_completions_keep_openais_default_under_a_larger_cap(sdk: openai.OpenAI,
                                                             fakes: Fakes) -> None:
    fakes.chat.answers.append("x" * 40)
    r = sdk.completions.create(model=CHAT, prompt="x")
    assert r.usage is not None and r.usage.completion_tokens == 16


# --- CORS -------------------------------------------------------------------------------------

PAGE = "http://chat.lan:3000"


@pytest.fixture
def browser(tmp_path: Path, fakes: Fakes) -> Iterator[httpx.Client]:
    """The app with one allowed origin, as a browser's requests reach it."""
    settings = fake_settings(allowed_origins=(PAGE,))
    rt = fake_runtime(tmp_path / "cors-root", fakes, settings)
    yield client(rt, settings)[1]
    rt.close()


def _preflight(http: httpx.Client, origin: str, path: str = "/v1/chat/completions",
               headers: str = "authorization,content-type") -> httpx.Response:
    """What a browser sends before a POST with an Authorization header: no key, no body."""
    return http.options(path, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                       "Access-Control-Request-Headers": headers})


def _allowed(r: httpx.Response) -> set[str]:
    return {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}


def test_preflight_of_a_listed_origin_needs_no_key(browser: httpx.Client) -> None:
    r = _preflight(browser, PAGE, headers="authorization,content-type,x-stainless-os,"
                                          "x-stainless-retry-count")
    assert r.status_code == 204 and r.content == b""
    assert r.headers["access-control-allow-origin"] == PAGE
    assert "POST" in r.headers["access-control-allow-methods"]
    assert {"authorization", "content-type", "x-api-key", "anthropic-version", "x-stainless-os",
            "x-stainless-retry-count"} <= _allowed(r)
    assert "Origin" in r.headers["vary"]
    assert "access-control-allow-credentials" not in r.headers
    assert "access-control-allow-private-network" not in r.headers
    lan = browser.options("/v1/models", headers={
        "Origin": PAGE, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Private-Network": "true"})
    assert lan.headers["access-control-allow-private-network"] == "true"


def test_preflight_allows_only_known_headers(browser: httpx.Client) -> None:
    r = _preflight(browser, PAGE, headers="authorization,x-evil,x-stainless-a\tb")
    assert r.status_code == 204
    assert "x-evil" not in _allowed(r) and not any("\t" in h for h in _allowed(r))


def test_listed_origin_reads_answers_and_errors(browser: httpx.Client) -> None:
    body = {"model": CHAT, "messages": HI}
    ok = browser.post("/v1/chat/completions", json=body,
                      headers={**AUTH, "Origin": PAGE})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == PAGE
    assert ok.headers["vary"] == "Origin"
    assert ok.headers["access-control-expose-headers"] == "Retry-After"
    streamed = browser.post("/v1/chat/completions", json={**body, "stream": True},
                            headers={**AUTH, "Origin": PAGE})
    assert streamed.headers["access-control-allow-origin"] == PAGE
    assert streamed.text.rstrip().endswith("data: [DONE]")
    for bad in (browser.post("/v1/chat/completions", json=body, headers={"Origin": PAGE}),
                browser.get("/v1/nowhere", headers={**AUTH, "Origin": PAGE})):
        assert bad.status_code in (401, 404)
        assert bad.headers["access-control-allow-origin"] == PAGE  # the page can read why


@pytest.mark.parametrize("origin", ["http://evil.lan", "http://chat.lan:3001", "null",
                                    PAGE.upper()])
def test_unlisted_origins_stay_refused(browser: httpx.Client, origin: str) -> None:
    for r in (_preflight(browser, origin),
              browser.post("/v1/chat/completions", json={"model": CHAT, "messages": HI},
                           headers={**AUTH, "Origin": origin})):
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_denied"
        assert not any(h.startswith("access-control-") for h in r.headers)


def test_options_without_a_preflight_is_as_before(browser: httpx.Client,
                                                  http: httpx.Client) -> None:
    # no Origin: not a browser's preflight, so the key is asked for, and OPTIONS is no method
    assert browser.options("/v1/models", headers={
        "Access-Control-Request-Method": "GET"}).status_code == 401
    assert browser.options("/v1/models", headers=AUTH).status_code == 405
    # no origin is allowed by default: a preflight is refused like any cross-origin request
    assert _preflight(http, PAGE).status_code == 403


# --- tokenize and detokenize ------------------------------------------------------------------

def _post(http: httpx.Client, path: str, body: dict[str, Any], key: str = KEY) -> httpx.Response:
    return http.post(path, json=body, headers={"Authorization": f"Bearer {key}"})


def test_tokenize_text_both_shapes(http: httpx.Client) -> None:
    """The fake's tokens are code points: the ids can be checked by hand."""
    for body in ({"content": "Hi!"}, {"prompt": "Hi!", "model": CHAT}):
        r = _post(http, "/tokenize", body)
        assert r.status_code == 200, r.text
        assert r.json() == {"model": CHAT, "tokens": [72, 105, 33], "count": 3,
                            "max_model_len": 256}
    pieces = _post(http, "/v1/tokenize", {"content": "Hé", "with_pieces": True}).json()
    assert pieces["tokens"] == [{"id": 72, "piece": "H"}, {"id": 233, "piece": "é"}]


def test_tokenize_messages_counts_what_chat_reports(http: httpx.Client, sdk: openai.OpenAI,
                                                    fakes: Fakes) -> None:
    convo: Any = [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Weather?"}]}]
    for tools in (None, TOOLS):
        extra = {"tools": tools} if tools else {}
        counted = _post(http, "/tokenize", {"model": CHAT, "messages": convo, **extra}).json()
        usage = sdk.chat.completions.create(model=CHAT, messages=convo, max_tokens=1,
                                            **extra).usage  # type: ignore[call-overload]
        assert usage is not None and counted["count"] == usage.prompt_tokens
        assert "".join(map(chr, counted["tokens"])) == fakes.chat.prompts[-1]
    assert counted["count"] > len("<system>Be brief.<user>Weather?")  # the tools are in it


def test_detokenize_gives_the_text_back(http: httpx.Client) -> None:
    ids = _post(http, "/tokenize", {"content": "Grüße, 世界"}).json()["tokens"]
    for path in ("/detokenize", "/v1/detokenize"):
        r = _post(http, path, {"tokens": ids})
        assert r.json() == {"model": CHAT, "content": "Grüße, 世界", "prompt": "Grüße, 世界"}
    assert _post(http, "/detokenize", {"model": CHAT, "tokens": []}).json()["content"] == ""


@pytest.mark.parametrize(("path", "body", "status", "param", "says"), [
    ("/tokenize", {}, 400, "content", "exactly one of content"),
    ("/tokenize", {"content": "a", "prompt": "b"}, 400, "prompt", "exactly one of content"),
    ("/tokenize", {"content": "a", "add_special": True, "add_special_tokens": True}, 400,
     "add_special_tokens", "not both"),
    ("/tokenize", {"content": "a", "tools": []}, 400, "tools", "goes with messages"),
    ("/tokenize", {"messages": HI, "add_special_tokens": True}, 400, "add_special_tokens",
     "chat template decides"),
    ("/tokenize", {"messages": HI, "add_generation_prompt": False}, 400,
     "add_generation_prompt", "always ends"),
    ("/tokenize", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages.0.content.0",
     "takes no images"),
    ("/tokenize", {"content": "x" * (256 * 64 + 1)}, 400, "content", "context is 256 tokens"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x" * (256 * 64 + 1)}]}, 400,
     "messages", "context is 256 tokens"),
    ("/tokenize", {"content": "a", "model": "nope"}, 404, "model", "does not exist"),
    ("/tokenize", {"content": "a", "model": "fake-embed"}, 404, "model",
     "serves embeddings, not chat"),
    ("/tokenize", {"content": "a", "return_token_strs": True}, 400, "return_token_strs",
     "Unrecognized"),
    ("/detokenize", {"tokens": [72, 0x110000]}, 400, "tokens.1", "outside the vocabulary"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens.0", "outside the vocabulary"),
    ("/detokenize", {"tokens": [72, True]}, 400, "tokens.1", "valid integer"),
    ("/detokenize", {"tokens": [72.0]}, 400, "tokens.0", "valid integer"),
    ("/detokenize", {"tokens": [65] * (256 * 64 + 1)}, 400, "tokens", "at most 16384"),
    ("/detokenize", {"tokens": "72"}, 400, "tokens", "valid list"),
    ("/detokenize", {"tokens": [1], "model": "fake-whisper"}, 404, "model",
     "serves transcription"),
])
def test_tokenizer_errors(http: httpx.Client, path: str, body: dict[str, Any], status: int,
                          param: str, says: str) -> None:
    r = _post(http, path, body)
    error = r.json()["error"]
    assert (r.status_code, error["param"]) == (status, param), error
    assert says in error["message"]


def test_tokenizer_routes_need_a_key_and_honour_its_scope(tmp_path: Path, fakes: Fakes) -> None:
    from appliance.device.apikeys import ApiKey, hash_key
    keys = (ApiKey("test", hash_key(KEY)), ApiKey("chat", hash_key("sk-c"), models=(CHAT,)),
            ApiKey("embed", hash_key("sk-e"), models=("fake-embed",)))
    settings = fake_settings(api_keys=keys)
    rt = fake_runtime(tmp_path / "root", fakes, settings)
    try:
        http = client(rt, settings)[1]
        for path, body in (("/tokenize", {"content": "a"}), ("/detokenize", {"tokens": [65]})):
            assert http.post(path, json=body).status_code == 401
            assert _post(http, path, body, "sk-wrong").status_code == 401
            assert _post(http, path, body, "sk-c").status_code == 200
            hidden = _post(http, path, body, "sk-e")
            assert hidden.status_code == 404 and "no chat model" in hidden.text
        # a model outside the key's scope is answered as one that does not exist
        other = _post(http, "/tokenize", {"content": "a", "model": "fake-embed"}, "sk-c")
        assert other.status_code == 404 and "serves embeddings" not in other.text
    finally:
        rt.close()


def test_model_is_required_with_several_chat_models(http: httpx.Client,
                                                    runtime: Runtime) -> None:
    import dataclasses
    runtime.models["fake-chat-2"] = dataclasses.replace(runtime.models[CHAT], id="fake-chat-2")
    r = _post(http, "/tokenize", {"content": "a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "fake-chat, fake-chat-2" in r.json()["error"]["message"]
    assert _post(http, "/tokenize", {"content": "a", "model": "fake-chat-2"}).json()[
        "model"] == "fake-chat-2"


# --- model cards ------------------------------------------------------------------------------

def test_model_cards_say_what_each_model_can_do(sdk: openai.OpenAI) -> None:
    cards = {m.id: m for m in sdk.models.list()}  # the SDK still parses the list
    assert list(cards) == [CHAT, "fake-embed", "fake-whisper"]
    assert all(m.object == "model" and m.owned_by == "demo" and m.created for m in
               cards.values())
    chat = (cards[CHAT].model_extra or {})["capabilities"]
    assert chat == {
        "task": "chat", "endpoints": ["/v1/chat/completions", "/v1/completions", "/tokenize",
                                      "/detokenize"],
        "context_length": 256, "input": ["text"], "tools": True, "json_schema": True,
        "json_object": True, "logprobs": True, "streaming": True,
        "limits": {"max_tokens": 256, "default_max_tokens": 256, "max_top_logprobs": 20,
                   "max_stop": 4, "max_request_kb": 4096}}
    embed = (cards["fake-embed"].model_extra or {})["capabilities"]
    assert embed["task"] == "embeddings" and embed["endpoints"] == ["/v1/embeddings",
                                                                      "/v1/rerank"]
    assert (embed["dimensions"], embed["context_length"]) == (8, 64)
    assert embed["limits"]["max_inputs"] == 2048
    whisper = (cards["fake-whisper"].model_extra or {})["capabilities"]
    assert whisper["endpoints"] == ["/v1/audio/transcriptions"]
    assert (whisper["languages"], whisper["translation"]) == (["en"], False)
    assert whisper["limits"] == {"max_upload_mb": 25, "max_audio_seconds": 1800}
    one = sdk.models.retrieve("fake-whisper")
    assert (one.model_extra or {})["capabilities"] == whisper
    assert (one.model_extra or {})["sequence"] == 1


def test_a_base_model_card_says_completion(sdk: openai.OpenAI, fakes: Fakes) -> None:
    fakes.chat.template = False
    card = (sdk.models.retrieve(CHAT).model_extra or {})["capabilities"]
    assert card["task"] == "completion" and card["tools"] is False
    assert "/v1/chat/completions" not in card["endpoints"]


def test_a_task_the_cards_do_not_know_yet(sdk: openai.OpenAI, runtime: Runtime) -> None:
    import dataclasses
    from enum import StrEnum

    class Later(StrEnum):
        RERANK = "rerank"

    runtime.models["fake-rerank"] = dataclasses.replace(
        runtime.models["fake-embed"], id="fake-rerank", task=Later.RERANK)  # type: ignore[arg-type]
    listed = {m.id: m for m in sdk.models.list()}
    assert (listed["fake-rerank"].model_extra or {})["capabilities"] == {
        "task": "rerank", "endpoints": []}
    assert sdk.models.retrieve("fake-rerank").owned_by == "demo"


# --- the OpenAPI document ---------------------------------------------------------------------

def test_openapi_document_is_behind_the_key(http: httpx.Client) -> None:
    assert http.get("/openapi.json").status_code == 401
    assert http.get("/openapi.json", headers={"Authorization": "Bearer sk-no"}).status_code == 401
    for cdn_page in ("/docs", "/redoc"):  # FastAPI's pages load scripts from a CDN: none here
        assert http.get(cdn_page, headers=AUTH).status_code == 404


def test_openapi_document_describes_the_routes(http: httpx.Client) -> None:
    import jsonschema
    from referencing import Registry
    from referencing.jsonschema import DRAFT202012

    from appliance.api.audio import FIELDS

    r = http.get("/openapi.json", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    assert {"/v1/models", "/v1/models/{model_id}", "/v1/chat/completions", "/v1/completions",
            "/v1/embeddings", "/v1/audio/transcriptions", "/v1/audio/translations",
            "/tokenize", "/detokenize", "/v1/rerank", "/healthz", "/metrics"} <= set(paths)
    assert "/openapi.json" not in paths and "/v1/tokenize" not in paths  # aliases: said once
    assert "/rerank" not in paths and "/v2/rerank" not in paths
    ops = [op for ops in paths.values() for op in ops.values()]
    assert not any("422" in op["responses"] for op in ops)  # we answer 400, never FastAPI's 422
    chat = paths["/v1/chat/completions"]["post"]
    assert chat["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"}
    assert paths["/healthz"]["get"]["security"] == []
    assert doc["security"] == [{"apiKey": []}, {"xApiKey": []}]  # either header
    form = paths["/v1/audio/transcriptions"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]
    assert set(form["properties"]) == FIELDS  # the fields the route reads, no more, no less
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert "default_max_tokens" in schemas["ChatCompletionRequest"]["properties"][
        "max_tokens"]["description"]
    undescribed = [k for k, v in schemas["TokenizeRequest"]["properties"].items()
                   if not v.get("description")]
    assert undescribed == []
    # the schemas are JSON Schema 2020-12, and they say what the route accepts
    for schema in schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    registry = Registry().with_resource("urn:doc", DRAFT202012.create_resource(doc))
    validator = jsonschema.Draft202012Validator(
        {"$ref": "urn:doc#/components/schemas/ChatCompletionRequest"}, registry=registry)
    good = {"model": CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Q"}]}], "max_tokens": 5}
    assert validator.is_valid(good)
    assert http.post("/v1/chat/completions", json=good, headers=AUTH).status_code == 200
    for bad in ({**good, "frobnicate": 1}, {**good, "max_tokens": 0}, {"model": CHAT}):
        assert not validator.is_valid(bad)
        assert http.post("/v1/chat/completions", json=bad, headers=AUTH).status_code == 400
