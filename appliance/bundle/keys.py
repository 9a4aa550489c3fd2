"""Ed25519 keys: generation on the host, the trust store on the device.

A key id is the hex sha256 of the raw 32-byte public key, so it names the key itself and not a
file. The trust store is a folder of `<keyid>.pub` PEM files plus `policy.toml` (the threshold).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.errors import FormatError, StoreError, UsageError

MAX_KEY_FILE = 16 * 1024


def key_id(public: Ed25519PublicKey) -> str:
    """Hex sha256 of the raw public key bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def generate(prefix: Path) -> str:
    """Write PREFIX.key (0600, PKCS#8 PEM) and PREFIX.pub; return the key id.

    Refuses to overwrite an existing key: losing a signing key strands every device trusting it.
    """
    key_path = prefix.with_name(prefix.name + ".key")
    pub_path = prefix.with_name(prefix.name + ".pub")
    for path in (key_path, pub_path):
        if path.exists():
            raise UsageError(f"{path} already exists", hint="choose another --out prefix")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(public_pem(private.public_key()))
    return key_id(private.public_key())


def read_small(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_KEY_FILE:
        raise FormatError(f"{path} is too large to be a key file")
    return data


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(read_small(path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise FormatError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise FormatError(f"{path} is not an Ed25519 key")
    return key


def parse_public(data: bytes, origin: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise FormatError(f"{origin} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise FormatError(f"{origin} is not an Ed25519 public key")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    return parse_public(read_small(path), str(path))
