"""Model cards for GET /v1/models: OpenAI's four fields (so the SDKs still parse them), the
bundle and sequence that answer, and under `capabilities` what the model can do here: its task,
the endpoints that take it, its context, its features and the limits a request must keep.

A task this module does not know yet (one a newer bundle format adds) gets a card with its
task and no endpoints, rather than an error for the whole list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from appliance.api.audio import FORMATS
from appliance.api.protocol import MAX_STOP
from appliance.engines.base import ChatBackend, EmbedBackend, TranscribeBackend
from appliance.serve.runtime import LoadedModel
from appliance.serve.settings import Settings

TOKENIZER = ["/tokenize", "/detokenize"]
MAX_TOP_LOGPROBS = 20  # as protocol.ChatCompletionRequest.top_logprobs allows


def model_card(m: LoadedModel, settings: Settings) -> dict[str, Any]:
    describe = DESCRIBE.get(str(m.task))
    found = describe(cast(Any, m.engine), settings) if describe and m.engine else {}
    return {"id": m.id, "object": "model", "created": m.created, "owned_by": m.bundle,
            "bundle": m.bundle, "sequence": m.sequence,
            "capabilities": {"task": str(m.task), "endpoints": [], **found}}


def _chat(engine: ChatBackend, s: Settings) -> dict[str, Any]:
    # a base model (no chat template) only continues text
    chats = bool(engine.template)
    return {
        "task": "chat" if chats else "completion",
        "endpoints": [*(["/v1/chat/completions"] if chats else []), "/v1/completions",
                      *TOKENIZER],
        "context_length": engine.ctx_per_seq,
        "input": ["text"],
        "tools": chats, "json_schema": True, "json_object": True, "logprobs": True,
        "streaming": True,
        "limits": {"max_tokens": engine.ctx_per_seq,  # prompt and answer together
                   "default_max_tokens": min(s.default_max_tokens, engine.ctx_per_seq),
                   "max_top_logprobs": MAX_TOP_LOGPROBS, "max_stop": MAX_STOP,
                   "max_request_kb": s.max_json_kb},
    }


def _embeddings(engine: EmbedBackend, s: Settings) -> dict[str, Any]:
    return {
        "endpoints": ["/v1/embeddings", "/v1/rerank"],  # rerank: cosines of the vectors
        "context_length": engine.max_tokens,  # of each input
        "dimensions": engine.dimensions,  # `dimensions` may ask for fewer (renormalised)
        "encoding_formats": ["float", "base64"],
        "limits": {"max_input_tokens": engine.max_tokens,
                   "max_inputs": s.max_embedding_inputs,
                   "max_tokens_per_request": s.max_embedding_tokens,
                   "max_request_kb": s.max_json_kb},
    }


def _transcription(engine: TranscribeBackend, s: Settings) -> dict[str, Any]:
    return {
        "endpoints": ["/v1/audio/transcriptions",
                      *(["/v1/audio/translations"] if engine.multilingual else [])],
        "languages": list(engine.languages),  # spoken; the bundle may narrow the model's
        "multilingual": engine.multilingual,
        "translation": engine.multilingual,  # into English
        "response_formats": list(FORMATS),
        "streaming": True,
        "limits": {"max_upload_mb": s.max_body_mb, "max_audio_seconds": s.max_audio_seconds},
    }


DESCRIBE: dict[str, Callable[[Any, Settings], dict[str, Any]]] = {
    "chat": _chat, "embeddings": _embeddings, "transcription": _transcription}
