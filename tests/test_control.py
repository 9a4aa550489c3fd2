"""Signed control documents on the device: what each action does, and one test per attack
class that bundles already resist (unsigned, tampered, replayed, expired, mis-targeted,
wrong kind, extra members), plus TUF's rotation rules and the recovery from a leaked key."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from factory import Factory, snapshot

from appliance.bundle import keys, signing
from appliance.bundle.tarformat import TarWriter
from appliance.device import apikeys, config, control, identity
from appliance.device.install import import_bundle
from appliance.device.layout import Layout
from appliance.device.store import Store
from appliance.errors import (
    FormatError,
    RollbackError,
    SignatureError,
    StoreError,
    UsageError,
)
from appliance.serve.settings import check_document
from appliance.serve.settings import load as load_settings

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
HASH = "a" * 64


def document(folder: Path, actions: list[dict[str, Any]], signers: list[Ed25519PrivateKey], *,
             name: str = "fleet", sequence: int = 1, target: str = "all",
             expires: datetime | None = None, extra: dict[str, Any] | None = None,
             tamper: bool = False, members: list[tuple[str, bytes]] | None = None) -> Path:
    doc: dict[str, Any] = {"format": 1, "kind": "control", "name": name, "sequence": sequence,
                           "created": NOW - timedelta(days=1), "target": target}
    if expires is not None:
        doc["expires"] = expires
    doc.update(extra or {})
    doc["actions"] = actions
    data = tomli_w.dumps(doc).encode()
    sig = signing.sign(data, signers)
    if tamper:
        data = data.replace(b"fleet", b"fleeT")
    buf = io.BytesIO()
    tar = TarWriter(buf, 1_700_000_000)
    tar.add_bytes("manifest.toml", data)
    tar.add_bytes("manifest.sig", sig)
    for path, content in members or []:
        tar.add_bytes(path, content)
    tar.close()
    path = folder / f"{name}-{sequence}.control"
    path.write_bytes(buf.getvalue())
    return path


def pem(key: Ed25519PrivateKey) -> str:
    return keys.public_pem(key.public_key()).decode()


def apply(path: Path, layout: Layout, device: str = "") -> control.Applied:
    return control.apply_file(path, layout, device, check_document, now=NOW)


def add_key(name: str = "alice", **kw: Any) -> dict[str, Any]:
    return {"action": "apikey-add", "name": name, "sha256": HASH, **kw}


@pytest.fixture
def device(installed: Layout) -> Layout:
    """A device with bundle demo 1 and one API key, its configuration on the state partition."""
    apikeys.create(installed, "builtin")
    return installed


def test_api_keys_added_and_revoked_in_one_step(device: Layout, tmp_path: Path,
                                                signing_key: Ed25519PrivateKey) -> None:
    doc = document(tmp_path, [add_key(models=["m1"], concurrent=2, per_minute=30),
                              {"action": "apikey-revoke", "name": "builtin"}], [signing_key])
    before = config.generation(device)
    applied = apply(doc, device)
    assert applied.done == ("API key alice added", "API key builtin revoked")
    keys_now = apikeys.read(device.api_keys)
    assert list(keys_now) == ["alice"]
    assert keys_now["alice"].models == ("m1",) and keys_now["alice"].per_minute == 30
    assert config.generation(device) == before + 1
    assert control.mark(device, "fleet") == 1
    last = device.audit.entries()[-1]
    assert last["event"] == "control" and last["result"] == "ok" and last["sequence"] == 1


def test_replay_and_older_sequences_are_refused(device: Layout, tmp_path: Path,
                                                signing_key: Ed25519PrivateKey) -> None:
    second = document(tmp_path, [add_key("bob")], [signing_key], sequence=2)
    apply(second, device)
    with pytest.raises(RollbackError, match="not newer than 2"):
        apply(second, device)
    older = document(tmp_path, [{"action": "apikey-revoke", "name": "bob"}], [signing_key],
                     sequence=1)
    with pytest.raises(RollbackError):
        apply(older, device)
    assert "bob" in apikeys.read(device.api_keys)
    # streams are independent: another name starts from its own mark
    apply(document(tmp_path, [add_key("carol")], [signing_key], name="site", sequence=1), device)


@pytest.mark.parametrize("attack", ["unsigned", "tampered", "threshold"])
def test_signatures_are_checked_before_anything(device: Layout, tmp_path: Path,
                                                signing_key: Ed25519PrivateKey,
                                                attack: str) -> None:
    stranger = Ed25519PrivateKey.generate()
    signers = [stranger] if attack == "unsigned" else [signing_key]
    if attack == "threshold":
        with Store(device).locked(), config.change(device) as new:
            from appliance.device.trust import TrustStore
            TrustStore(new / "trust").add_key(stranger.public_key())
            TrustStore(new / "trust").set_threshold(2)
    doc = document(tmp_path, [add_key()], signers, tamper=attack == "tampered")
    before = snapshot(device.root)
    with pytest.raises(SignatureError):
        apply(doc, device)
    assert snapshot(device.root) == before
    assert device.audit.entries()[-1]["result"] == "rejected"


def test_target_device_and_expiry(device: Layout, tmp_path: Path,
                                  signing_key: Ed25519PrivateKey) -> None:
    identity.ensure(device)
    me = identity.device_id(device)
    assert me is not None
    other = "b" * 64
    with pytest.raises(UsageError, match="for device bbbbbbbbbbbbbbbb"):
        apply(document(tmp_path, [add_key()], [signing_key], target=other), device, me)
    assert control.mark(device, "fleet") == 0  # refused for another device: not consumed
    with pytest.raises(RollbackError, match="expired"):
        apply(document(tmp_path, [add_key()], [signing_key], sequence=2,
                       expires=NOW - timedelta(hours=1)), device, me)
    apply(document(tmp_path, [add_key()], [signing_key], sequence=3, target=me), device, me)
    assert "alice" in apikeys.read(device.api_keys)


def test_wrong_kind_and_extra_members(device: Layout, tmp_path: Path, factory: Factory,
                                      signing_key: Ed25519PrivateKey) -> None:
    with pytest.raises(FormatError, match="must be control"):
        apply(document(tmp_path, [add_key()], [signing_key], extra={"kind": "model"}), device)
    with pytest.raises(FormatError, match="follows a control document"):
        apply(document(tmp_path, [add_key()], [signing_key], sequence=2,
                       members=[("x/run.sh", b"#!/bin/sh\n")]), device)
    # a control document given where a bundle is expected is not installed as one
    doc = document(tmp_path, [add_key()], [signing_key], sequence=3)
    with pytest.raises(FormatError):
        import_bundle(doc, device)
    # and a model bundle is not taken for a control document
    with pytest.raises(FormatError, match="kind"):
        apply(factory.bundle(sequence=5), device)
    with pytest.raises(FormatError, match="not a known key"):
        apply(document(tmp_path, [add_key(shell="rm -rf /")], [signing_key], sequence=4), device)


def test_settings_are_validated_as_a_whole(device: Layout, tmp_path: Path,
                                           signing_key: Ed25519PrivateKey) -> None:
    bad = document(tmp_path, [add_key(), {"action": "settings", "settings": {
        "server": {"max_queue": 8}, "chat": {"paralel": 2}}}], [signing_key])
    before = snapshot(device.root)
    with pytest.raises(FormatError, match="paralel"):
        apply(bad, device)
    assert snapshot(device.root) == before  # the API key of the same document was not added
    exposed = document(tmp_path, [{"action": "settings", "settings": {
        "server": {"host": "0.0.0.0", "auth": False}}}], [signing_key], sequence=2)
    with pytest.raises(UsageError, match="loopback"):
        apply(exposed, device)
    good = document(tmp_path, [{"action": "settings", "settings": {"server": {"max_queue": 8},
                                                                    "chat": {"parallel": 2}}}],
                    [signing_key], sequence=3)
    assert apply(good, device).settings_changed
    s = load_settings(device, env={})
    assert (s.max_queue, s.parallel) == (8, 2)
    again = document(tmp_path, [{"action": "settings", "settings": {"chat": {"threads": 1}}}],
                     [signing_key], sequence=4)
    apply(again, device)
    s = load_settings(device, env={})
    assert (s.max_queue, s.parallel, s.threads) == (8, 2, 1)  # merged, not replaced


def test_the_last_api_key_cannot_be_revoked(device: Layout, tmp_path: Path,
                                            signing_key: Ed25519PrivateKey) -> None:
    doc = document(tmp_path, [{"action": "apikey-revoke", "name": "builtin"}], [signing_key])
    with pytest.raises(UsageError, match="without any API key"):
        apply(doc, device)


def test_trust_rotation_follows_tuf(device: Layout, tmp_path: Path, factory: Factory,
                                    signing_key: Ed25519PrivateKey) -> None:
    new1, new2 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    rotate = {"action": "trust-rotate", "keys": [pem(new1), pem(new2)], "threshold": 2,
              "version": 2}
    # the new keys must sign too (they prove they are held)
    with pytest.raises(SignatureError, match="new trust did not sign"):
        apply(document(tmp_path, [rotate], [signing_key, new1]), device)
    # the current trust must sign
    with pytest.raises(SignatureError):
        apply(document(tmp_path, [rotate], [new1, new2], sequence=2), device)
    # versions go up by exactly one
    with pytest.raises(RollbackError, match="the next is 2"):
        apply(document(tmp_path, [{**rotate, "version": 3}], [signing_key, new1, new2],
                       sequence=3), device)
    apply(document(tmp_path, [rotate], [signing_key, new1, new2], sequence=4), device)
    trust = device.trust
    assert set(trust.keys()) == {keys.key_id(new1.public_key()), keys.key_id(new2.public_key())}
    assert (trust.threshold(), trust.version()) == (2, 2)
    # the old key alone signs nothing any more; the new pair does
    with pytest.raises(SignatureError):
        import_bundle(factory.bundle(sequence=2), device)
    import_bundle(factory.bundle(sequence=2, keys=[new1, new2]), device)
    # a replay of the rotation under another stream name fails on its version
    with pytest.raises(RollbackError, match="the next is 3"):
        apply(document(tmp_path, [rotate], [signing_key, new1, new2], name="other"), device)


def test_recovery_from_a_leaked_key(device: Layout, tmp_path: Path, factory: Factory,
                                    signing_key: Ed25519PrivateKey) -> None:
    """Two publisher keys, threshold 1; one leaks and publishes an absurd sequence, which would
    block every later bundle. A rotation signed by the other removes the leaked key, lowers
    the high-water mark and falls back to what was good."""
    leaked = Ed25519PrivateKey.generate()
    with Store(device).locked(), config.change(device) as new:
        from appliance.device.trust import TrustStore
        TrustStore(new / "trust").add_key(leaked.public_key())
    absurd = 2**62
    import_bundle(factory.bundle(sequence=absurd, keys=[leaked]), device)
    store = Store(device)
    assert store.active("demo") == absurd and store.highwater("demo") == absurd
    fresh = Ed25519PrivateKey.generate()
    rotate = {"action": "trust-rotate", "keys": [pem(signing_key), pem(fresh)], "threshold": 1,
              "version": 2, "reset": {"demo": 1}}
    applied = apply(document(tmp_path, [rotate], [signing_key, fresh], name="recovery"), device)
    assert any("high-water mark 1" in line for line in applied.done)
    assert store.active("demo") == 1 and store.sequences("demo") == [1]
    assert store.highwater("demo") == 1
    assert keys.key_id(leaked.public_key()) not in device.trust.keys()  # noqa: SIM118 - reads the folder
    import_bundle(factory.bundle(sequence=2, keys=[fresh]), device)
    with pytest.raises(SignatureError):
        import_bundle(factory.bundle(sequence=3, keys=[leaked]), device)


def test_key_revocation_keeps_the_threshold(device: Layout, tmp_path: Path,
                                            signing_key: Ed25519PrivateKey) -> None:
    kid = keys.key_id(signing_key.public_key())
    with pytest.raises(UsageError, match="would leave 0 keys"):
        apply(document(tmp_path, [{"action": "key-revoke", "keyid": kid}], [signing_key]),
              device)
    other = Ed25519PrivateKey.generate()
    with Store(device).locked(), config.change(device) as new:
        from appliance.device.trust import TrustStore
        TrustStore(new / "trust").add_key(other.public_key())
    apply(document(tmp_path, [{"action": "key-revoke", "keyid": keys.key_id(other.public_key())}],
                   [signing_key], sequence=2), device)
    assert list(device.trust.keys()) == [kid]


def test_activate_and_rollback(device: Layout, tmp_path: Path, factory: Factory,
                               signing_key: Ed25519PrivateKey) -> None:
    import_bundle(factory.bundle(sequence=2), device)
    store = Store(device)
    assert store.active("demo") == 2
    apply(document(tmp_path, [{"action": "rollback", "bundle": "demo"}], [signing_key]), device)
    assert store.active("demo") == 1
    apply(document(tmp_path, [{"action": "activate", "bundle": "demo", "sequence": 2}],
                   [signing_key], sequence=2), device)
    assert store.active("demo") == 2 and store.trial("demo") == 2
    with pytest.raises(UsageError, match="not installed"):
        apply(document(tmp_path, [add_key("x"), {"action": "activate", "bundle": "demo",
                                                  "sequence": 9}], [signing_key], sequence=3),
              device)
    assert "x" not in apikeys.read(device.api_keys)


def test_a_crash_after_the_config_went_live_is_finished(device: Layout, tmp_path: Path,
                                                        factory: Factory,
                                                        signing_key: Ed25519PrivateKey) -> None:
    """The store side of a live document is redone by the next start (`resume`); the note of
    a document whose configuration never went live is dropped, even when another change made
    a configuration of the same generation number live meanwhile."""
    import_bundle(factory.bundle(sequence=2), device)
    store = Store(device)
    with store.locked(), config.change(device) as new:
        (new / control.TOKEN).write_text("live-doc\n")
    note = device.state / control.PENDING
    note.write_text(tomli_w.dumps({"token": "live-doc",
                                   "switches": [["rollback", "demo", 1, False]], "resets": []}))
    with store.locked():
        assert control.resume(device) == ["bundle demo: rollback to sequence 1"]
    assert store.active("demo") == 1 and not note.exists()
    assert device.audit.entries()[-1]["event"] == "control-resume"
    note.write_text(tomli_w.dumps({"token": "never-live",
                                   "switches": [["activate", "demo", 2, False]], "resets": []}))
    apikeys.create(device, "other")  # a CLI change after the crash: a new generation
    with store.locked():
        assert control.resume(device) == []
    assert store.active("demo") == 1 and not note.exists()
    # a switch the store can no longer make is reported and dropped, not retried for ever
    note.write_text(tomli_w.dumps({"token": "live-doc",
                                   "switches": [["activate", "demo", 9, False]], "resets": []}))
    with store.locked(), config.change(device) as new:
        (new / control.TOKEN).write_text("live-doc\n")
    with store.locked():
        assert control.resume(device) == [
            "bundle demo: activate to sequence 9 skipped (not installed)"]
    assert not note.exists()


def test_what_would_break_the_device_is_refused_before_it_goes_live(
        device: Layout, tmp_path: Path, factory: Factory,
        signing_key: Ed25519PrivateKey) -> None:
    """Found in review: each of these once left a device that no later document could mend."""
    import_bundle(factory.bundle(sequence=2), device)
    import_bundle(factory.bundle(sequence=3), device)
    before = snapshot(device.root)
    fresh = Ed25519PrivateKey.generate()
    mixed = [{"action": "trust-rotate", "keys": [pem(signing_key), pem(fresh)], "threshold": 1,
              "version": 2, "reset": {"demo": 2}},
             {"action": "activate", "bundle": "demo", "sequence": 3}]
    with pytest.raises(UsageError, match="may not also switch"):
        apply(document(tmp_path, mixed, [signing_key, fresh]), device)
    with pytest.raises(FormatError, match="twice"):
        apply(document(tmp_path, [add_key(models=["m1", "m1"])], [signing_key]), device)
    huge = {"action": "settings", "settings": {"server": {
        "allowed_hosts": [f"host-{i}.example" for i in range(5000)]}}}
    with pytest.raises(FormatError, match="larger than"):
        apply(document(tmp_path, [huge], [signing_key]), device)
    assert snapshot(device.root) == before
    # the device still takes a good document afterwards
    apply(document(tmp_path, [add_key()], [signing_key]), device)


def test_config_generation_link_is_checked(device: Layout) -> None:
    device.config_link.unlink()
    device.config_link.symlink_to("/etc")
    with pytest.raises(StoreError, match="not a config generation"):
        config.generation(device)


def test_kill_at_every_checkpoint_leaves_old_or_new(device: Layout, tmp_path: Path,
                                                    factory: Factory,
                                                    signing_key: Ed25519PrivateKey) -> None:
    """SIGKILL at each checkpoint of applying a document (API key, settings and a rollback),
    then what the next start does (`resume`): the device has all of it or none of it."""
    import shutil
    import signal
    import subprocess
    import sys

    from conftest import cli_env

    import_bundle(factory.bundle(sequence=2), device)
    doc = document(tmp_path, [add_key(), {"action": "settings", "settings": {
        "server": {"max_queue": 9}}}, {"action": "rollback", "bundle": "demo"}], [signing_key])
    baseline = tmp_path / "baseline"
    shutil.copytree(device.root, baseline, symlinks=True)

    def ctl(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "appliance.cli.ctl", "control", "apply",
                               str(doc)], env={**cli_env(root), **env}, capture_output=True,
                              text=True, timeout=60)

    log = tmp_path / "points"
    probe = tmp_path / "probe"
    shutil.copytree(baseline, probe, symlinks=True)
    assert ctl(probe, APPLIANCE_CHECKPOINT_LOG=str(log)).returncode == 0
    points = log.read_text().splitlines()
    assert any("config live" in p for p in points), points
    seen = set()
    for k in range(1, len(points) + 1):
        root = tmp_path / f"kill-{k}"
        shutil.copytree(baseline, root, symlinks=True)
        assert ctl(root, APPLIANCE_KILL_AT=str(k)).returncode == -signal.SIGKILL
        layout = Layout(root)
        with Store(layout).locked():
            control.resume(layout)
        new = "alice" in apikeys.read(layout.api_keys)
        assert control.mark(layout, "fleet") == (1 if new else 0), k
        assert load_settings(layout, env={}).max_queue == (9 if new else 64), k
        assert Store(layout).active("demo") == (1 if new else 2), k
        seen.add(new)
    assert seen == {False, True}


@pytest.mark.parametrize("change,why", [
    ({"name": "../trust"}, "name"),
    ({"name": "fleet", "sequence": 0}, "sequence"),
    ({"sequence": "2"}, "sequence"),
    ({"target": "../../etc"}, "target"),
    ({"format": 2}, "format 2"),
    ({"actions": []}, "at least one action"),
    ({"actions": [add_key()] * 65}, "more than 64"),
    ({"actions": [{"action": "shell", "command": "id"}]}, "must be one of"),
    ({"actions": [add_key(name="../../x")]}, "name"),
    ({"actions": [add_key(sha256="not-a-hash")]}, "sha256"),
    ({"actions": [add_key(models=["a b"])]}, "models"),
    ({"actions": [{"action": "activate", "bundle": "../demo", "sequence": 1}]}, "bundle"),
    ({"actions": [{"action": "trust-rotate", "keys": ["not a key"], "threshold": 1,
                   "version": 2}]}, "not a PEM"),
    ({"actions": [{"action": "trust-rotate", "keys": [], "threshold": 1, "version": 2}]},
     "only 0 keys"),
    ({"actions": [{"action": "settings", "settings": "host=0.0.0.0"}]}, "must be a table"),
])
def test_malformed_documents(device: Layout, tmp_path: Path, signing_key: Ed25519PrivateKey,
                             change: dict[str, Any], why: str) -> None:
    actions = change.pop("actions", [add_key()])
    doc = document(tmp_path, actions, [signing_key], extra=change)
    before = snapshot(device.root)
    with pytest.raises(FormatError, match=why):
        apply(doc, device)
    assert snapshot(device.root) == before


def test_archive_attacks(device: Layout, tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    """The reader is the bundles' own: a link member, a cut archive, one key signing twice for a
    threshold of two, and bytes that are no archive are all refused before any change."""
    good = document(tmp_path, [add_key()], [signing_key]).read_bytes()
    before = snapshot(device.root)
    cut = tmp_path / "cut.control"
    cut.write_bytes(good[:700])
    junk = tmp_path / "junk.control"
    junk.write_bytes(b"\x00" * 100 + b"#!/bin/sh\n")
    for path in (cut, junk):
        with pytest.raises((FormatError, SignatureError)):
            apply(path, device)
    linked = document(tmp_path, [add_key()], [signing_key], name="linked",
                      members=[("x", b"")])
    raw = bytearray(linked.read_bytes())
    at = raw.index(b"x\x00", 1024)  # the third header: make it a symbolic link
    raw[at + 156] = ord("2")
    raw[at + 148:at + 156] = b" " * 8
    raw[at + 148:at + 156] = b"%06o\x00 " % sum(raw[at:at + 512])
    linked.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=r"link|follows"):
        apply(linked, device)
    with Store(device).locked(), config.change(device) as new:
        from appliance.device.trust import TrustStore
        TrustStore(new / "trust").set_threshold(2)
    twice = document(tmp_path, [add_key()], [signing_key, signing_key], name="twice")
    with pytest.raises(SignatureError, match="1 trusted signature"):
        apply(twice, device)
    assert snapshot(device.root)["var/lib/appliance/config"] != before.get(
        "var/lib/appliance/config")  # only the threshold change above went live
    assert "alice" not in apikeys.read(device.api_keys)
