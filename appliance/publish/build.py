"""Building a signed bundle from a recipe (host side).

build() is the whole pipeline, in order: read the recipe, fetch each model's sources, convert
where asked, lay out the payload, hash it, write and sign the manifest, write the tar.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.bundle import manifest as mf
from appliance.bundle import signing
from appliance.errors import FormatError
from appliance.publish import convert, goldens
from appliance.publish import recipe as rc
from appliance.publish.archive import write_signed
from appliance.publish.fetch import Resolver, sha256_file

Log = Callable[[str], None]
# Rough resident memory per byte of weights, plus a fixed overhead, when the recipe gives none.
_MEMORY_FACTOR = {mf.WeightFormat.GGUF: 1.25, mf.WeightFormat.ONNX: 2.0, mf.WeightFormat.CT2: 1.5}
_ONNX_FILES = {"fp32": "model.onnx", "int8": "model-int8.onnx"}


@dataclass(frozen=True)
class Payload:
    """One file going into the bundle: where it is now and where it goes."""

    path: str
    source: Path


class PayloadSet:
    def __init__(self) -> None:
        self.items: dict[str, Payload] = {}

    def add(self, path: str, source: Path) -> str:
        mf.check_path(path)
        known = self.items.get(path)
        if known is not None and known.source != source:
            raise FormatError(f"two different files would be stored as {path!r}")
        self.items[path] = Payload(path, source)
        return path

    def host_path(self, path: str) -> Path:
        """Where a payload file, or a folder of them, is on this host."""
        if path in self.items:
            return self.items[path].source
        for name, item in self.items.items():
            if name.startswith(path + "/"):
                depth = name[len(path) + 1:].count("/") + 1
                return item.source.parents[depth - 1]
        raise FormatError(f"{path!r} is not in the bundle")

    def add_tree(self, prefix: str, folder: Path) -> list[str]:
        paths = []
        for file in sorted(folder.rglob("*")):
            if file.is_symlink():
                raise FormatError(f"{file} is a symbolic link; bundles carry regular files only")
            if file.is_file():
                paths.append(self.add(f"{prefix}/{file.relative_to(folder).as_posix()}", file))
        if not paths:
            raise FormatError(f"{folder} holds no files")
        return paths


def _license(model: rc.ModelSpec, resolver: Resolver, payload: PayloadSet) -> str:
    source = resolver.resolve(model.license)
    if not source.is_file():
        raise FormatError(f"license {model.license!r} of {model.id} is not a file")
    suffix = source.suffix if source.suffix in (".txt", ".md", ".html") else ".txt"
    return payload.add(f"{model.folder}/LICENSE{suffix}", source)


def _memory_mb(spec: rc.VariantSpec, files: list[str], payload: PayloadSet) -> int:
    if spec.memory_mb is not None:
        return spec.memory_mb
    size = sum(payload.items[f].source.stat().st_size for f in files)
    return int(size * _MEMORY_FACTOR[spec.format]) // (1 << 20) + 64


def _weights(model: rc.ModelSpec, resolver: Resolver) -> Path:
    """The model's file or folder on this host, chunks joined (into the folder, if any)."""
    w = model.weights
    if not w.join:
        assert w.ref is not None
        return resolver.resolve(w.ref)
    assert w.join_name and w.join_sha256
    joined = resolver.join(w.join, w.join_name, w.join_sha256)
    if w.ref is None:
        return joined
    return resolver.assemble(resolver.resolve(w.ref), joined, w.join)


def _variants(model: rc.ModelSpec, resolver: Resolver, payload: PayloadSet,
              cache: Path, log: Log) -> tuple[mf.Variant, ...]:
    weights = _weights(model, resolver)
    out = []
    for spec in model.variants:
        if model.convert is rc.Convert.ONNX_EMBEDDINGS:
            if spec.format is not mf.WeightFormat.ONNX or spec.quantization not in _ONNX_FILES:
                raise FormatError(f"model {model.id}: onnx-embeddings makes onnx variants with "
                                  f"quantization {' or '.join(_ONNX_FILES)}")
            converted = convert.onnx_embeddings(weights, cache, log)
            name = _ONNX_FILES[spec.quantization]
            main = payload.add(f"{model.folder}/{name}", converted / name)
            files = [main, payload.add(f"{model.folder}/tokenizer.json",
                                       converted / "tokenizer.json")]
        elif weights.is_dir():
            files = payload.add_tree(f"{model.folder}/{spec.format.value}", weights)
            main = f"{model.folder}/{spec.format.value}"
        else:
            main = payload.add(f"{model.folder}/{weights.name}", weights)
            files = [main]
        out.append(mf.Variant(spec.backend, spec.format, spec.quantization, main,
                              _memory_mb(spec, files, payload), tuple(files)))
    return tuple(out)


def _created() -> datetime:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        return datetime.fromtimestamp(int(epoch), UTC)
    return datetime.now(UTC).replace(microsecond=0)


def build(recipe_path: Path, keys: list[Ed25519PrivateKey], out_dir: Path, cache: Path,
          log: Log, sequence: int | None = None) -> Path:
    """Build, sign and write `<name>-<sequence>.bundle` into out_dir; return its path."""
    recipe = rc.load(recipe_path)
    resolver = Resolver(recipe, cache, log)
    payload = PayloadSet()
    models = []
    for spec in recipe.models:
        log(f"model {spec.id} ({spec.task.value})")
        license_path = _license(spec, resolver, payload)
        variants = _variants(spec, resolver, payload, cache, log)
        checks = goldens.compute(spec, variants, payload.host_path, payload.add,
                                 cache / "selftest", log)
        models.append(mf.Model(spec.id, spec.task, license_path, spec.description,
                               spec.defaults, variants, checks))
    log(f"hash {len(payload.items)} payload files")
    files = tuple(
        mf.FileEntry(p.path, p.source.stat().st_size, sha256_file(p.source))
        for p in sorted(payload.items.values(), key=lambda p: p.path)
    )
    created = _created()
    expires = created + timedelta(days=recipe.expires_days) if recipe.expires_days else None
    manifest = mf.Manifest(recipe.name, sequence or recipe.sequence, created, tuple(models),
                           files, expires)
    manifest_bytes = manifest.to_toml()
    mf.parse(manifest_bytes)  # what we sign must be what a device accepts
    sig = signing.sign(manifest_bytes, keys)
    return _write(manifest, manifest_bytes, sig, payload, out_dir, log)


def _write(manifest: mf.Manifest, manifest_bytes: bytes, sig: bytes, payload: PayloadSet,
           out_dir: Path, log: Log) -> Path:
    files = [(e.path, e.size, payload.items[e.path].source) for e in manifest.files]
    return write_signed(out_dir / manifest.bundle_filename, manifest.created, manifest_bytes, sig,
                        files, log)
