"""Activation, rollback, pruning, cleanup, keys and the audit chain on a real state root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from factory import Factory

from appliance.bundle import keys
from appliance.device.install import import_bundle
from appliance.device.layout import Layout
from appliance.device.store import Store
from appliance.errors import StoreError, UsageError


def test_rollback_and_activate(installed: Layout, factory: Factory) -> None:
    store = Store(installed)
    import_bundle(factory.bundle(sequence=2), installed)
    assert store.rollback_target("demo") == 1
    assert store.activate("demo", 1) == 2
    assert store.active("demo") == 1
    with pytest.raises(UsageError, match="no older installed sequence"):
        store.rollback_target("demo")
    with pytest.raises(UsageError, match="not installed"):
        store.activate("demo", 7)


def test_prune_keeps_active_and_previous(installed: Layout, factory: Factory) -> None:
    for seq in (2, 3, 4):
        import_bundle(factory.bundle(sequence=seq), installed)
    assert Store(installed).sequences("demo") == [3, 4]
    assert Store(installed).highwater("demo") == 4


def test_cleanup_removes_leftovers(installed: Layout) -> None:
    folder = installed.store / "demo"
    (folder / ".staging-9").mkdir()
    (folder / ".staging-9" / "half").write_bytes(b"x")
    (folder / ".trash-3").mkdir()
    removed = Store(installed).cleanup()
    assert {p.name for p in removed} == {".staging-9", ".trash-3"}
    assert sorted(p.name for p in folder.iterdir()) == ["1", "current", "trial"]


def test_one_operation_at_a_time(installed: Layout, factory: Factory,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A second operation waits for the lock, then gives up with a clear error."""
    monkeypatch.setattr("appliance.device.store.LOCK_WAIT", 0.5)
    store = Store(installed)
    with store.locked(), pytest.raises(StoreError, match="another bundle operation"):
        import_bundle(factory.bundle(sequence=2), installed)
    assert store.active("demo") == 1


def test_damaged_highwater_is_an_error(installed: Layout, factory: Factory) -> None:
    (installed.highwater_dir / "demo").write_text("banana")
    with pytest.raises(StoreError, match="high-water mark"):
        import_bundle(factory.bundle(sequence=2), installed)


def test_trust_store_add_remove_threshold(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    keys.generate(tmp_path / "k")
    kid = layout.trust.add(tmp_path / "k.pub")
    assert list(layout.trust.keys()) == [kid]
    layout.trust.set_threshold(2)
    assert layout.trust.threshold() == 2
    with pytest.raises(UsageError):
        layout.trust.remove("abc")  # too short to be unambiguous
    assert layout.trust.remove(kid[:12]) == kid
    assert layout.trust.keys() == {}


def test_trust_store_rejects_renamed_key_file(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.trust.path.mkdir(parents=True)
    key = Ed25519PrivateKey.generate().public_key()
    (layout.trust.path / f"{'0' * 64}.pub").write_bytes(keys.public_pem(key))
    with pytest.raises(StoreError, match="holds key"):
        layout.trust.keys()


def test_keygen_refuses_overwrite_and_protects_private_key(tmp_path: Path) -> None:
    keys.generate(tmp_path / "k")
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(UsageError, match="already exists"):
        keys.generate(tmp_path / "k")


@pytest.mark.parametrize("content", [b"not a key", b"-----BEGIN PUBLIC KEY-----\nAAAA\n"
                                     b"-----END PUBLIC KEY-----\n"])
def test_bad_public_key_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.pub").write_bytes(content)
    from appliance.errors import FormatError
    with pytest.raises(FormatError):
        Layout(tmp_path).trust.add(tmp_path / "bad.pub")


def test_audit_chain_records_and_detects_tampering(installed: Layout, factory: Factory) -> None:
    import_bundle(factory.bundle(sequence=2), installed)
    audit = installed.audit
    assert audit.verify().entries == 2
    events = [e["event"] for e in audit.entries()]
    assert events == ["import", "import"]
    original = audit.path.read_bytes()

    lines = original.splitlines(keepends=True)
    entry = json.loads(lines[0])
    entry["sequence"] = 99
    audit.path.write_bytes(json.dumps(entry, sort_keys=True).encode() + b"\n" + lines[1])
    with pytest.raises(StoreError, match="broken at line 1"):
        audit.verify()

    audit.path.write_bytes(lines[1])  # first line removed
    with pytest.raises(StoreError, match="broken at line 1"):
        audit.verify()

    audit.path.write_bytes(lines[0])  # last line cut off
    with pytest.raises(StoreError, match="cut off"):
        audit.verify()

    audit.path.write_bytes(original)
    assert audit.verify().entries == 2


def test_rejections_are_audited(installed: Layout, factory: Factory) -> None:
    from appliance.errors import AlreadyInstalled, RollbackError
    other = {"models/tiny/LICENSE.txt": b"license", "models/tiny/w.gguf": b"GGUF" + bytes(64)}
    with pytest.raises(RollbackError):
        import_bundle(factory.bundle(sequence=1, files=other), installed)
    last = installed.audit.entries()[-1]
    assert (last["event"], last["result"], last["error"]) == ("import", "rejected",
                                                             "RollbackError")
    with pytest.raises(AlreadyInstalled):
        import_bundle(factory.bundle(sequence=1), installed)
    last = installed.audit.entries()[-1]
    assert (last["error"], last["detail"]) == (
        "AlreadyInstalled", "bundle demo sequence 1 is already installed (active)")
    assert installed.audit.verify().entries == 3


def test_a_second_operation_waits_its_turn(installed: Layout, factory: Factory) -> None:
    """Two sticks at once, or a stick while a trial is settled: the second one waits."""
    import threading
    import time

    store = Store(installed)
    bundle = factory.bundle(sequence=2)
    held = threading.Event()

    def hold() -> None:
        with store.locked():
            held.set()
            time.sleep(1.0)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    started = time.monotonic()
    import_bundle(bundle, installed)
    holder.join()
    assert time.monotonic() - started >= 0.8
    assert store.active("demo") == 2
