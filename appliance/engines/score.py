"""Relevance scores for POST /v1/rerank. A `Scorer` turns one query and its documents into one
score per document; the route (api/rerank.py) knows only this seam, and the runtime picks the
scorer for a model (`Runtime.scorer`), so another kind of model can score without a change to
the route.

Served today: `CosineScorer`, over an embeddings model (a bi-encoder), as vLLM's rerank API
serves embedding models. The query and the documents go to the embeddings engine as one request
(its micro-batching, token limit and core lane), and a document's score is the cosine of its
vector with the query's, in [-1, 1]. That is topical similarity, not the relevance a
cross-encoder judges by reading query and document together: no registry this project builds
from carries cross-encoder weights (docs/design.md). A cross-encoder would be a second Scorer:
`tokenize` gives one row per (query, document) pair and `submit` returns their logits.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

import numpy as np

from appliance.engines.base import EmbedBackend
from appliance.engines.embed import TooLong
from appliance.errors import ContextTooLong

__all__ = ["CosineScorer", "Scorer", "cosines"]


class Scorer(Protocol):
    method: str  # how the scores are made: "cosine"
    max_tokens: int  # the most tokens one row may have

    def tokenize(self, query: str, documents: list[str]) -> list[list[int]]:
        """The token rows to run (their lengths are the request's usage); raises
        ContextTooLong naming `query` or `documents.N`. Blocking: call it off the event loop."""

    def submit(self, rows: list[list[int]]) -> Future[np.ndarray]:
        """One score per document, in the documents' order; raises Busy when the queue is
        full."""


class CosineScorer:
    """Cosine similarity of embeddings: row 0 is the query, the rest the documents."""

    method = "cosine"

    def __init__(self, engine: EmbedBackend) -> None:
        self.engine = engine
        self.max_tokens = engine.max_tokens

    def tokenize(self, query: str, documents: list[str]) -> list[list[int]]:
        try:
            return self.engine.encode([query, *documents])
        except TooLong as exc:
            where = "query" if exc.index == 0 else f"documents.{exc.index - 1}"
            raise ContextTooLong(f"{where} has {exc.tokens} tokens; this model takes at most "
                                 f"{self.max_tokens}", param=where) from None

    def submit(self, rows: list[list[int]]) -> Future[np.ndarray]:
        vectors = self.engine.submit(rows)
        scores: Future[np.ndarray] = Future()

        def done(f: Future[np.ndarray]) -> None:
            try:
                scores.set_result(cosines(f.result()))
            except Exception as exc:  # the engine's failure is the request's
                scores.set_exception(exc)

        vectors.add_done_callback(done)
        return scores


def cosines(vectors: np.ndarray) -> np.ndarray:
    """Cosine of row 0 with each later row. The graphs give unit vectors already; they are
    normalised again so that any embeddings engine scores alike, and clipped, since rounding
    puts a text against itself at 1 + 1e-7."""
    v = np.asarray(vectors, dtype=np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    out: np.ndarray = np.clip(v[1:] @ v[0], -1.0, 1.0)
    return out
