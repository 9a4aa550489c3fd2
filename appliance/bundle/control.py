"""Control documents: signed orders for a sealed device, in the bundle format (manifest.toml +
manifest.sig and no payload), told apart by `kind = "control"` in the signed manifest.

    format = 1
    kind = "control"
    name = "fleet"                 # a stream: its sequence must rise (no replay)
    sequence = 3
    created = 2026-11-30T12:00:00Z
    expires = 2026-12-30T12:00:00Z # optional
    target = "all"                 # or one device id (64 hex digits)

    [[actions]]
    action = "apikey-add"          # name, sha256, models?, concurrent?, per_minute?
    [[actions]]
    action = "apikey-revoke"       # name
    [[actions]]
    action = "trust-rotate"        # keys (PEM), threshold, version = current + 1,
                                   # reset? = { bundle = highest sequence to keep }
    [[actions]]
    action = "key-revoke"          # keyid
    [[actions]]
    action = "settings"            # settings = { server = { ... }, ... } merged into the file
    [[actions]]
    action = "activate"            # bundle, sequence, force?
    [[actions]]
    action = "rollback"            # bundle

The parser is as strict as the model manifest's; what an action means for the device is in
`appliance/device/control.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from appliance.bundle import keys
from appliance.bundle.manifest import FORMAT_VERSION, MAX_MANIFEST, NAME, SHA256
from appliance.errors import FormatError
from appliance.strict import Fields, load_toml

KIND = "control"
SUFFIX = ".control"
ALL = "all"
MAX_ACTIONS = 64
DEVICE_ID = re.compile(r"[0-9a-f]{64}")
KEY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
ACTIONS = ("apikey-add", "apikey-revoke", "trust-rotate", "key-revoke", "settings", "activate",
           "rollback")


@dataclass(frozen=True)
class Action:
    action: str
    name: str = ""                  # API key name
    sha256: str = ""
    models: tuple[str, ...] = ()
    concurrent: int = 0
    per_minute: int = 0
    keys: tuple[str, ...] = ()      # trust-rotate: PEM public keys
    threshold: int = 0
    version: int = 0
    reset: tuple[tuple[str, int], ...] = ()
    keyid: str = ""
    settings: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    bundle: str = ""
    sequence: int = 0
    force: bool = False


@dataclass(frozen=True)
class Control:
    name: str
    sequence: int
    created: datetime
    target: str
    actions: tuple[Action, ...]
    expires: datetime | None = None

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.sequence}{SUFFIX}"

    def rotation(self) -> Action | None:
        return next((a for a in self.actions if a.action == "trust-rotate"), None)

    def to_toml(self) -> bytes:
        import tomli_w  # host side only

        doc: dict[str, Any] = {"format": FORMAT_VERSION, "kind": KIND, "name": self.name,
                               "sequence": self.sequence, "created": self.created,
                               "target": self.target}
        if self.expires is not None:
            doc["expires"] = self.expires
        doc["actions"] = [_action_dict(a) for a in self.actions]
        return tomli_w.dumps(doc).encode()


def _action_dict(a: Action) -> dict[str, Any]:
    out: dict[str, Any] = {"action": a.action}
    for key in ("name", "sha256", "keyid", "bundle"):
        if getattr(a, key):
            out[key] = getattr(a, key)
    for key in ("concurrent", "per_minute", "threshold", "version", "sequence"):
        if getattr(a, key):
            out[key] = getattr(a, key)
    if a.models:
        out["models"] = list(a.models)
    if a.keys:
        out["keys"] = list(a.keys)
    if a.reset:
        out["reset"] = dict(a.reset)
    if a.settings:
        out["settings"] = a.settings
    if a.force:
        out["force"] = True
    return out


def kind(data: bytes, origin: str = "manifest.toml") -> str:
    """The `kind` of an authenticated manifest: "model" when absent."""
    doc = load_toml(data, origin, MAX_MANIFEST)
    value = doc.string("kind", required=False, default="model") or "model"
    if value not in ("model", KIND):
        raise doc.fail("kind", "must be model or control")
    return value


def parse(data: bytes, origin: str = "manifest.toml") -> Control:
    doc = load_toml(data, origin, MAX_MANIFEST)
    fmt = doc.req_integer("format", lo=1, hi=1000)
    if fmt != FORMAT_VERSION:
        raise FormatError(f"{origin}: format {fmt} is not supported (this device reads "
                          f"{FORMAT_VERSION})", hint="update the appliance software first")
    if doc.req_string("kind") != KIND:
        raise doc.fail("kind", "must be control")
    name = doc.req_string("name", pattern=NAME)
    sequence = doc.req_integer("sequence", lo=1)
    created = doc.timestamp("created")
    expires = doc.timestamp("expires", required=False)
    target = doc.req_string("target", max_len=64)
    if target != ALL and not DEVICE_ID.fullmatch(target):
        raise doc.fail("target", "must be all or a device id (64 lowercase hex digits)")
    actions = tuple(_action(a) for a in doc.tables("actions", max_items=MAX_ACTIONS))
    doc.done()
    assert created is not None
    if not actions:
        raise FormatError(f"{origin}: a control document needs at least one action")
    if sum(a.action == "trust-rotate" for a in actions) > 1:
        raise FormatError(f"{origin}: at most one trust-rotate per document")
    if expires is not None and expires <= created:
        raise FormatError(f"{origin}: expires is not after created")
    return Control(name, sequence, created, target, actions, expires)


def _unique(t: Fields, key: str, items: list[str]) -> tuple[str, ...]:
    if len(set(items)) != len(items):
        raise t.fail(key, "lists an entry twice")
    return tuple(items)


def _action(t: Fields) -> Action:
    what = t.req_string("action", max_len=32)
    if what not in ACTIONS:
        raise t.fail("action", f"must be one of {', '.join(ACTIONS)}")
    if what == "apikey-add":
        a = Action(what, name=t.req_string("name", pattern=KEY_NAME),
                   sha256=t.req_string("sha256", pattern=SHA256),
                   models=_unique(t, "models", t.strings("models", required=False,
                                                         max_items=64, pattern=MODEL_ID)),
                   concurrent=t.integer("concurrent", required=False, lo=0, hi=100_000,
                                        default=0) or 0,
                   per_minute=t.integer("per_minute", required=False, lo=0, hi=100_000,
                                        default=0) or 0)
    elif what == "apikey-revoke":
        a = Action(what, name=t.req_string("name", pattern=KEY_NAME))
    elif what == "trust-rotate":
        pems = t.strings("keys", max_items=32)
        for i, pem in enumerate(pems):
            keys.parse_public(pem.encode(), f"{t.where('keys')}[{i}]")
        threshold = t.req_integer("threshold", lo=1, hi=32)
        if threshold > len(set(pems)):
            raise t.fail("threshold", f"is {threshold} but only {len(set(pems))} keys are given")
        reset = t.table("reset", required=False)
        marks: tuple[tuple[str, int], ...] = ()
        if reset is not None:
            for bundle in list(reset.keys()):
                if not NAME.fullmatch(bundle):
                    raise reset.fail(bundle, "is not a bundle name")
            marks = tuple((b, reset.req_integer(b, lo=0)) for b in list(reset.keys()))
            reset.done()
        a = Action(what, keys=tuple(pems), threshold=threshold,
                   version=t.req_integer("version", lo=2), reset=marks)
    elif what == "key-revoke":
        a = Action(what, keyid=t.req_string("keyid", pattern=SHA256))
    elif what == "settings":
        table = t.table("settings")
        assert table is not None
        a = Action(what, settings=table.raw())
    elif what == "activate":
        a = Action(what, bundle=t.req_string("bundle", pattern=NAME),
                   sequence=t.req_integer("sequence", lo=1), force=t.boolean("force", False))
    else:
        a = Action(what, bundle=t.req_string("bundle", pattern=NAME))
    t.done()
    return a
