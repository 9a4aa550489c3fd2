"""POST /v1/embeddings."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from appliance import manifest as mf
from appliance.engines.embed import BadTokens, TooLong, truncate
from appliance.protocol import EmbeddingRequest, Unsupported
from appliance.runtime import Runtime
from appliance.server import ApiError

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request) -> dict[str, Any]:
    runtime: Runtime = request.app.state.runtime
    limits = runtime.settings
    model = runtime.get(req.model, mf.Task.EMBEDDINGS)
    engine = model.engine
    texts, token_lists = req.items()
    count = len(texts) or len(token_lists)
    if count > limits.max_embedding_inputs:
        raise Unsupported("input", f"{count} inputs; at most {limits.max_embedding_inputs} "
                                   "per request")
    if req.dimensions is not None and req.dimensions > engine.dimensions:
        raise Unsupported("dimensions", f"{model.id} gives {engine.dimensions} dimensions; "
                                        f"{req.dimensions} is more than it has")
    try:
        ids = engine.encode(texts) if texts else engine.wrap(token_lists)
    except TooLong as exc:
        raise ApiError(400, exc.message, param="input", code="context_length_exceeded") from None
    except BadTokens as exc:
        raise ApiError(400, exc.message, param="input", code="invalid_token_id") from None
    tokens = sum(len(row) for row in ids)
    if tokens > limits.max_embedding_tokens:
        raise Unsupported("input", f"{tokens} tokens; at most {limits.max_embedding_tokens} "
                                   "per request")
    vectors = await asyncio.wrap_future(engine.submit(ids))
    if req.dimensions is not None and req.dimensions < engine.dimensions:
        vectors = truncate(vectors, req.dimensions)
    data = []
    for i, vec in enumerate(vectors):
        row = np.ascontiguousarray(vec, dtype="<f4")
        value: Any = (base64.b64encode(row.tobytes()).decode() if req.encoding_format == "base64"
                      else row.tolist())
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": model.id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
