"""Host-side conversions that a recipe can ask for.

`onnx-embeddings`: a BERT-family sentence encoder in safetensors becomes an ONNX graph whose output
is already mean-pooled and L2-normalised, so the device needs only onnxruntime and `tokenizers`.
An int8 per-channel copy is made as well (per-tensor int8 loses too much accuracy on MiniLM). The
converter checks its own output against the torch model before it hands anything to the bundle.

torch and transformers are imported lazily: only this host step needs them (`appliance[convert]`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.errors import FetchError, FormatError, UsageError
from appliance.fsutil import build_once

Log = Callable[[str], None]
CONVERTER_VERSION = "onnx-embeddings/1"
OPSET = 17
PROBE_SENTENCES = (
    "The appliance answers without any network.",
    "A signed bundle carries the models.",
    "short",
)
FP32_MIN_COSINE = 0.9999
INT8_MIN_COSINE = 0.98


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(
            f"converting embeddings needs {module}, which is not installed",
            hint="pip install 'appliance[convert]' on the build host",
        ) from exc


def _cache_key(src: Path) -> str:
    digest = hashlib.sha256(CONVERTER_VERSION.encode())
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        digest.update(name.encode())
        digest.update(hashlib.sha256((src / name).read_bytes()).digest())
    return digest.hexdigest()


def onnx_embeddings(src: Path, cache: Path, log: Log) -> Path:
    """Convert `src` (config.json, model.safetensors, tokenizer.json); return the output folder
    holding model.onnx, model-int8.onnx and tokenizer.json. Results are cached by input hash."""
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (src / name).is_file():
            raise FetchError(f"{src} lacks {name}; onnx-embeddings needs a safetensors BERT folder")

    def convert(out: Path) -> None:
        log("convert embeddings model to ONNX (pooling + L2 norm in the graph)")
        encoder = _load_encoder(src)
        _export(encoder, out / "model.onnx")
        log("quantise to int8, per channel")
        quantization = _require("onnxruntime.quantization")
        quantization.quantize_dynamic(
            str(out / "model.onnx"), str(out / "model-int8.onnx"),
            per_channel=True, weight_type=quantization.QuantType.QInt8,
        )
        shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
        reference = _torch_embed(encoder, src / "tokenizer.json")
        for name, bound in (("model.onnx", FP32_MIN_COSINE), ("model-int8.onnx", INT8_MIN_COSINE)):
            worst = _parity(out / name, out / "tokenizer.json", reference)
            log(f"{name}: worst cosine to torch {worst:.6f} (bound {bound})")
            if worst < bound:
                raise FormatError(f"converted {name} drifts from the torch model: "
                                  f"cosine {worst:.5f}")
        (out / "parity.json").write_text(json.dumps({"converter": CONVERTER_VERSION}))

    return build_once(cache / "convert" / _cache_key(src), convert)


def _load_encoder(src: Path) -> Any:
    torch = _require("torch")
    transformers = _require("transformers")
    safetensors_torch = _require("safetensors.torch")
    config = transformers.AutoConfig.for_model(**json.loads((src / "config.json").read_text()))
    bert = transformers.AutoModel.from_config(config)
    state = safetensors_torch.load_file(str(src / "model.safetensors"))
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    missing, unexpected = bert.load_state_dict(state, strict=False)
    # position_ids is a buffer that older transformers saved and newer ones rebuild: not a weight
    if [k for k in [*missing, *unexpected] if not k.endswith("position_ids")]:
        raise FormatError(f"{src}/model.safetensors does not fit its config.json "
                          f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)")
    bert.eval()

    class Encoder(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return Encoder().eval()


def _export(encoder: Any, target: Path) -> None:
    torch = _require("torch")
    ids = torch.ones((2, 8), dtype=torch.int64)
    mask = torch.ones((2, 8), dtype=torch.int64)
    # The tracer warns about constants it folds (the mask arithmetic); the parity check below is
    # what tells whether the graph is right.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder, (ids, mask), str(target),
            input_names=["input_ids", "attention_mask"], output_names=["embeddings"],
            dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                          "attention_mask": {0: "batch", 1: "tokens"},
                          "embeddings": {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )


def _encode(tokenizer_path: Path) -> tuple[Any, Any]:
    np = _require("numpy")
    tokenizers = _require("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    tok.no_padding()
    tok.enable_padding()
    encodings = tok.encode_batch(list(PROBE_SENTENCES))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    return ids, mask


def _torch_embed(encoder: Any, tokenizer_path: Path) -> Any:
    torch = _require("torch")
    ids, mask = _encode(tokenizer_path)
    with torch.no_grad():
        return encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


def _parity(model: Path, tokenizer_path: Path, reference: Any) -> float:
    ort = _require("onnxruntime")
    ids, mask = _encode(tokenizer_path)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    return float((got * reference).sum(axis=1).min())
