"""API keys for LAN clients: only their sha256 is stored, one `name sha256hex` per line in
`etc/appliance/api-keys`, readable by the service's group. Every change is audited here."""

from __future__ import annotations

import contextlib
import grp
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from appliance.device.layout import Layout
from appliance.errors import FormatError, UsageError
from appliance.fsutil import atomic_write

PREFIX = "sk-appliance-"


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
    keys = read(layout.api_keys)
    if not name.isidentifier() or name in keys:
        raise UsageError(f"key name {name!r} is taken or not a simple name")
    key = PREFIX + secrets.token_urlsafe(32)
    keys[name] = hash_key(key)
    _write(layout, keys)
    layout.audit.append("apikey-create", name=name, result="ok")
    return key


def remove(layout: Layout, name: str) -> None:
    keys = read(layout.api_keys)
    if keys.pop(name, None) is None:
        raise UsageError(f"no API key named {name!r}")
    _write(layout, keys)
    layout.audit.append("apikey-remove", name=name, result="ok")


def _write(layout: Layout, keys: dict[str, str]) -> None:
    path = layout.api_keys
    path.parent.mkdir(parents=True, exist_ok=True)
    # readable by the service's group only: the service runs as `appliance`, not root
    atomic_write(path, "".join(f"{n} {h}\n" for n, h in keys.items()).encode(), mode=0o640)
    # no such group on a development machine: root-only is fine there
    with contextlib.suppress(KeyError, PermissionError):
        os.chown(path, -1, grp.getgrnam("appliance").gr_gid)
