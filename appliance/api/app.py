"""The HTTP service: the app factory. Routes live one module per family (models, chat,
completions, embeddings, rerank, audio, tokens, and the Responses and Messages APIs,
translated onto chat); errors become HTTP in `api/errors.py`; every request passes the Guard
(`api/guard.py`) first and the connection limits (`api/connections.py`) before that. The API
keys are the live configuration's, re-read while the app runs (`api/keyring.py`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from appliance.api import (
    anthropic_messages,
    audio,
    chat,
    completions,
    embeddings,
    errors,
    models,
    openai_responses,
    openapi,
    rerank,
    tokens,
)
from appliance.api.guard import Guard
from appliance.api.keyring import KeyRing
from appliance.serve.runtime import Runtime
from appliance.serve.settings import Settings


def create_app(runtime: Runtime, settings: Settings) -> Any:
    """The ASGI app. The runtime is loaded by the caller; the app closes it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        runtime.close()

    app = FastAPI(title="appliance", version="1", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.runtime = runtime
    app.state.settings = settings
    errors.install(app)
    for family in (models, chat, completions, embeddings, rerank, audio, tokens, openai_responses,
                   anthropic_messages, openapi):
        app.include_router(family.router)
    return Guard(app, settings, KeyRing(runtime.layout, settings.api_keys))
