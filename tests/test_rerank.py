"""POST /v1/rerank in the fast suite: the app in this process over the fake embeddings engine
(tests/fakes.py), whose vector for a text depends only on the lengths of its words, so "a bb"
and "x yy" get one vector. The same route runs against the real model in test_api_media.py."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fakes import CHAT, EMBED, KEY, WHISPER, Fakes, fake_settings

from appliance.serve.settings import Settings

AUTH = {"Authorization": f"Bearer {KEY}"}
DOCS = ["one two three", "x yy", "naïve"]  # "x yy" is the query's twin


@pytest.fixture
def settings() -> Settings:
    return fake_settings(max_embedding_inputs=5, max_embedding_tokens=40)


def _rerank(http: httpx.Client, path: str = "/v1/rerank", **fields: Any) -> httpx.Response:
    body = {"model": EMBED, "query": "a bb", "documents": DOCS, **fields}
    return http.post(path, headers=AUTH, json=body)


def test_documents_ranked_by_cosine(http: httpx.Client) -> None:
    r = _rerank(http)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == EMBED and body["id"].startswith("rerank-")
    results = body["results"]
    assert sorted(x["index"] for x in results) == [0, 1, 2]
    assert results[0]["index"] == 1 and results[0]["relevance_score"] == pytest.approx(1.0)
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    assert [x["document"]["text"] for x in results] == [DOCS[x["index"]] for x in results]
    # [CLS] and [SEP] around one token per word: 4 + 5 + 4 + 3
    assert body["usage"] == {"prompt_tokens": 16, "total_tokens": 16}


def test_top_n_objects_and_no_documents(http: httpx.Client) -> None:
    docs = [{"text": d} for d in DOCS]
    r = _rerank(http, documents=docs, top_n=2, return_documents=False)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2 and results[0]["index"] == 1
    assert all(set(x) == {"index", "relevance_score"} for x in results)
    full = _rerank(http, top_n=2).json()["results"]
    assert [x["index"] for x in full] == [x["index"] for x in results]
    assert full[0]["document"] == {"text": "x yy"}


@pytest.mark.parametrize("path", ["/rerank", "/v2/rerank"])
def test_aliases(http: httpx.Client, path: str) -> None:
    r = _rerank(http, path)
    assert r.status_code == 200 and r.json()["results"][0]["index"] == 1


LONG_WORDS = " ".join(["w"] * 70)  # 72 tokens; the fake takes 64


@pytest.mark.parametrize("fields,param,needle", [
    ({"documents": []}, "documents", "must not be empty"),
    ({"query": ""}, "query", "must not be empty"),
    ({"documents": ["a"] * 5}, "documents", "at most 4"),
    ({"documents": ["a", "b" * 5000]}, "documents.1", "characters"),
    ({"query": "q" * 5000}, "query", "characters"),
    ({"documents": ["a", LONG_WORDS]}, "documents.1", "72 tokens"),
    ({"query": LONG_WORDS}, "query", "72 tokens"),
    ({"documents": [" ".join(["w"] * 30), " ".join(["w"] * 30)]}, "documents", "at most 40"),
    ({"top_n": 0}, "top_n", "greater than or equal to 1"),
    ({"top_n": 4}, "top_n", "only 3 documents"),
    ({"documents": ["a", ""]}, "documents.1", "is empty"),
    ({"documents": ["a", 5]}, "documents.1", 'a string or an object {"text": string}'),
    ({"documents": [None]}, "documents.0", "a string or an object"),
    ({"documents": [{"text": 5}]}, "documents.0", "a string or an object"),
    ({"documents": [{"txt": "a"}]}, "documents.0", "a string or an object"),
    ({"documents": [{"text": "a", "title": "b"}]}, "documents.0", "a string or an object"),
    ({"documents": [["a"]]}, "documents.0", "a string or an object"),
    ({"documents": "a"}, "documents", "valid list"),
    ({"query": {"text": "a"}}, "query", "valid string"),
    ({"rank_fields": ["text"]}, "rank_fields", "Unrecognized request argument"),
    ({"model": CHAT}, "model", "`fake-chat` is a chat model"),
    ({"model": WHISPER}, "model", "is a transcription model"),
])
def test_refusals_name_the_field(http: httpx.Client, fields: dict[str, Any], param: str,
                                 needle: str) -> None:
    r = _rerank(http, **fields)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and needle in error["message"], error
    assert "str" not in error["message"].split(), error  # no pydantic union members


def test_unknown_model_is_404(http: httpx.Client) -> None:
    r = _rerank(http, model="nope")
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and "available: fake-embed" in error["message"]


def test_full_queue_is_503(http: httpx.Client, fakes: Fakes) -> None:
    fakes.embed.queued = fakes.embed.max_queue
    r = _rerank(http)
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"


def test_needs_a_key(http: httpx.Client) -> None:
    r = http.post("/v1/rerank", json={"model": EMBED, "query": "a", "documents": ["b"]})
    assert r.status_code == 401
