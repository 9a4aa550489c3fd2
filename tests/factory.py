"""A bundle factory for the attack tests: small synthetic payloads, real Ed25519 keys.

It can produce honest bundles and every kind of dishonest one: each knob changes one thing
(the member list, the manifest bytes after signing, the signature file, a raw tar header) so a
test shows exactly which rule catches which attack.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.bundle import signing
from appliance.bundle.tarformat import TarWriter

MODEL = "models/tiny"


def default_files(tag: bytes = b"a") -> dict[str, bytes]:
    return {
        f"{MODEL}/LICENSE.txt": b"license text " + tag,
        f"{MODEL}/weights.gguf": b"GGUF" + tag * 3000,
    }


def manifest_doc(files: dict[str, bytes], name: str = "demo", sequence: int = 1,
                 expires: datetime | None = None) -> dict[str, Any]:
    created = datetime(2026, 1, 1, tzinfo=UTC)
    doc: dict[str, Any] = {"format": 1, "name": name, "sequence": sequence, "created": created}
    if expires is not None:
        doc["expires"] = expires
    weights = sorted(p for p in files if not p.endswith("LICENSE.txt"))
    doc["models"] = [{
        "id": "tiny", "task": "chat", "license": f"{MODEL}/LICENSE.txt",
        "variants": [{"backend": "cpu", "format": "gguf", "quantization": "Q4_0",
                      "path": weights[0] if weights else f"{MODEL}/weights.gguf",
                      "memory_mb": 1, "files": weights}],
    }]
    doc["files"] = [{"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                    for p, d in sorted(files.items())]
    return doc


@dataclass
class Spec:
    """Everything that goes into one bundle file; tests edit it before `write`."""

    files: dict[str, bytes] = field(default_factory=default_files)
    name: str = "demo"
    sequence: int = 1
    expires: datetime | None = None
    keys: list[Ed25519PrivateKey] = field(default_factory=list)
    edit_doc: Callable[[dict[str, Any]], None] | None = None
    manifest_bytes: bytes | None = None  # replaces the serialised manifest before signing
    after_sign: Callable[[bytes], bytes] | None = None  # tampers with the signed manifest
    sig_bytes: bytes | None = None  # replaces manifest.sig
    members: list[tuple[str, bytes]] | None = None  # replaces the payload members
    raw_tail: bytes = b""  # raw blocks inserted after the payload, before the end marker


class Factory:
    def __init__(self, folder: Path, key: Ed25519PrivateKey) -> None:
        self.folder = folder
        self.key = key
        self.count = 0

    def spec(self, **kw: Any) -> Spec:
        spec = Spec(**kw)
        if not spec.keys:
            spec.keys = [self.key]
        return spec

    def manifest_bytes(self, spec: Spec) -> bytes:
        if spec.manifest_bytes is not None:
            return spec.manifest_bytes
        doc = manifest_doc(spec.files, spec.name, spec.sequence, spec.expires)
        if spec.edit_doc:
            spec.edit_doc(doc)
        return tomli_w.dumps(doc).encode()

    def write(self, spec: Spec, tar_edit: Callable[[bytes], bytes] | None = None) -> Path:
        data = self.manifest_bytes(spec)
        sig = signing.sign(data, spec.keys) if spec.sig_bytes is None else spec.sig_bytes
        if spec.after_sign:
            data = spec.after_sign(data)
        buf = io.BytesIO()
        tar = TarWriter(buf, 1_700_000_000)
        tar.add_bytes("manifest.toml", data)
        tar.add_bytes("manifest.sig", sig)
        members = spec.members if spec.members is not None else sorted(spec.files.items())
        for path, content in members:
            tar.add_bytes(path, content)
        buf.write(spec.raw_tail)
        tar.close()
        raw = buf.getvalue()
        if tar_edit:
            raw = tar_edit(raw)
        self.count += 1
        path = self.folder / f"{spec.name}-{spec.sequence}-{self.count}.bundle"
        path.write_bytes(raw)
        return path

    def bundle(self, **kw: Any) -> Path:
        return self.write(self.spec(**kw))


def snapshot(root: Path) -> dict[str, str]:
    """Everything under the state root except the audit log and lock: what a rejection may not
    change. Files by content hash, links by target, folders by name."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.name in ("audit.log", "audit.log.head", "lock"):
            continue
        if path.is_symlink():
            out[rel] = "link:" + str(path.readlink())
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
