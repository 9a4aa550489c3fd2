"""Per-key scopes and limits, and keys that change while the app runs: the official SDK against
the app in this process, over the fake engines (tests/fakes.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fakes import CHAT, EMBED, KEY, WHISPER, Fakes, client, fake_runtime, fake_settings, wav

from appliance.api.app import create_app
from appliance.device import apikeys, config
from appliance.device.apikeys import ApiKey, hash_key
from appliance.device.store import Store
from appliance.serve.runtime import Runtime
from appliance.serve.settings import Settings

SCOPED, EMBEDDER = "sk-scoped", "sk-embedder"
ONE, TWO = "sk-one-at-a-time", "sk-two-a-minute"
KEYS = (ApiKey("test", hash_key(KEY)), ApiKey("scoped", hash_key(SCOPED), models=(CHAT,)),
        ApiKey("embedder", hash_key(EMBEDDER), models=(EMBED,)),
        ApiKey("one", hash_key(ONE), concurrent=1), ApiKey("two", hash_key(TWO), per_minute=2))
HI: Any = [{"role": "user", "content": "Q"}]


@pytest.fixture
def settings() -> Settings:
    return fake_settings(api_keys=KEYS)


@pytest.fixture
def sdk(runtime: Runtime, settings: Settings) -> Callable[[str], openai.OpenAI]:
    """One app; a client of it per key."""
    http = client(runtime, settings)[1]
    return lambda key: openai.OpenAI(base_url="http://testserver/v1", api_key=key,
                                     http_client=http, max_retries=0)


def _eventually(check: Callable[[], bool], seconds: float = 10.0) -> float:
    """Seconds until `check()` held (the key ring looks at the file once a second)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, "not within the time allowed"
        time.sleep(0.1)
    return time.monotonic() - start


def _works(sdk: openai.OpenAI) -> bool:
    try:
        sdk.models.list()
    except openai.AuthenticationError:
        return False
    return True


# --- scopes ---------------------------------------------------------------------------------

def test_a_scoped_key_sees_only_its_models(sdk: Callable[[str], openai.OpenAI]) -> None:
    scoped = sdk(SCOPED)
    assert [m.id for m in scoped.models.list()] == [CHAT]
    assert scoped.models.retrieve(CHAT).id == CHAT
    assert scoped.chat.completions.create(model=CHAT, messages=HI).choices[0].message.content
    assert [m.id for m in sdk(KEY).models.list()] == [CHAT, EMBED, WHISPER]
    for model in (EMBED, "nope"):
        with pytest.raises(openai.NotFoundError):
            scoped.models.retrieve(model)
    assert "fake-embed" not in sdk(SCOPED).with_raw_response.models.list().http_response.text


def test_other_models_answer_as_unknown_ones(sdk: Callable[[str], openai.OpenAI]) -> None:
    """Every route that takes a model: one that serves there, but not for this key, gets the
    very answer of one that does not exist."""
    scoped, embedder = sdk(SCOPED), sdk(EMBEDDER)
    calls: list[tuple[str, Callable[[str], Any]]] = [
        (CHAT, lambda m: embedder.chat.completions.create(model=m, messages=HI)),
        (CHAT, lambda m: embedder.completions.create(model=m, prompt="x")),
        (EMBED, lambda m: scoped.embeddings.create(model=m, input="x")),
        (WHISPER, lambda m: scoped.audio.transcriptions.create(model=m, file=("a.wav", wav()))),
        (EMBED, lambda m: _rerank(scoped, m)),
    ]
    for other, call in calls:
        answers = []
        for model in (other, "nope"):
            with pytest.raises(openai.NotFoundError) as info:
                call(model)
            body = info.value.body
            assert isinstance(body, dict) and body["code"] == "model_not_found", body
            answers.append(body["message"].replace(f"`{model}`", "`X`"))
        assert answers[0] == answers[1], answers
        assert not any(m in answers[0] for m in (CHAT, EMBED, WHISPER)), answers[0]
    assert embedder.embeddings.create(model=EMBED, input="x").data
    assert _rerank(embedder, EMBED).json()["results"]


def test_rerank_names_the_task_of_the_keys_own_models_only(
        sdk: Callable[[str], openai.OpenAI]) -> None:
    """Rerank names the task of a model that cannot rerank, but only for the key's own models:
    for any other it answers as for one that does not exist."""
    with pytest.raises(openai.BadRequestError) as refused:
        _rerank(sdk(SCOPED), CHAT)
    assert "`fake-chat` is a chat model" in str(refused.value.body)
    answers = []
    for model in (CHAT, "nope"):
        with pytest.raises(openai.NotFoundError) as info:
            _rerank(sdk(EMBEDDER), model)
        body = info.value.body
        assert isinstance(body, dict) and body["code"] == "model_not_found", body
        answers.append(body["message"].replace(f"`{model}`", "`X`"))
    assert answers[0] == answers[1] and CHAT not in answers[0], answers


def _rerank(sdk: openai.OpenAI, model: str) -> httpx.Response:
    """POST /v1/rerank through the SDK's plain post (it has no rerank call)."""
    return sdk.post("/rerank", cast_to=httpx.Response,
                    body={"model": model, "query": "q", "documents": ["d"]})


def test_metrics_name_only_the_keys_models(runtime: Runtime, settings: Settings) -> None:
    http = client(runtime, settings)[1]
    text = http.get("/metrics", headers={"Authorization": f"Bearer {SCOPED}"}).text
    assert f'model="{CHAT}"' in text and EMBED not in text and WHISPER not in text


# --- limits ---------------------------------------------------------------------------------

def test_concurrent_limit_while_a_stream_is_open(runtime: Runtime, settings: Settings,
                                                 fakes: Fakes) -> None:
    fakes.chat.gate.clear()  # the first answer streams until the gate opens
    app = create_app(runtime, settings)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as h:
            def sdk(key: str) -> openai.AsyncOpenAI:
                return openai.AsyncOpenAI(base_url="http://testserver/v1", api_key=key,
                                          http_client=h, max_retries=0)

            async def stream() -> str:
                chunks = await sdk(ONE).chat.completions.create(
                    model=CHAT, messages=HI, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in chunks
                                if c.choices])

            first = asyncio.create_task(stream())
            deadline = time.monotonic() + 5
            while fakes.chat.running == 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            with pytest.raises(openai.RateLimitError) as info:
                await sdk(ONE).models.list()
            assert info.value.response.headers["retry-after"] == "1"
            body = info.value.body
            assert isinstance(body, dict) and body["code"] == "rate_limit_exceeded"
            assert [m.id async for m in await sdk(KEY).models.list()]  # another key: unaffected
            fakes.chat.gate.set()
            assert await first == "Hello there!"
            # the refused request took no place: the key has its one place back
            assert [m.id async for m in await sdk(ONE).models.list()]

    asyncio.run(scenario())


def test_per_minute_limit(sdk: Callable[[str], openai.OpenAI]) -> None:
    two = sdk(TWO)
    two.models.list()
    two.chat.completions.create(model=CHAT, messages=HI)
    with pytest.raises(openai.RateLimitError) as info:
        two.models.list()
    assert 1 <= int(info.value.response.headers["retry-after"]) <= 60
    with pytest.raises(openai.RateLimitError):
        two.models.list()
    assert sdk(KEY).models.list() and sdk(ONE).models.list()


# --- keys that change while the app runs ----------------------------------------------------

def test_keys_added_and_removed_while_running(runtime: Runtime,
                                              sdk: Callable[[str], openai.OpenAI]) -> None:
    assert _works(sdk(KEY))
    late = apikeys.create(runtime.layout, "late", models=(EMBED,))
    assert _eventually(lambda: _works(sdk(late))) < 5  # checked once a second
    assert [m.id for m in sdk(late).models.list()] == [EMBED]  # with its scope
    apikeys.remove(runtime.layout, "test")
    assert _eventually(lambda: not _works(sdk(KEY))) < 5
    assert _works(sdk(late)) and _works(sdk(SCOPED))


def test_a_broken_file_keeps_the_old_keys(runtime: Runtime, sdk: Callable[[str], openai.OpenAI],
                                          caplog: pytest.LogCaptureFixture) -> None:
    assert _works(sdk(KEY))
    with Store(runtime.layout).locked(), config.change(runtime.layout) as new:
        (new / apikeys.FILE).write_text(f"test {hash_key(KEY)}\nnew-key {'ab' * 32}\n")
    with caplog.at_level(logging.WARNING, logger="appliance.api.keyring"):
        _eventually(lambda: _works(sdk(KEY)) and "api-keys:2" in caplog.text)
        time.sleep(1.2)  # checked again: the same bad file, reported once
        assert _works(sdk(KEY)) and _works(sdk(SCOPED))
    assert caplog.text.count("api-keys:2") == 1
    with Store(runtime.layout).locked(), config.change(runtime.layout) as new:
        (new / apikeys.FILE).write_text(f"test {hash_key(KEY)}\n")  # good again
    _eventually(lambda: not _works(sdk(SCOPED)))
    assert _works(sdk(KEY))


def test_a_device_without_keys_waits_for_its_first(tmp_path: Path, fakes: Fakes) -> None:
    """An image built without key hashes: every request is a 401 until a key arrives (here by
    the CLI; on a sealed device by a control document), then it works without a restart."""
    settings = fake_settings(api_keys=())
    rt = fake_runtime(tmp_path / "root", fakes, settings)
    try:
        settings.check()
        sdk, http = client(rt, settings)
        with pytest.raises(openai.AuthenticationError):
            sdk.models.list()
        first = apikeys.create(rt.layout, "first")
        keyed = openai.OpenAI(base_url="http://testserver/v1", api_key=first, max_retries=0,
                              http_client=http)
        _eventually(lambda: _works(keyed))
    finally:
        rt.close()
