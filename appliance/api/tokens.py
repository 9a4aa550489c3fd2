"""POST /tokenize and /detokenize (also under /v1/): a chat model's own tokenizer, for clients
that count tokens before they send (llama-server's and vLLM's shapes, in one request type).

Text and conversations are tokenized exactly as the generation routes do it, so `count` is what
`usage.prompt_tokens` will say: `prompt` as /v1/completions reads a prompt, `messages` through
the chat template as /v1/chat/completions. Both routes are behind the API key and its model
scope, like every other route.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from appliance.api import chat
from appliance.api.errors import blame
from appliance.api.generation import MAX_CHARS_PER_TOKEN, allowed_models, check_chars, runtime
from appliance.api.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    refuse_media,
)
from appliance.bundle import manifest as mf
from appliance.engines.base import ChatBackend
from appliance.errors import ModelNotFound, Unsupported
from appliance.serve.runtime import Served

router = APIRouter()


@router.post("/tokenize", summary="Tokenize text or a conversation")
@router.post("/v1/tokenize", include_in_schema=False)
async def tokenize(req: TokenizeRequest, request: Request) -> dict[str, Any]:
    """Token ids of `content`, `prompt` or `messages` (exactly one), with their `count` and the
    model's context (`max_model_len`). Also served at /v1/tokenize."""
    req.check()
    served = chat_model(request, req.model)
    engine = served.engine
    if req.messages is not None:
        refuse_media(req.messages, served.id)
        check_chars((m.text() for m in req.messages), engine.ctx_per_seq, "messages")
        conversation = ChatCompletionRequest(model=served.id, messages=req.messages,
                                             tools=req.tools)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        with blame("messages"):
            ids = await asyncio.to_thread(engine.chat_prompt, chat.messages(conversation), tools)
    else:
        text, where = (req.content, "content") if req.content is not None else (
            req.prompt or "", "prompt")
        check_chars([text], engine.ctx_per_seq, where)
        ids = await asyncio.to_thread(engine.tokenize, text, req.special, req.parse_special)
    tokens: list[Any] = ids
    if req.with_pieces:
        tokens = await asyncio.to_thread(_pieces, engine, ids)
    return {"model": served.id, "tokens": tokens, "count": len(ids),
            "max_model_len": engine.ctx_per_seq}


@router.post("/detokenize", summary="Turn token ids back into text")
@router.post("/v1/detokenize", include_in_schema=False)
async def detokenize(req: DetokenizeRequest, request: Request) -> dict[str, Any]:
    """The text of `tokens`, special tokens written out; `content` (llama-server's name) and
    `prompt` (vLLM's) hold the same text. Also served at /v1/detokenize."""
    served = chat_model(request, req.model)
    engine = served.engine
    # the bound on text, applied to ids: more than tokenize could have given for accepted text
    most = engine.ctx_per_seq * MAX_CHARS_PER_TOKEN
    if len(req.tokens) > most:
        raise Unsupported("tokens", f"{len(req.tokens)} token ids; at most {most} at once")
    for i, token in enumerate(req.tokens):
        if not 0 <= token < engine.n_vocab:
            raise Unsupported(f"tokens.{i}", f"token id {token} is outside the vocabulary of "
                                             f"`{served.id}` (0 to {engine.n_vocab - 1})")
    text = await asyncio.to_thread(_text, engine, req.tokens)
    return {"model": served.id, "content": text, "prompt": text}


def chat_model(request: Request, model: str | None) -> Served[ChatBackend]:
    """The chat model named, or the only one the key sees when none is named."""
    rt, allowed = runtime(request), allowed_models(request)
    visible = rt.served(allowed)
    chats = [m.id for m in visible if m.task is mf.Task.CHAT]
    if model is None:
        if len(chats) == 1:
            return rt.chat(chats[0], allowed)
        if not chats:
            raise ModelNotFound("no chat model is served here", param="model")
        raise Unsupported("model", f"model is required: this appliance serves several chat "
                                   f"models ({', '.join(chats)})")
    other = next((m for m in visible if m.id == model and m.task is not mf.Task.CHAT), None)
    if other is not None:
        raise ModelNotFound(f"The model `{model}` serves {other.task}, not chat: tokenizing "
                            "needs a chat model", hint=f"chat models: {', '.join(chats) or 'none'}",
                            param="model")
    return rt.chat(model, allowed)


def _pieces(engine: ChatBackend, ids: list[int]) -> list[dict[str, Any]]:
    out = []
    for token in ids:
        raw = engine.piece(token, special=True)
        try:
            piece: str | list[int] = raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: its bytes, as llama-server gives
            piece = list(raw)
        out.append({"id": token, "piece": piece})
    return out


def _text(engine: ChatBackend, ids: list[int]) -> str:
    # bytes first: a character may be split over several tokens
    return b"".join(engine.piece(t, special=True) for t in ids).decode("utf-8", "replace")
