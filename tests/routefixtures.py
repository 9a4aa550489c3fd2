"""Fixtures of the fast route tests: the real app over fake engines (tests/fakes.py), with the
OpenAI SDK and a plain HTTP client. A test module changes the settings by defining its own
`settings` fixture; the others follow it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fakes import Fakes, client, fake_runtime, fake_settings

from appliance.serve.runtime import Runtime
from appliance.serve.settings import Settings


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


def api_error(exc: pytest.ExceptionInfo[openai.APIStatusError]) -> dict[str, Any]:
    """The JSON body of an error the SDK raised."""
    body = exc.value.body
    assert isinstance(body, dict)
    return body
