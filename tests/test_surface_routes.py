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

from appliance.serve.runtime import Runtime
from appliance.serve.settings import Settings

AUTH = {"Authorization": f"Bearer {KEY}"}
HI: Any = [{"role": "user", "content": "Q"}]


@pytest.fixture
def fakes() -> Fakes:
    return Fakes()


@pytest.fixture
def settings() -> Settings:
    return fake_settings()


@pytest.fixture
def runtime(tmp_path: Path, fakes: Fakes, settings: Settings) -> Iterator[Runtime]:
    rt = fake_runtime(tmp_path / "root", fakes, settings)
    yield rt
    rt.close()


@pytest.fixture
def sdk(runtime: Runtime, settings: Settings) -> openai.OpenAI:
    return client(runtime, settings)[0]


@pytest.fixture
def http(runtime: Runtime, settings: Settings) -> httpx.Client:
    return client(runtime, settings)[1]


def _error(exc: pytest.ExceptionInfo[openai.APIStatusError]) -> dict[str, Any]:
    body = exc.value.body
    assert isinstance(body, dict)
    return body


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
    body = _error(info)
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
])
def test_union_errors_name_the_field_not_the_branch(http: httpx.Client, change: dict[str, Any],
                                                    param: str, message: str) -> None:
    r = http.post("/v1/chat/completions", headers=AUTH,
                  json={"model": CHAT, "messages": HI, **change})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param, error
    assert message in error["message"]
    for noise in ("list[", "str]", "TextPart", "MediaPart", "NamedToolChoice", "tagged-union"):
        assert noise not in error["message"] and noise not in error["param"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"model": CHAT, "prompt": [1, 2]}, "prompt.0"),
    ("/v1/completions", {"model": CHAT, "prompt": {"text": "x"}}, "prompt"),
    ("/v1/embeddings", {"model": "fake-embed", "input": 5}, "input"),
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
        assert _error(info)["code"] == "context_length_exceeded"
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
