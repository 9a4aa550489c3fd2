"""Signatures over the exact bytes of manifest.toml.

manifest.sig is a small TOML file: one `[[signatures]]` table per signer with `keyid` and a base64
Ed25519 `sig`. It is parsed (size-capped, strictly) but the manifest itself is not parsed until
enough trusted keys have signed it.
"""

from __future__ import annotations

import base64
import binascii
import re

import tomli_w
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.bundle.keys import key_id
from appliance.errors import SignatureError
from appliance.strict import parse_toml

MAX_SIG_FILE = 64 * 1024
MAX_SIGNATURES = 32
_KEYID = re.compile(r"[0-9a-f]{64}")


def sign(manifest_bytes: bytes, keys: list[Ed25519PrivateKey]) -> bytes:
    """Return manifest.sig content with one signature per key."""
    entries = [
        {
            "keyid": key_id(k.public_key()),
            "sig": base64.b64encode(k.sign(manifest_bytes)).decode(),
        }
        for k in keys
    ]
    return tomli_w.dumps({"signatures": entries}).encode()


def parse_signatures(sig_bytes: bytes) -> list[tuple[str, bytes]]:
    """Parse manifest.sig into (keyid, signature) pairs.

    Raises SignatureError for anything that is not exactly the documented shape.
    """
    if len(sig_bytes) > MAX_SIG_FILE:
        raise SignatureError(f"manifest.sig is larger than {MAX_SIG_FILE} bytes")
    try:
        text = sig_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SignatureError("manifest.sig is not UTF-8") from exc
    doc = parse_toml(text, "manifest.sig", SignatureError, max_depth=3)
    entries = doc.get("signatures")
    if set(doc) != {"signatures"} or not isinstance(entries, list) or not entries:
        raise SignatureError("manifest.sig holds no [[signatures]]")
    if len(entries) > MAX_SIGNATURES:
        raise SignatureError(f"manifest.sig holds more than {MAX_SIGNATURES} signatures")
    result: list[tuple[str, bytes]] = []
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) != {"keyid", "sig"}:
            raise SignatureError("each signature needs exactly `keyid` and `sig`")
        kid, sig = entry["keyid"], entry["sig"]
        if not isinstance(kid, str) or not _KEYID.fullmatch(kid) or not isinstance(sig, str):
            raise SignatureError("a signature's keyid is not 64 lowercase hex digits")
        try:
            raw = base64.b64decode(sig, validate=True)
        except binascii.Error as exc:
            raise SignatureError("a signature is not valid base64") from exc
        if len(raw) != 64:
            raise SignatureError("an Ed25519 signature is 64 bytes")
        result.append((kid, raw))
    return result


def verify(
    manifest_bytes: bytes,
    sig_bytes: bytes,
    trusted: dict[str, Ed25519PublicKey],
    threshold: int,
) -> list[str]:
    """Check that at least `threshold` distinct trusted keys signed `manifest_bytes`.

    Returns the ids of the keys whose signatures verified. Signatures by unknown keys are
    ignored; several signatures by one key count once; one bad signature by a trusted key fails
    the whole file (it means tampering, not an unknown signer).
    Raises SignatureError.
    """
    if not trusted:
        raise SignatureError(
            "this device trusts no signing key",
            hint="add the publisher's key with `appliance-ctl keys add KEY.pub`",
        )
    good: set[str] = set()
    for kid, raw in parse_signatures(sig_bytes):
        public = trusted.get(kid)
        if public is None:
            continue
        try:
            public.verify(raw, manifest_bytes)
        except InvalidSignature as exc:
            raise SignatureError(
                f"the signature by trusted key {kid[:16]} does not match the manifest",
                hint="the bundle was altered after signing; rebuild or re-copy it",
            ) from exc
        good.add(kid)
    if len(good) < threshold:
        raise SignatureError(
            f"{len(good)} trusted signature(s), {threshold} required",
            hint="sign the bundle with keys this device trusts (`appliance-ctl keys list`)",
        )
    return sorted(good)
