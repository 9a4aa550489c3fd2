"""The bundle manifest: what a signed bundle contains and how each model may be run.

The manifest is the only thing the signature covers; every payload byte is bound to it by size
and sha256. The parser is strict (unknown keys, wrong types and unsafe paths are FormatErrors)
because it runs on data that has only just been authenticated, and a signing host can still be
misconfigured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from appliance.errors import FormatError
from appliance.strict import Fields, load_toml

FORMAT_VERSION = 1
MAX_MANIFEST = 1024 * 1024
MAX_FILES = 4096
MAX_FILE_SIZE = 1 << 40  # 1 TiB: far above any edge model, far below what breaks arithmetic
MAX_PATH = 255  # what a ustar header can carry (prefix + name)
MAX_TEMPLATE = 64 * 1024
MAX_CHECKS = 8

NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
SHA256 = re.compile(r"[0-9a-f]{64}")
QUANT = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_COMPONENT = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,127}")
RESERVED = frozenset({"manifest.toml", "manifest.sig"})
# Serialised Python objects can run code when loaded; no engine of ours needs them.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib", ".npy", ".npz")


class Task(StrEnum):
    CHAT = "chat"
    EMBEDDINGS = "embeddings"
    TRANSCRIPTION = "transcription"


class Backend(StrEnum):
    CUDA = "cuda"
    METAL = "metal"
    CPU = "cpu"


class WeightFormat(StrEnum):
    GGUF = "gguf"
    ONNX = "onnx"
    CT2 = "ct2"


def check_path(path: str) -> str:
    """Accept only a plain relative POSIX path; raise FormatError otherwise."""
    shown = path[:80].encode("unicode_escape").decode()
    if not path or len(path.encode()) > MAX_PATH:
        raise FormatError(f"path {shown!r} is empty or longer than {MAX_PATH} bytes")
    if path.startswith("/") or "\\" in path or "\x00" in path:
        raise FormatError(f"path {shown!r} must be relative, with / separators and no NUL")
    for part in path.split("/"):
        if part in ("", ".", "..") or not _COMPONENT.fullmatch(part):
            raise FormatError(
                f"path {shown!r} has the component {part[:40]!r}",
                hint="use letters, digits and ._+- only; no empty, hidden, . or .. parts",
            )
    if path in RESERVED:
        raise FormatError(f"path {path!r} is reserved for the bundle's own metadata")
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise FormatError(f"path {path!r} is a pickle file; bundles never carry pickles")
    return path


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Variant:
    backend: Backend
    format: WeightFormat
    quantization: str
    path: str  # the file (gguf, onnx) or folder (ct2) the engine opens
    memory_mb: int
    files: tuple[str, ...]


@dataclass(frozen=True)
class Defaults:
    context_length: int | None = None
    chat_template: str | None = None
    pooling: str | None = None
    max_input_tokens: int | None = None
    dimensions: int | None = None
    languages: tuple[str, ...] = ()


@dataclass(frozen=True)
class Check:
    """A self-test the device runs on the variant it chose before a sequence goes live. The
    expected results were computed on the host when the bundle was built, so they are signed.

    chat: `input` is a user message; the greedy answer (at most `max_tokens`) must contain each
      of `contains` (case-insensitive). `expect` records the host's answer. A looser rule than
      exact tokens, because CPU and GPU kernels may round a late token differently; a wrong or
      corrupt model does not produce the words.
    embeddings: `input` is a text; its vector's cosine to `vector` (the host's fp32 result) must
      be at least `min_cosine`.
    transcription: `input` is the payload path of a short clip; the word error rate of its
      transcript against `expect` must be at most `max_wer`.
    """

    input: str
    expect: str = ""
    contains: tuple[str, ...] = ()
    max_tokens: int = 0
    vector: tuple[float, ...] = ()
    min_cosine: float = 0.0
    max_wer: float = 0.0


@dataclass(frozen=True)
class Model:
    id: str
    task: Task
    license: str  # payload path of the license text
    description: str
    defaults: Defaults
    variants: tuple[Variant, ...]
    checks: tuple[Check, ...] = ()


@dataclass(frozen=True)
class Manifest:
    name: str
    sequence: int
    created: datetime
    models: tuple[Model, ...]
    files: tuple[FileEntry, ...]
    expires: datetime | None = None
    format: int = FORMAT_VERSION
    by_path: dict[str, FileEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_path", {f.path: f for f in self.files})

    @property
    def bundle_filename(self) -> str:
        return f"{self.name}-{self.sequence}.bundle"

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_toml(self) -> bytes:
        import tomli_w  # host side only: the device parses manifests, never writes them

        doc: dict[str, Any] = {
            "format": self.format,
            "name": self.name,
            "sequence": self.sequence,
            "created": self.created,
        }
        if self.expires is not None:
            doc["expires"] = self.expires
        doc["models"] = [_model_dict(m) for m in self.models]
        doc["files"] = [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files]
        return tomli_w.dumps(doc).encode()


def _model_dict(m: Model) -> dict[str, Any]:
    defaults = {k: v for k, v in vars(m.defaults).items() if v not in (None, ())}
    if "languages" in defaults:
        defaults["languages"] = list(defaults["languages"])
    out: dict[str, Any] = {"id": m.id, "task": m.task.value, "license": m.license}
    if m.description:
        out["description"] = m.description
    if defaults:
        out["defaults"] = defaults
    out["variants"] = [
        {
            "backend": v.backend.value,
            "format": v.format.value,
            "quantization": v.quantization,
            "path": v.path,
            "memory_mb": v.memory_mb,
            "files": list(v.files),
        }
        for v in m.variants
    ]
    if m.checks:
        out["checks"] = [_check_dict(c) for c in m.checks]
    return out


def _check_dict(c: Check) -> dict[str, Any]:
    out: dict[str, Any] = {"input": c.input}
    if c.expect:
        out["expect"] = c.expect
    if c.contains:
        out["contains"] = list(c.contains)
    if c.max_tokens:
        out["max_tokens"] = c.max_tokens
    if c.vector:
        out["vector"] = list(c.vector)
    if c.min_cosine:
        out["min_cosine"] = c.min_cosine
    if c.max_wer:
        out["max_wer"] = c.max_wer
    return out


def parse(data: bytes, origin: str = "manifest.toml") -> Manifest:
    """Parse and cross-check a manifest. Raises FormatError naming the key at fault."""
    doc = load_toml(data, origin, MAX_MANIFEST)
    fmt = doc.req_integer("format", lo=1, hi=1000)
    if fmt != FORMAT_VERSION:
        raise FormatError(
            f"{origin}: format {fmt} is not supported (this device reads {FORMAT_VERSION})",
            hint="update the appliance software first",
        )
    if (doc.string("kind", required=False, max_len=16) or "model") != "model":
        raise doc.fail("kind", "must be model: control documents are not installed as bundles")
    name = doc.req_string("name", pattern=NAME)
    sequence = doc.req_integer("sequence", lo=1)
    created = doc.timestamp("created")
    expires = doc.timestamp("expires", required=False)
    files = tuple(parse_file(f) for f in doc.tables("files", max_items=MAX_FILES))
    models = tuple(_parse_model(m) for m in doc.tables("models", max_items=64))
    doc.done()
    assert created is not None
    manifest = Manifest(name, sequence, created, models, files, expires, fmt)
    _cross_check(manifest, origin)
    return manifest


def parse_file(f: Fields) -> FileEntry:
    path = check_path(f.req_string("path", max_len=MAX_PATH))
    entry = FileEntry(path, f.req_integer("size", hi=MAX_FILE_SIZE),
                      f.req_string("sha256", pattern=SHA256))
    f.done()
    return entry


def _parse_model(m: Fields) -> Model:
    model_id = m.req_string("id", pattern=MODEL_ID)
    task = m.choice("task", Task)
    license_path = check_path(m.req_string("license", max_len=MAX_PATH))
    description = m.string("description", required=False, max_len=1024, default="") or ""
    d = m.table("defaults", required=False)
    defaults = parse_defaults(d) if d is not None else Defaults()
    variants = tuple(_parse_variant(v) for v in m.tables("variants", max_items=16))
    checks = tuple(_parse_check(c, task) for c in m.tables("checks", required=False,
                                                         max_items=MAX_CHECKS))
    m.done()
    if not variants:
        raise FormatError(f"model {model_id} has no variants")
    return Model(model_id, task, license_path, description, defaults, variants, checks)


def _parse_check(c: Fields, task: Task) -> Check:
    if task is Task.CHAT:
        check = Check(input=c.req_string("input"), expect=c.string("expect", required=False,
                                                                    default="") or "",
                      contains=tuple(c.strings("contains", max_items=16)),
                      max_tokens=c.req_integer("max_tokens", lo=1, hi=512))
        if not check.contains or not all(check.contains):
            raise c.fail("contains", "must list at least one non-empty string")
    elif task is Task.EMBEDDINGS:
        check = Check(input=c.req_string("input"),
                      vector=tuple(c.numbers("vector", max_items=1 << 13)),
                      min_cosine=c.number("min_cosine", lo=0.5, hi=1.0, default=0.98))
        if not check.vector:
            raise c.fail("vector", "must not be empty")
    else:
        check = Check(input=check_path(c.req_string("input", max_len=MAX_PATH)),
                      expect=c.req_string("expect"),
                      max_wer=c.number("max_wer", lo=0.0, hi=1.0, default=0.3))
    c.done()
    return check


def parse_defaults(d: Fields) -> Defaults:
    defaults = Defaults(
        context_length=d.integer("context_length", required=False, lo=16, hi=1 << 20),
        chat_template=d.string("chat_template", required=False, max_len=MAX_TEMPLATE),
        pooling=d.string("pooling", required=False, pattern=re.compile(r"mean|cls")),
        max_input_tokens=d.integer("max_input_tokens", required=False, lo=1, hi=1 << 20),
        dimensions=d.integer("dimensions", required=False, lo=1, hi=1 << 16),
        languages=tuple(d.strings("languages", required=False, max_items=200,
                                  pattern=re.compile(r"[a-z]{2,3}"))),
    )
    d.done()
    return defaults


def _parse_variant(v: Fields) -> Variant:
    variant = Variant(
        backend=v.choice("backend", Backend),
        format=v.choice("format", WeightFormat),
        quantization=v.req_string("quantization", pattern=QUANT),
        path=check_path(v.req_string("path", max_len=MAX_PATH)),
        memory_mb=v.req_integer("memory_mb", hi=1 << 24),
        files=tuple(check_path(p) for p in v.strings("files", max_items=MAX_FILES)),
    )
    v.done()
    return variant


def _cross_check(m: Manifest, origin: str) -> None:
    """Every referenced path is a listed file and every listed file is referenced once in a tree."""
    if len(m.by_path) != len(m.files):
        raise FormatError(f"{origin}: a file is listed twice")
    folded = {p.lower() for p in m.by_path}
    if len(folded) != len(m.by_path):
        raise FormatError(f"{origin}: two files differ only in letter case")
    folders = {p.rsplit("/", i)[0].lower() for p in m.by_path for i in range(1, p.count("/") + 1)}
    if folders & folded:
        raise FormatError(f"{origin}: a file name is also used as a folder")
    ids = [model.id for model in m.models]
    if len(set(ids)) != len(ids):
        raise FormatError(f"{origin}: a model id is listed twice")
    referenced: set[str] = set()
    for model in m.models:
        wanted = [model.license]
        if model.task is Task.TRANSCRIPTION:
            wanted += [c.input for c in model.checks]  # the clips
        for v in model.variants:
            wanted += v.files
            if v.path not in v.files and not all(f.startswith(v.path + "/") for f in v.files):
                raise FormatError(
                    f"{origin}: model {model.id} variant path {v.path!r} is neither one of its "
                    "files nor the folder holding them"
                )
        for p in wanted:
            if p not in m.by_path:
                raise FormatError(f"{origin}: model {model.id} refers to unlisted {p!r}")
        referenced.update(wanted)
    unreferenced = sorted(set(m.by_path) - referenced)
    if unreferenced:
        raise FormatError(f"{origin}: file {unreferenced[0]!r} belongs to no model")
    if m.expires is not None and m.expires <= m.created:
        raise FormatError(f"{origin}: expires is not after created")
