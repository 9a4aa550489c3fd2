"""API keys for LAN clients: only their sha256 is stored, one `name sha256hex` per line in
the live configuration's `api-keys`, readable by the service's group. Every change is audited
here."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from appliance.device import config
from appliance.device.layout import Layout
from appliance.device.store import Store
from appliance.errors import FormatError, UsageError

PREFIX = "sk-appliance-"
FILE = "api-keys"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_matches(presented: str, hashes: tuple[str, ...]) -> bool:
    """Constant time in the key and in which stored hash matches (every hash is compared)."""
    digest = hash_key(presented).encode()
    found = False
    for stored in hashes:
        found |= hmac.compare_digest(digest, stored.encode())
    return found


def read(path: Path) -> dict[str, str]:
    """name -> sha256 hex of the key."""
    if not path.exists():
        return {}
    keys: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) != 64:
            raise FormatError(f"{path}:{n}: expected `name sha256hex`")
        keys[parts[0]] = parts[1].lower()
    return keys


def create(layout: Layout, name: str) -> str:
    """Make a key named `name`, store its hash, and return the key (shown once)."""
    key = PREFIX + secrets.token_urlsafe(32)
    with Store(layout).locked(), config.change(layout) as new:
        keys = read(new / FILE)
        if not name.isidentifier() or name in keys:
            raise UsageError(f"key name {name!r} is taken or not a simple name")
        keys[name] = hash_key(key)
        write(new / FILE, keys)
    layout.audit.append("apikey-create", name=name, result="ok")
    return key


def remove(layout: Layout, name: str) -> None:
    with Store(layout).locked(), config.change(layout) as new:
        keys = read(new / FILE)
        if keys.pop(name, None) is None:
            raise UsageError(f"no API key named {name!r}")
        write(new / FILE, keys)
    layout.audit.append("apikey-remove", name=name, result="ok")


def write(path: Path, keys: dict[str, str]) -> None:
    """The file's whole content; its mode and group are set when the config goes live (the
    service reads it as group `appliance`)."""
    path.write_text("".join(f"{n} {h}\n" for n, h in keys.items()))
