"""System updates on the device's side, outside a guest: a signed `.system` file is verified into
staging before anything is written, a replay or a foreign one is refused, the write is
systemd-sysupdate's (here a stand-in that records the call), and each boot's settle step says
once what became of the new version. The real sysupdate and boot counting run in the booted
image (tests/test_image_update.py)."""

from __future__ import annotations

import gzip
import json
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.bundle import system as sy
from appliance.device import stick, system
from appliance.device.layout import Layout
from appliance.device.store import Store
from appliance.errors import FormatError, IntegrityError, RollbackError, SignatureError, StoreError
from appliance.publish import system as publish
from appliance.serve import settings

RUNNING = 1000


def _device(layout: Layout, version: int = RUNNING, slot: int | None = None,
            target: str = "x86_64-cpu") -> None:
    """The running system as the image describes it, booted from `slot`."""
    (layout.root / "usr/lib/appliance").mkdir(parents=True, exist_ok=True)
    (layout.root / system.SYSTEM_TOML).write_text(
        f'version = {version}\ntarget = "{target}"\narchitecture = "amd64"\n'
        'channel = "appliance-os"\n')
    (layout.root / "proc").mkdir(exist_ok=True)
    (layout.root / "proc/cmdline").write_text(
        f"root=PARTLABEL=appliance_{slot or version} ro console=ttyS0 quiet\n")
    (layout.root / system.ENTRIES).mkdir(parents=True, exist_ok=True)
    (layout.root / system.ENTRIES / f"appliance_{version}.conf").write_text("title x\n")


def _update(tmp_path: Path, key: Ed25519PrivateKey, version: int,
            target: str = "x86_64-cpu") -> Path:
    parts = tmp_path / f"parts-{version}"
    parts.mkdir(exist_ok=True)
    (parts / "root.ext4").write_bytes(b"\x53\xef" * 4096 + bytes(1 << 16) + str(version).encode())
    (parts / "vmlinuz").write_bytes(b"MZ kernel " + str(version).encode())
    (parts / "initrd").write_bytes(b"initrd " + str(version).encode())
    return publish.build(parts / "root.ext4", parts / "vmlinuz", parts / "initrd", version,
                         target, "amd64", [key], tmp_path / "out", lambda line: None)


class Writer:
    """Stands in for systemd-sysupdate: records what the staging folder held when called."""

    def __init__(self, layout: Layout, fail: bool = False) -> None:
        self.layout, self.fail, self.seen = layout, fail, []  # type: list[list[str]]

    def __call__(self) -> None:
        staged = system.folder(self.layout) / "staging/files"
        self.seen.append(sorted(p.name for p in staged.iterdir()))
        if self.fail:
            raise StoreError("systemd-sysupdate failed: no space left on device")


def _install(path: Path, layout: Layout, writer: Writer) -> int:
    return system.install_file(path, layout, lambda line: None, writer)[1]


def _events(layout: Layout) -> list[dict[str, object]]:
    return [json.loads(line) for line in (layout.state / "audit.log").read_text().splitlines()]


def test_an_update_is_verified_staged_written_and_pending(
        tmp_path: Path, layout: Layout, signing_key: Ed25519PrivateKey) -> None:
    _device(layout)
    update = _update(tmp_path, signing_key, RUNNING + 1)
    assert update.name == f"appliance-os-{RUNNING + 1}.system"
    with tarfile.open(update) as tar:  # a plain tar: manifest, signatures, the four parts
        names = tar.getnames()
        root = tar.extractfile(f"appliance_{RUNNING + 1}.root.gz")
        assert root is not None and gzip.decompress(root.read()).endswith(b"1001")
        conf = tar.extractfile(f"appliance_{RUNNING + 1}.conf")
        assert conf is not None and b"root=PARTLABEL=appliance_1001" in conf.read()
    assert names[:2] == ["manifest.toml", "manifest.sig"] and len(names) == 6
    writer = Writer(layout)
    _install(update, layout, writer)
    assert writer.seen == [sorted(sy.part_name(RUNNING + 1, p) for p in sy.PARTS)]
    assert Store(layout).highwater("system.appliance-os") == RUNNING + 1
    assert system.read_state(layout) == {"pending": RUNNING + 1, "from": RUNNING}
    assert not (system.folder(layout) / "staging").exists()
    events = [e["event"] for e in _events(layout)]
    assert events == ["system-verified", "system-install"]


def test_replays_and_older_versions_are_refused_before_staging(
        tmp_path: Path, layout: Layout, signing_key: Ed25519PrivateKey) -> None:
    _device(layout)
    for version in (RUNNING, RUNNING - 1):  # the running one and an older one
        with pytest.raises(RollbackError, match=f"version {version} must be > installed 1000"):
            _install(_update(tmp_path, signing_key, version), layout, Writer(layout))
    newer = _update(tmp_path, signing_key, RUNNING + 5)
    _install(newer, layout, Writer(layout))
    writer = Writer(layout)
    for version in (RUNNING + 5, RUNNING + 3):  # the same again (a replay), and below the mark
        with pytest.raises(RollbackError, match="must be > installed 1005"):
            _install(_update(tmp_path, signing_key, version), layout, writer)
    assert writer.seen == []
    assert not system.folder(layout).joinpath("staging").exists()


def test_a_foreign_or_untrusted_update_is_refused(
        tmp_path: Path, layout: Layout, signing_key: Ed25519PrivateKey) -> None:
    _device(layout)
    writer = Writer(layout)
    with pytest.raises(FormatError, match="is for arm64"):
        _install(_update(tmp_path, signing_key, RUNNING + 1, target="arm64"), layout, writer)
    (tmp_path / "stranger").mkdir()
    unsigned = _update(tmp_path / "stranger", Ed25519PrivateKey.generate(), RUNNING + 1)
    with pytest.raises(SignatureError, match="0 trusted signature"):
        _install(unsigned, layout, writer)
    assert writer.seen == []


def test_a_damaged_payload_leaves_nothing_behind(
        tmp_path: Path, layout: Layout, signing_key: Ed25519PrivateKey) -> None:
    _device(layout)
    update = _update(tmp_path, signing_key, RUNNING + 1)
    data = bytearray(update.read_bytes())
    at = data.index(b"MZ kernel")
    data[at] ^= 0x20
    update.write_bytes(bytes(data))
    writer = Writer(layout)
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        _install(update, layout, writer)
    assert writer.seen == [] and list(system.folder(layout).iterdir()) == []
    assert Store(layout).highwater("system.appliance-os") == 0


def test_a_model_bundle_is_not_a_system_update(
        tmp_path: Path, layout: Layout, factory: object) -> None:
    _device(layout)
    bundle = factory.bundle(sequence=2000)  # type: ignore[attr-defined]
    renamed = bundle.with_name("appliance-os-2000.system")
    bundle.rename(renamed)
    with pytest.raises(FormatError, match="must hold a system update"):
        _install(renamed, layout, Writer(layout))


def test_manifest_must_name_exactly_the_four_parts(signing_key: Ed25519PrivateKey) -> None:
    good = sy.SystemManifest("appliance-os", 7, _created(), "x86_64-cpu", "amd64", tuple(
        sy.mf.FileEntry(sy.part_name(7, p), 1, "0" * 64) for p in sy.PARTS))
    assert sy.parse(good.to_toml()).sequence == 7
    for files in (good.files[:3],
                  (*good.files[:3], sy.mf.FileEntry("appliance_8.conf", 1, "0" * 64)),
                  (*good.files[:3], sy.mf.FileEntry("../appliance_7.conf", 1, "0" * 64))):
        bad = sy.SystemManifest("appliance-os", 7, _created(), "x86_64-cpu", "amd64", files)
        with pytest.raises(FormatError):
            sy.parse(bad.to_toml())
    odd = good.to_toml().replace(b'architecture = "amd64"', b'architecture = "riscv64"')
    with pytest.raises(FormatError, match="architecture"):
        sy.parse(odd)


def _created():  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime
    return datetime(2026, 11, 30, tzinfo=UTC)


def test_no_write_unless_the_booted_slot_is_the_running_version(
        tmp_path: Path, layout: Layout, signing_key: Ed25519PrivateKey) -> None:
    """sysupdate protects the version os-release names: if the kernel booted another slot,
    writing could hit the running root."""
    _device(layout, slot=RUNNING - 1)
    writer = Writer(layout)
    with pytest.raises(StoreError, match="not the version the system says"):
        _install(_update(tmp_path, signing_key, RUNNING + 1), layout, writer)
    assert writer.seen == []


def test_a_failed_write_is_audited_and_can_be_tried_again(
        tmp_path: Path, layout: Layout, signing_key: Ed25519PrivateKey) -> None:
    _device(layout)
    update = _update(tmp_path, signing_key, RUNNING + 1)
    with pytest.raises(StoreError, match="no space left"):
        _install(update, layout, Writer(layout, fail=True))
    assert Store(layout).highwater("system.appliance-os") == 0
    assert system.read_state(layout) == {}
    assert _events(layout)[-1]["result"] == "rejected"
    _install(update, layout, Writer(layout))  # the same file, once the cause is gone
    assert system.read_state(layout)["pending"] == RUNNING + 1


def test_without_slots_a_device_refuses_system_updates(
        tmp_path: Path, layout: Layout, signing_key: Ed25519PrivateKey) -> None:
    with pytest.raises(StoreError, match="no A/B system slots"):
        _install(_update(tmp_path, signing_key, RUNNING + 1), layout, Writer(layout))


def _entry(layout: Layout, version: int, counter: str = "") -> None:
    for old in (layout.root / system.ENTRIES).glob(f"appliance_{version}*.conf"):
        old.unlink()
    (layout.root / system.ENTRIES / f"appliance_{version}{counter}.conf").write_text("t\n")


def test_settle_reports_good_once(layout: Layout) -> None:
    _device(layout, version=RUNNING + 1)
    system.write_state(layout, {"pending": RUNNING + 1, "from": RUNNING})
    _entry(layout, RUNNING + 1, "+2-1")  # still on trial: nothing to say yet
    lines: list[str] = []
    assert system.settle(layout, lines.append) == []
    assert system.status(layout)["state"] == "trying"  # type: ignore[index]
    _entry(layout, RUNNING + 1)  # blessed
    assert system.settle(layout, lines.append) == ["system-good"]
    assert system.settle(layout, lines.append) == []  # once
    assert Store(layout).highwater("system.appliance-os") == RUNNING + 1
    assert "system 1001: good" in lines


def test_settle_reports_a_fallback_after_the_tries(layout: Layout) -> None:
    _device(layout)
    system.write_state(layout, {"pending": RUNNING + 1, "from": RUNNING})
    _entry(layout, RUNNING + 1, "+1-2")  # booted the old one by hand? not a fallback yet
    assert system.settle(layout, lambda line: None) == []
    _entry(layout, RUNNING + 1, "+0-3")
    lines: list[str] = []
    assert system.settle(layout, lines.append) == ["system-fallback"]
    state = system.status(layout)
    assert state is not None and state["last_failed"] == RUNNING + 1
    assert state["state"] == "good" and "pending" not in state
    assert any("1001: failed (tries exhausted or marked bad); running 1000" in x for x in lines)
    assert _events(layout)[-1]["event"] == "system-fallback"


def test_settle_clears_an_interrupted_write(layout: Layout) -> None:
    _device(layout)
    staged = system.folder(layout) / "staging/files"
    staged.mkdir(parents=True)
    (staged / "appliance_1001.root.gz").write_bytes(b"half")
    assert system.settle(layout, lambda line: None) == ["system-interrupted"]
    assert not staged.exists()


def _result(layout: Layout, name: str, sequence: int, passed: bool) -> None:
    folder = layout.run / "selftest"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}-{sequence}.json").write_text(json.dumps(
        {"bundle": name, "sequence": sequence, "passed": passed,
         "checks": [{"model": "tiny", "passed": passed, "detail": "x"}]}))


def _counted(layout: Layout) -> None:
    var = layout.root / system.BOOT_COUNT_VAR
    var.parent.mkdir(parents=True)
    var.write_bytes(b"\x06\x00\x00\x00" + "\\loader\\entries\\x.conf".encode("utf-16-le"))


def test_check_passes_a_healthy_self_tested_version(installed: Layout) -> None:
    _device(installed)
    _counted(installed)
    verdicts: list[str] = []
    health = iter([None, "starting", "ok", "ok"])
    _result(installed, "demo", 1, True)
    assert system.check(installed, 60, lambda: next(health), lambda: False, verdicts.append,
                        lambda line: None, poll=0.01)
    assert verdicts == []  # systemd-bless-boot marks it good itself, after boot-complete


def test_check_marks_a_failed_self_test_bad_at_once(installed: Layout) -> None:
    _device(installed)
    _counted(installed)
    _result(installed, "demo", 1, False)
    verdicts: list[str] = []
    assert not system.check(installed, 60, lambda: "degraded", lambda: False, verdicts.append,
                            lambda line: None, poll=0.01)
    assert verdicts == ["bad"]
    assert _events(installed)[-1]["event"] == "system-check"


def test_check_spends_a_try_when_the_service_fails_or_hangs(installed: Layout) -> None:
    _device(installed)
    _counted(installed)
    verdicts: list[str] = []
    assert not system.check(installed, 60, lambda: None, lambda: True, verdicts.append,
                            lambda line: None, poll=0.01)
    assert not system.check(installed, 0.05, lambda: None, lambda: False, verdicts.append,
                            lambda line: None, poll=0.01)
    assert verdicts == []  # not marked bad: the next boot tries again, up to its count


def test_check_is_a_no_op_on_an_uncounted_boot(installed: Layout) -> None:
    _device(installed)
    assert system.check(installed, 60, lambda: None, lambda: True, lambda v: None,
                        lambda line: None)


def test_a_stick_installs_the_newest_update_and_refuses_the_older(
        tmp_path: Path, layout: Layout, signing_key: Ed25519PrivateKey) -> None:
    _device(layout)
    (layout.state / "identity").mkdir(parents=True)
    usb = tmp_path / "usb"
    usb.mkdir()
    for version in (RUNNING + 1, RUNNING + 2):
        update = _update(tmp_path, signing_key, version)
        update.rename(usb / update.name)
    writer = Writer(layout)
    lines: list[str] = []
    report = stick.process(layout, usb, lambda data: None, say=lines.append, write_slot=writer)
    assert [(r.sequence, r.result) for r in report.results] == [
        (RUNNING + 2, "installed"), (None, "refused")]
    assert report.system_installed == RUNNING + 2
    assert "must be > installed 1002" in report.results[1].detail
    assert len(writer.seen) == 1
    assert any("system 1002 verified: writing the inactive slot" in x for x in lines)


@pytest.mark.parametrize("value,ok", [("now", True), ("manual", True), ("03:30", True),
                                      ("24:00", False), ("3:30", False), ("later", False)])
def test_update_reboot_setting(value: str, ok: bool) -> None:
    doc = f'[system]\nupdate_reboot = "{value}"\n'.encode()
    if ok:
        settings.check_document(doc)
    else:
        with pytest.raises(FormatError, match="update_reboot"):
            settings.check_document(doc)


def test_build_refuses_missing_parts(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    from appliance.errors import UsageError
    with pytest.raises(UsageError, match="--root"):
        publish.build(tmp_path / "nope", tmp_path, tmp_path, 5, "x86_64-cpu", "amd64",
                      [signing_key], tmp_path, lambda line: None)
