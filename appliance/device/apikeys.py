"""API keys for LAN clients: only their sha256 is stored, one key per line in the live
configuration's `api-keys`, readable by the service's group:

    name sha256hex [models=a,b] [concurrent=N] [per_minute=N]

`models` limits the key to those model ids (absent: all), `concurrent` to N requests in flight
at once and `per_minute` to N requests per rolling minute (absent: no limit). The running
service re-reads the file when it changes (api/keyring.py). Every change is audited here."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from appliance.bundle.manifest import MODEL_ID, SHA256
from appliance.device import config
from appliance.device.layout import Layout
from appliance.device.store import Store
from appliance.errors import FormatError, UsageError

PREFIX = "sk-appliance-"
FILE = "api-keys"
MAX_LIMIT = 100_000
_NUMBER = re.compile(r"[0-9]{1,6}")
_SYNTAX = "`name sha256hex [models=a,b] [concurrent=N] [per_minute=N]`"


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    models: tuple[str, ...] = ()  # () = every model
    concurrent: int = 0  # 0 = no limit
    per_minute: int = 0  # 0 = no limit

    def line(self) -> str:
        parts = [self.name, self.sha256]
        if self.models:
            parts.append("models=" + ",".join(self.models))
        if self.concurrent:
            parts.append(f"concurrent={self.concurrent}")
        if self.per_minute:
            parts.append(f"per_minute={self.per_minute}")
        return " ".join(parts)

    def limits(self) -> str:
        """For people: what this key may do."""
        return " ".join(self.line().split()[2:]) or "all models, no limits"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def match(presented: str, keys: Iterable[ApiKey]) -> ApiKey | None:
    """The stored key the presented one hashes to. Every stored hash is compared, in constant
    time, so the time taken says nothing about which one matched."""
    digest = hash_key(presented).encode()
    found: ApiKey | None = None
    for key in keys:
        hit = hmac.compare_digest(digest, key.sha256.encode())
        found = key if hit and found is None else found
    return found


def read(path: Path) -> dict[str, ApiKey]:
    """name -> key; a line that breaks the format is refused (FormatError naming file:line)."""
    if not path.exists():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{path} is not UTF-8") from None
    keys: dict[str, ApiKey] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = _parse(line)
            if key.name in keys:
                raise ValueError(f"the name {key.name!r} is used twice")
        except ValueError as exc:
            raise FormatError(f"{path}:{n}: {exc}") from None
        keys[key.name] = key
    return keys


def _parse(line: str) -> ApiKey:
    parts = line.split()
    if len(parts) < 2:
        raise ValueError(f"expected {_SYNTAX}")
    options: dict[str, str] = {}
    for part in parts[2:]:
        option, eq, value = part.partition("=")
        if not eq or option not in ("models", "concurrent", "per_minute"):
            raise ValueError(f"unknown option {part!r}; expected {_SYNTAX}")
        if option in options:
            raise ValueError(f"{option} is given twice")
        options[option] = value
    numbers: dict[str, int] = {}
    for option in ("concurrent", "per_minute"):
        if option in options:
            # 0 (no limit) is written by leaving the option out
            value = options[option]
            if not _NUMBER.fullmatch(value) or not 1 <= int(value) <= MAX_LIMIT:
                raise ValueError(f"{option} must be a whole number from 1 to {MAX_LIMIT}")
            numbers[option] = int(value)
    models = tuple(options["models"].split(",")) if "models" in options else ()
    key = ApiKey(parts[0], parts[1], models, **numbers)
    _check(key)
    return key


def _check(key: ApiKey) -> None:
    """ValueError if the key could not be written and read back as it is."""
    if not key.name.isidentifier():
        raise ValueError(f"the key name {key.name!r} is not a simple name (letters, digits, _)")
    if not SHA256.fullmatch(key.sha256):
        raise ValueError("the key hash must be 64 lowercase hex digits")
    for model in key.models:
        if not MODEL_ID.fullmatch(model):
            raise ValueError(f"models: {model!r} is not a model id")
    if len(set(key.models)) != len(key.models):
        raise ValueError("models: a model is listed twice")
    for option, value in (("concurrent", key.concurrent), ("per_minute", key.per_minute)):
        if not 0 <= value <= MAX_LIMIT:
            raise ValueError(f"{option} must be from 0 (no limit) to {MAX_LIMIT}")


def create(layout: Layout, name: str, models: Iterable[str] = (), concurrent: int = 0,
           per_minute: int = 0) -> str:
    """Make a key named `name` with its scope and limits, store its hash, and return the key
    (shown once)."""
    key = PREFIX + secrets.token_urlsafe(32)
    entry = ApiKey(name, hash_key(key), tuple(models), concurrent, per_minute)
    try:
        _check(entry)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    with Store(layout).locked(), config.change(layout) as new:
        keys = read(new / FILE)
        if name in keys:
            raise UsageError(f"an API key named {name!r} exists",
                             hint=f"remove it first: appliance-ctl apikey remove {name}")
        keys[name] = entry
        write(new / FILE, keys)
    layout.audit.append("apikey-create", name=name, limits=entry.limits(), result="ok")
    return key


def remove(layout: Layout, name: str) -> None:
    with Store(layout).locked(), config.change(layout) as new:
        keys = read(new / FILE)
        if keys.pop(name, None) is None:
            raise UsageError(f"no API key named {name!r}")
        write(new / FILE, keys)
    layout.audit.append("apikey-remove", name=name, result="ok")


def write(path: Path, keys: dict[str, ApiKey]) -> None:
    """The file's whole content; its mode and group are set when the config goes live (the
    service reads it as group `appliance`)."""
    path.write_text("".join(k.line() + "\n" for k in keys.values()))
