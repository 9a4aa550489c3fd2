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


@pytest.mark.parametrize("name,bound", [("model.onnx", 0.9999), ("model-int8.onnx", 0.98)])
def test_parity_with_reference(onnx_folder: Path, name: str, bound: float) -> None:
    engine = EmbedEngine(onnx_folder / name, 256, CoreLanes(2))
    try:
        got = engine.embed(engine.encode(REFERENCE["sentences"]))
        ref = np.array(REFERENCE["vectors"], dtype=np.float32)
        cosines = (got * ref).sum(axis=1)
        assert cosines.min() >= bound, cosines
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
        # fp32: batching and padding do not change a row. int8: activations are quantised with
        # one scale per batch (dynamic quantisation), so batch mates move a row slightly.
        alone = np.vstack([engine.embed(engine.encode([s])) for s in REFERENCE["sentences"]])
        if name == "model.onnx":
            assert np.abs(alone - got).max() < 1e-4
        else:
            assert (alone * got).sum(axis=1).min() > 0.98
    finally:
        engine.close()


def test_dynamic_padding_and_limits(onnx_folder: Path) -> None:
    engine = EmbedEngine(onnx_folder / "model-int8.onnx", 256, CoreLanes(2))
    try:
        ids = engine.encode(["hi", "a much longer sentence with several more words"])
        assert len(ids[0]) < len(ids[1]) < 128  # no fixed padding to 128
        with pytest.raises(TooLong, match="at most 256"):
            engine.encode(["word " * 300])
        with pytest.raises(BadTokens, match="outside"):
            engine.wrap([[engine.vocab + 5]])
        assert engine.wrap([[2023, 2003]]) == [[101, 2023, 2003, 102]]
    finally:
        engine.close()
