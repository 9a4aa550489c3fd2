"""POST /v1/rerank, and /rerank and /v2/rerank as vLLM serves it: the documents ordered by their
relevance to a query, in the shape Cohere, Jina and vLLM share. The scores come from the
model's Scorer (engines/score.py): today an embeddings model's, the cosine of query and document
vectors, not a cross-encoder's relevance."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from appliance.api import responses
from appliance.api.errors import blame
from appliance.api.generation import MAX_CHARS_PER_TOKEN, allowed_models, runtime
from appliance.api.protocol import RerankRequest
from appliance.errors import ContextTooLong, Unsupported

router = APIRouter()


@router.post("/v1/rerank", response_model=None,
             summary="Order documents by relevance to a query (cosines of an embeddings model)")
@router.post("/v2/rerank", response_model=None, include_in_schema=False)
@router.post("/rerank", response_model=None, include_in_schema=False)
async def rerank(req: RerankRequest, request: Request) -> Response:
    rt = runtime(request)
    limits = rt.settings
    model, scorer = rt.scorer(req.model, allowed_models(request))
    most = limits.max_embedding_inputs - 1  # the query is one of the embeddings inputs
    if len(req.documents) > most:
        raise Unsupported("documents", f"{len(req.documents)} documents; at most {most} per "
                                       "request (max_embedding_inputs, the query included)")
    documents = req.texts()
    if req.top_n is not None and req.top_n > len(documents):
        raise Unsupported("top_n", f"top_n is {req.top_n}, but there are only "
                                   f"{len(documents)} documents")
    per_text = scorer.max_tokens * MAX_CHARS_PER_TOKEN
    named = [("query", req.query), *((f"documents.{i}", d) for i, d in enumerate(documents))]
    for where, text in named:
        if len(text) > per_text:
            raise ContextTooLong(f"{where} has {len(text)} characters; this model takes at "
                                 f"most {scorer.max_tokens} tokens", param=where)
    with blame("documents"):
        rows = await asyncio.to_thread(scorer.tokenize, req.query, documents)
        tokens = sum(len(row) for row in rows)
        if tokens > limits.max_embedding_tokens:
            raise Unsupported("documents", f"{tokens} tokens; at most "
                                           f"{limits.max_embedding_tokens} per request")
        scores = await asyncio.wrap_future(scorer.submit(rows))
    # best first; equal scores keep the documents' order
    order = sorted(range(len(documents)), key=lambda i: -scores[i])[:req.top_n]
    results = []
    for i in order:
        result: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
        if req.return_documents:
            result["document"] = {"text": documents[i]}
        results.append(result)
    out = {"id": responses.new_id("rerank"), "object": "list", "model": model.id,
           "results": results, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    # the documents come back in it (up to max_json_kb): encoded off the event loop
    body = await asyncio.to_thread(json.dumps, out, ensure_ascii=False)
    return Response(body.encode(), media_type="application/json")
