"""POST /v1/embeddings."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from appliance.api.errors import blame
from appliance.api.generation import MAX_CHARS_PER_TOKEN, allowed_models, runtime
from appliance.api.protocol import EmbeddingRequest
from appliance.engines.embed import truncate
from appliance.errors import ContextTooLong, Unsupported

router = APIRouter()


@router.post("/v1/embeddings", response_model=None)
async def embeddings(req: EmbeddingRequest, request: Request) -> Response:
    rt = runtime(request)
    limits = rt.settings
    served = rt.embeddings(req.model, allowed_models(request))
    engine = served.engine
    texts, token_lists = req.items()
    count = len(texts) or len(token_lists)
    if count > limits.max_embedding_inputs:
        raise Unsupported("input", f"{count} inputs; at most {limits.max_embedding_inputs} "
                                   "per request")
    if req.dimensions is not None and req.dimensions > engine.dimensions:
        raise Unsupported("dimensions", f"{served.id} gives {engine.dimensions} dimensions; "
                                        f"{req.dimensions} is more than it has")
    per_input = engine.max_tokens * MAX_CHARS_PER_TOKEN
    for i, text in enumerate(texts):
        if len(text) > per_input:
            where = "input" if len(texts) == 1 else f"input.{i}"
            raise ContextTooLong(f"{where} has {len(text)} characters; this model takes at "
                                 f"most {engine.max_tokens} tokens", param=where)
    with blame("input"):
        ids = await (asyncio.to_thread(engine.encode, texts) if texts
                     else asyncio.to_thread(engine.wrap, token_lists))
        tokens = sum(len(row) for row in ids)
        if tokens > limits.max_embedding_tokens:
            raise Unsupported("input", f"{tokens} tokens; at most "
                                       f"{limits.max_embedding_tokens} per request")
        vectors = await asyncio.wrap_future(engine.submit(ids))
    if req.dimensions is not None and req.dimensions < engine.dimensions:
        vectors = truncate(vectors, req.dimensions)
    head = {"object": "list", "model": served.id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    body = await asyncio.to_thread(_body, vectors, req.encoding_format == "base64", head)
    return Response(body, media_type="application/json")


def _body(vectors: np.ndarray, b64: bool, head: dict[str, Any]) -> bytes:
    """The response, one row at a time: thousands of vectors are a large JSON text, and one
    json.dumps call over all of them would hold the GIL, and so the event loop, throughout."""
    rows = []
    for i, vec in enumerate(vectors):
        row = np.ascontiguousarray(vec, dtype="<f4")
        value = (json.dumps(base64.b64encode(row.tobytes()).decode()) if b64
                 else json.dumps(row.tolist()))
        rows.append(f'{{"object":"embedding","index":{i},"embedding":{value}}}')
    return (json.dumps(head)[:-1] + ',"data":[' + ",".join(rows) + "]}").encode()
