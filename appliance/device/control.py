"""Applying a signed control document (`appliance/bundle/control.py`) on the device.

The order mirrors a bundle import: signatures over the raw bytes against the trust store, then
the strict parse, the expiry, the target device, the stream's sequence (no replay) and, for a
trust rotation, TUF's rules: the next version exactly, signed by a threshold of the current keys
and a threshold of the new ones. Every action is then checked against the device as it is,
and only then are they all made in one new configuration folder that goes live with a single
rename (`appliance/device/config.py`). Bundle switches (activate, rollback, a high-water reset)
touch the store, which lives apart: they are written to `control-pending.toml` before that
rename and redone after a crash (`resume`), so a document is either not applied at all or,
once its configuration is live, applied completely.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w

from appliance.bundle import control as ctl
from appliance.bundle import keys, signing
from appliance.device import apikeys, config, install, trial
from appliance.device.layout import Layout
from appliance.device.store import Store
from appliance.device.trust import TrustStore
from appliance.errors import ApplianceError, RollbackError, StoreError, UsageError
from appliance.faults import checkpoint
from appliance.fsutil import atomic_write
from appliance.strict import parse_toml

# the settings file's bytes, checked as the service will read them; raises when wrong
SettingsCheck = Callable[[bytes], None]
PENDING = "control-pending.toml"
TOKEN = "control-token"  # names the document whose configuration is live


@dataclass(frozen=True)
class Applied:
    control: ctl.Control
    done: tuple[str, ...]          # one line per action
    settings_changed: bool


def mark(layout: Layout, name: str) -> int:
    """The highest sequence of a control stream applied on this device."""
    path = layout.config_dir / "control" / name
    return int(path.read_text().strip() or 0) if path.exists() else 0


def read(path: Path, layout: Layout) -> tuple[ctl.Control, bytes, bytes, list[str]]:
    """Authenticate and parse a control document file (nothing is changed)."""
    with install.open_file(path) as src:
        reader = install.BundleReader(src, layout)
        manifest_bytes, sig_bytes, signers = reader.signed()
        parsed = ctl.parse(manifest_bytes)  # a model bundle is refused here, by its kind
        reader.end()
    return parsed, manifest_bytes, sig_bytes, signers


def apply_file(path: Path, layout: Layout, device_id: str, check_settings: SettingsCheck,
               now: datetime | None = None) -> Applied:
    """Verify and apply one control document; audited whether applied or refused."""
    store = Store(layout)
    with store.locked():
        try:
            resume(layout)
            return _apply_locked(path, layout, device_id, check_settings,
                                 now or datetime.now(UTC))
        except ApplianceError as exc:
            layout.audit.append("control", file=path.name, result="rejected",
                                error=type(exc).__name__, detail=exc.message)
            raise


def _apply_locked(path: Path, layout: Layout, device_id: str, check_settings: SettingsCheck,
                  now: datetime) -> Applied:
    c, manifest_bytes, sig_bytes, _ = read(path, layout)
    if c.expires is not None and c.expires <= now:
        raise RollbackError(f"control {c.name} {c.sequence} expired {c.expires:%Y-%m-%d}")
    if c.target not in (ctl.ALL, device_id):
        raise UsageError(f"control {c.name} {c.sequence} is for device {c.target[:16]}, "
                         f"not this one ({device_id[:16]})")
    applied_mark = mark(layout, c.name)
    if c.sequence <= applied_mark:
        raise RollbackError(f"control {c.name} {c.sequence} is not newer than {applied_mark} "
                            "(already applied, or a replay)")
    rotation = c.rotation()
    if rotation is not None:
        _check_rotation(layout, rotation, manifest_bytes, sig_bytes)
    store = Store(layout)
    resets = list(rotation.reset) if rotation is not None else []
    for bundle, keep in resets:
        _check_reset(store, bundle, keep)
    switches = [_check_switch(store, a) for a in c.actions
                if a.action in ("activate", "rollback")]
    if {s[1] for s in switches} & {r[0] for r in resets}:
        raise UsageError("a document that resets a bundle's high-water mark may not also "
                         "switch that bundle (send the switch in a later document)")
    done: list[str] = []
    settings_changed = False
    token = secrets.token_hex(16)
    with config.change(layout) as new:
        trust = TrustStore(new / "trust")
        key_file = new / apikeys.FILE
        api = apikeys.read(key_file)
        for a in c.actions:
            if a.action == "apikey-add":
                api[a.name] = apikeys.ApiKey(a.name, a.sha256, a.models, a.concurrent,
                                             a.per_minute)
                done.append(f"API key {a.name} added")
            elif a.action == "apikey-revoke":
                if api.pop(a.name, None) is None:
                    raise UsageError(f"no API key named {a.name!r} to revoke")
                done.append(f"API key {a.name} revoked")
            elif a.action == "trust-rotate":
                _rotate(trust, a)
                done.append(f"trust rotated to version {a.version}: {len(set(a.keys))} keys, "
                            f"threshold {a.threshold}")
            elif a.action == "key-revoke":
                _revoke(trust, a.keyid)
                done.append(f"publisher key {a.keyid[:16]} revoked")
            elif a.action == "settings":
                _settings(new / "appliance.toml", a.settings, check_settings)
                settings_changed = True
                done.append(f"settings changed: {', '.join(sorted(a.settings))}")
        if not api and _auth_needed(new / "appliance.toml"):
            raise UsageError("this would leave the device without any API key")
        apikeys.write(key_file, api)
        apikeys.read(key_file)  # what goes live is read back as the service will read it
        trust.keys()
        trust.policy()
        (new / "control").mkdir(exist_ok=True)
        (new / "control" / c.name).write_text(f"{c.sequence}\n")
        (new / TOKEN).write_text(token + "\n")
        pending = {"token": token, "switches": [list(s) for s in switches],
                   "resets": [list(r) for r in resets]}
        atomic_write(layout.state / PENDING, tomli_w.dumps(pending).encode(), mode=0o600)
        checkpoint("control pending")
    layout.audit.append("control", file=path.name, result="ok", name=c.name,
                        sequence=c.sequence, actions=done)
    done += _redo(layout, pending)
    return Applied(c, tuple(done), settings_changed)


def _check_rotation(layout: Layout, a: ctl.Action, manifest_bytes: bytes,
                    sig_bytes: bytes) -> None:
    current = layout.trust.version()
    if a.version != current + 1:
        raise RollbackError(f"trust rotation to version {a.version}, but this device is at "
                            f"version {current} (the next is {current + 1})")
    new_keys = {keys.key_id(k): k for k in
                (keys.parse_public(p.encode(), "trust-rotate key") for p in a.keys)}
    try:  # the new keys must prove they are held: a threshold of them signed too
        signing.verify(manifest_bytes, sig_bytes, new_keys, a.threshold)
    except ApplianceError as exc:
        raise type(exc)(f"the new trust did not sign its rotation: {exc.message}") from None


def _rotate(trust: TrustStore, a: ctl.Action) -> None:
    for old in list(trust.keys()):
        (trust.path / f"{old}.pub").unlink()
    for pem in a.keys:
        trust.add_key(keys.parse_public(pem.encode(), "trust-rotate key"))
    trust.set_threshold(a.threshold, a.version)


def _revoke(trust: TrustStore, keyid: str) -> None:
    present = trust.keys()
    if keyid not in present:
        raise UsageError(f"publisher key {keyid[:16]} is not trusted here")
    if len(present) - 1 < trust.threshold():
        raise UsageError(f"revoking {keyid[:16]} would leave {len(present) - 1} keys for a "
                         f"threshold of {trust.threshold()}",
                         hint="rotate the trust instead (trust-rotate)")
    (trust.path / f"{keyid}.pub").unlink()


def _settings(path: Path, change: dict[str, Any], check: SettingsCheck) -> None:
    """Merge the change into the file, table by table; the result is checked as a whole, as
    the service will read it (size included)."""
    doc = parse_toml(path.read_text(), str(path)) if path.exists() else {}
    for table, values in change.items():
        if isinstance(values, dict) and isinstance(doc.get(table), dict):
            doc[table] = {**doc[table], **values}
        else:
            doc[table] = values
    data = tomli_w.dumps(doc).encode()
    check(data)
    path.write_bytes(data)


def _auth_needed(settings_file: Path) -> bool:
    if not settings_file.exists():
        return True
    server = parse_toml(settings_file.read_text(), str(settings_file)).get("server", {})
    return not isinstance(server, dict) or server.get("auth", True) is not False


def _check_reset(store: Store, bundle: str, keep: int) -> None:
    active = store.active(bundle)
    if active is not None and active > keep and _fallback(store, bundle, keep) is None:
        raise UsageError(f"bundle {bundle}: nothing good installed at or below {keep} to fall "
                         f"back to from {active}")


def _fallback(store: Store, bundle: str, keep: int) -> int | None:
    """The newest installed sequence at or below `keep` that did not fail its self-test."""
    bad = set(store.bad(bundle))
    return max((s for s in store.sequences(bundle) if s <= keep and s not in bad),
               default=None)


def _check_switch(store: Store, a: ctl.Action) -> tuple[str, str, int, bool]:
    """Refuse a switch the store cannot make before anything changes."""
    installed = store.sequences(a.bundle)
    if not installed:
        raise UsageError(f"bundle {a.bundle} is not installed")
    if a.action == "rollback":
        return "rollback", a.bundle, store.rollback_target(a.bundle), False
    if a.sequence not in installed:
        raise UsageError(f"bundle {a.bundle} sequence {a.sequence} is not installed")
    if a.sequence in store.bad(a.bundle) and not a.force:
        raise UsageError(f"bundle {a.bundle} sequence {a.sequence} failed its self-test "
                         "(activate it with force = true)")
    return "activate", a.bundle, a.sequence, a.force


def resume(layout: Layout) -> list[str]:
    """Finish the store side of a document whose configuration went live before a crash;
    drop the note of one that never went live. Callers hold the store lock."""
    path = layout.state / PENDING
    if not path.exists():
        return []
    pending = parse_toml(path.read_text(), str(path), StoreError)
    live = layout.config_dir / TOKEN
    token = live.read_text().strip() if live.exists() else ""
    if pending.get("token") != token:
        path.unlink()
        return []
    done = _redo(layout, pending)
    layout.audit.append("control-resume", result="ok", done=done)
    return done


def _redo(layout: Layout, pending: dict[str, Any]) -> list[str]:
    """The store side of a live document. Each step may run twice: it sets, never adds; a
    step the store can no longer make is reported and skipped, never retried for ever."""
    store = Store(layout)
    done = []
    for bundle, keep in pending.get("resets", []):
        active = store.active(bundle)
        fallback = _fallback(store, bundle, keep)
        if active is not None and active > keep and fallback is not None:
            trial.begin(store, bundle, fallback)
            store.activate(bundle, fallback)
        if (store.last_good(bundle) or 0) > keep:
            store.clear_last_good(bundle)  # the next passing trial sets it again
        for seq in store.sequences(bundle):
            if seq > keep and seq != store.active(bundle):
                store.discard(bundle, seq)
        store.reset_highwater(bundle, keep)
        done.append(f"bundle {bundle}: sequences above {keep} removed, high-water mark {keep}")
    for what, bundle, seq, force in pending.get("switches", []):
        if seq not in store.sequences(bundle):
            done.append(f"bundle {bundle}: {what} to sequence {seq} skipped (not installed)")
            continue
        if store.active(bundle) != seq:
            trial.begin(store, bundle, seq)
            store.activate(bundle, seq)
        done.append(f"bundle {bundle}: {what} to sequence {seq}" + (" (forced)" if force else ""))
    checkpoint("control store done")
    (layout.state / PENDING).unlink(missing_ok=True)
    return done
