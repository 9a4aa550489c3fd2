"""Receipts: what a device did with a stick, signed by the device's identity key and written
back onto the stick. The device writes them, the host verifies them (`appliance-build
receipts`); this is the format they share.

A receipt file is JSON: `{"receipt": {...}, "signature": "<base64 Ed25519>"}`. The signature
covers the canonical JSON of `receipt` (sorted keys, no spaces, ASCII). The receipt carries the
device's raw public key; the device id is its sha256, so a receipt names its signer and nobody
else can write one under that id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.errors import FormatError, SignatureError

FORMAT = 1
FOLDER = "appliance-receipts"
MAX_RECEIPT = 1024 * 1024


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(body: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    signature = base64.b64encode(key.sign(canonical(body))).decode()
    return json.dumps({"receipt": body, "signature": signature}, indent=1,
                      sort_keys=True).encode() + b"\n"


@dataclass(frozen=True)
class Receipt:
    device: str
    body: dict[str, Any]


def verify(data: bytes, origin: str) -> Receipt:
    """Check a receipt's signature against the key it carries and its id against that key."""
    if len(data) > MAX_RECEIPT:
        raise FormatError(f"{origin} is larger than {MAX_RECEIPT} bytes")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{origin} is not JSON") from exc
    if not isinstance(doc, dict) or set(doc) != {"receipt", "signature"}:
        raise FormatError(f"{origin}: expected exactly `receipt` and `signature`")
    body, sig = doc["receipt"], doc["signature"]
    if not isinstance(body, dict) or not isinstance(sig, str):
        raise FormatError(f"{origin}: `receipt` must be an object, `signature` a string")
    if body.get("format") != FORMAT:
        raise FormatError(f"{origin}: receipt format {body.get('format')!r} is not {FORMAT}")
    try:
        raw_key = base64.b64decode(str(body.get("public_key", "")), validate=True)
        raw_sig = base64.b64decode(sig, validate=True)
        public = Ed25519PublicKey.from_public_bytes(raw_key)
    except (binascii.Error, ValueError) as exc:
        raise FormatError(f"{origin}: the public key or the signature is not valid") from exc
    device = hashlib.sha256(raw_key).hexdigest()
    if body.get("device") != device:
        raise SignatureError(f"{origin}: the device id is not the hash of the key it carries")
    try:
        public.verify(raw_sig, canonical(body))
    except InvalidSignature as exc:
        raise SignatureError(f"{origin}: the signature does not match the receipt "
                             "(altered after the device wrote it)") from exc
    _shape(body, origin)  # signed by its own key is not well-formed: anyone can sign
    return Receipt(device, body)


def _shape(body: dict[str, Any], origin: str) -> None:
    """The fields a reader relies on, with their types."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise FormatError(f"{origin}: {what}")

    need(isinstance(body.get("written"), str), "`written` must be a string")
    audit = body.get("audit")
    need(isinstance(audit, dict) and type(audit.get("entries")) is int
         and isinstance(audit.get("head"), str), "`audit` must hold `entries` and `head`")
    results = body.get("results")
    need(isinstance(results, list) and all(
        isinstance(r, dict) and all(isinstance(r.get(k, ""), str)
                                    for k in ("file", "kind", "result", "detail"))
        for r in results), "`results` must be a list of results")
    status = body.get("status")
    need(isinstance(status, dict) and isinstance(status.get("bundles"), list) and all(
        isinstance(b, dict) and isinstance(b.get("name"), str) for b in status["bundles"]),
        "`status.bundles` must be a list of bundles")
