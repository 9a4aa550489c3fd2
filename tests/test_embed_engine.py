"""Parity of our ONNX embeddings with the reference pipeline (sentence-transformers, computed once
on the host: tests/fixtures/embed_reference.json), for both variants of the demo bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from appliance.engines.embed import BadTokens, EmbedEngine, TooLong
from appliance.engines.lanes import CoreLanes

pytestmark = pytest.mark.models
REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "embed_reference.json").read_text())


@pytest.fixture(scope="module")
def onnx_folder(smollm_gguf: Path) -> Path:
    return smollm_gguf.parent.parent / "all-minilm-l6-v2"


@pytest.mark.parametrize("name,bound,batch", [("model.onnx", 0.9999, 32),
                                              ("model-int8.onnx", 0.98, 1)])
def test_parity_with_reference(onnx_folder: Path, name: str, bound: float, batch: int) -> None:
    engine = EmbedEngine(onnx_folder / name, 256, CoreLanes(2), max_batch=batch)
    try:
        got = engine.embed(engine.encode(REFERENCE["sentences"]))
        ref = np.array(REFERENCE["vectors"], dtype=np.float32)
        cosines = (got * ref).sum(axis=1)
        assert cosines.min() >= bound, cosines
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
        # a text gives the same vector alone and among others, for both variants (int8 runs
        # one row at a time, as the runtime loads it: its activation scales are per run)
        alone = np.vstack([engine.embed(engine.encode([s])) for s in REFERENCE["sentences"]])
        assert np.abs(alone - got).max() < 1e-4
    finally:
        engine.close()


def test_dynamic_padding_and_limits(onnx_folder: Path) -> None:
    engine = EmbedEngine(onnx_folder / "model-int8.onnx", 256, CoreLanes(2))
    try:
        ids = engine.encode(["hi", "a much longer sentence with several more words"])
        assert len(ids[0]) < len(ids[1]) < 128  # no fixed padding to 128
        with pytest.raises(TooLong, match="at most 256") as info:
            engine.encode(["ok", "word " * 300])
        assert (info.value.index, info.value.tokens) == (1, 302)  # [CLS] 300 words [SEP]
        with pytest.raises(BadTokens, match="outside"):
            engine.wrap([[engine.vocab + 5]])
        assert engine.wrap([[2023, 2003]]) == [[101, 2023, 2003, 102]]
    finally:
        engine.close()


def test_int8_in_batches_would_move_vectors(onnx_folder: Path) -> None:
    """Why int8 runs row by row: the same graph in batches gives a text another vector."""
    engine = EmbedEngine(onnx_folder / "model-int8.onnx", 256, CoreLanes(2), max_batch=32)
    try:
        got = engine.embed(engine.encode(REFERENCE["sentences"]))
        alone = np.vstack([engine.embed(engine.encode([s])) for s in REFERENCE["sentences"]])
        assert np.abs(alone - got).max() > 1e-3
    finally:
        engine.close()
