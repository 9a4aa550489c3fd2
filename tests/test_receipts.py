"""A stick in, a signed receipt out: the order a stick is processed in, what is (and is not)
written onto it, and the host's fleet table over receipts of several devices."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_tool
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from factory import Factory, snapshot
from test_control import add_key, document, pem

from appliance.bundle import receipt
from appliance.device import apikeys, identity, stick
from appliance.device.layout import Layout
from appliance.publish import fleet
from appliance.serve.settings import check_document


def _device(layout: Layout) -> str:
    apikeys.create(layout, "builtin")
    identity.ensure(layout)
    device = identity.device_id(layout)
    assert device is not None
    return device


def test_control_first_then_bundles_then_a_receipt(installed: Layout, tmp_path: Path,
                                                   factory: Factory,
                                                   signing_key: Ed25519PrivateKey) -> None:
    device = _device(installed)
    fresh = Ed25519PrivateKey.generate()
    usb = tmp_path / "usb"
    usb.mkdir()
    # the bundle is signed by the new key only: it imports because the rotation goes first
    (factory.bundle(sequence=2, keys=[fresh])).rename(usb / "demo-2.bundle")
    document(usb, [{"action": "trust-rotate", "keys": [pem(signing_key), pem(fresh)],
                    "threshold": 1, "version": 2}, add_key()], [signing_key, fresh])
    replay = document(tmp_path, [add_key("eve")], [signing_key], name="old", sequence=1)
    (usb / "zz-link.control").symlink_to(replay)
    (usb / "notes.txt").write_text("not ours")
    lines: list[str] = []
    report = stick.process(installed, usb, check_document, say=lines.append)
    assert [r.result for r in report.results] == ["applied", "imported"]
    assert lines[0].startswith("1 file(s) passed over")  # the link
    assert lines[1].startswith("fleet-1.control: applied control fleet 1")
    assert lines[2] == "demo-2.bundle: imported demo sequence 2, on trial"
    assert report.receipt is not None and report.receipt.startswith("appliance-receipts/")
    found = receipt.verify((usb / report.receipt).read_bytes(), "receipt")
    assert found.device == device
    body = found.body
    assert [r["result"] for r in body["results"]] == ["applied", "imported"]
    assert body["status"]["bundles"][0]["active"] == 2
    assert body["status"]["bundles"][0]["on_trial"] is True
    assert body["status"]["trust"]["version"] == 2
    assert body["status"]["api_keys"] == ["alice", "builtin"]
    assert body["audit"] == {"entries": installed.audit.head()[0],
                             "head": installed.audit.head()[1]}
    # nothing else on the stick changed
    assert sorted(p.name for p in usb.iterdir()) == [
        "appliance-receipts", "demo-2.bundle", "fleet-1.control", "notes.txt", "zz-link.control"]


def test_a_stick_of_junk_costs_little(installed: Layout, tmp_path: Path) -> None:
    """Many files, and names that would write to the console: at most MAX_FILES of a kind are
    looked at, odd names are passed over unprinted, the receipt says how many."""
    _device(installed)
    usb = tmp_path / "usb"
    usb.mkdir()
    for n in range(stick.MAX_FILES + 10):
        (usb / f"junk-{n}.control").write_bytes(b"junk")
    (usb / "\x1b[2Jreceipt written.control").write_bytes(b"junk")
    lines: list[str] = []
    report = stick.process(installed, usb, check_document, say=lines.append)
    assert len(report.results) == stick.MAX_FILES
    assert report.passed_over == 11
    assert not any("\x1b" in line for line in lines)
    assert report.receipt is not None
    body = receipt.verify((usb / report.receipt).read_bytes(), "r").body
    assert body["passed_over"] == 11


def test_a_second_stick_is_refused_and_says_so(installed: Layout, tmp_path: Path,
                                               signing_key: Ed25519PrivateKey) -> None:
    _device(installed)
    usb = tmp_path / "usb"
    usb.mkdir()
    doc = document(usb, [add_key()], [signing_key])
    stick.process(installed, usb, check_document)
    forged = document(tmp_path, [add_key("mallory")], [Ed25519PrivateKey.generate()],
                      name="fleet", sequence=2)
    forged.rename(usb / forged.name)
    report = stick.process(installed, usb, check_document)
    assert [(r.file, r.result) for r in report.results] == [
        ("fleet-1.control", "refused"), ("fleet-2.control", "refused")]
    assert "not newer than 1" in report.results[0].detail  # the replay of doc
    assert "trusted signature" in report.results[1].detail
    receipts = sorted((usb / receipt.FOLDER).glob("*.json"))
    assert len(receipts) == 2 and doc.exists()
    body = receipt.verify(receipts[-1].read_bytes(), "r").body
    assert "mallory" not in body["status"]["api_keys"]
    assert {r["result"] for r in body["results"]} == {"refused"}


def test_a_stick_left_in_finds_its_bundle_present(installed: Layout, tmp_path: Path,
                                                  factory: Factory) -> None:
    """At the next boot the same stick is read again: its bundle is reported as installed
    already, not as a refused rollback, and the import exits 0 (no failed unit each boot)."""
    _device(installed)
    usb = tmp_path / "usb"
    usb.mkdir()
    factory.bundle(sequence=2).rename(usb / "demo-2.bundle")
    assert [r.result for r in stick.process(installed, usb, check_document).results] == [
        "imported"]
    lines: list[str] = []
    report = stick.process(installed, usb, check_document, say=lines.append)
    assert [(r.result, r.detail) for r in report.results] == [
        ("present", "bundle demo sequence 2 is already installed (active)")]
    assert lines == ["demo-2.bundle: bundle demo sequence 2 is already installed (active)"]
    body = receipt.verify((usb / str(report.receipt)).read_bytes(), "r").body
    assert body["results"][0]["result"] == "present"
    assert "0 done, 0 refused" in fleet.table(fleet.Fleet({body["device"]: body}))
    again = run_tool("ctl", installed.root, "usb-import", "--dir", str(usb), "--wait", "0")
    assert again.returncode == 0, again.stderr
    assert "already installed (active)" in again.stdout


def test_no_receipt_through_a_link(installed: Layout, tmp_path: Path,
                                   signing_key: Ed25519PrivateKey) -> None:
    _device(installed)
    usb, elsewhere = tmp_path / "usb", tmp_path / "elsewhere"
    usb.mkdir()
    elsewhere.mkdir()
    (usb / receipt.FOLDER).symlink_to(elsewhere)
    document(usb, [add_key()], [signing_key])
    before = snapshot(elsewhere)
    report = stick.process(installed, usb, check_document)
    assert report.receipt is None
    assert report.receipt_error is not None and "not a folder" in report.receipt_error
    assert snapshot(elsewhere) == before == {}


def test_the_fleet_table(tmp_path: Path, factory: Factory, signing_key: Ed25519PrivateKey,
                         installed: Layout) -> None:
    seen = tmp_path / "collected"
    seen.mkdir()
    devices = []
    for n in range(2):
        layout = Layout(tmp_path / f"device{n}")
        layout.trust.path.mkdir(parents=True)
        for src in installed.trust.path.glob("*.pub"):
            (layout.trust.path / src.name).write_bytes(src.read_bytes())
        devices.append(_device(layout))
        usb = tmp_path / f"usb{n}"
        usb.mkdir()
        if n == 1:
            document(usb, [{"action": "apikey-revoke", "name": "nobody"}], [signing_key])
        stick.process(layout, usb, check_document)
        (usb / receipt.FOLDER).rename(seen / f"stick{n}")
    silent = "c" * 64
    roster = tmp_path / "fleet.txt"
    roster.write_text(f"{devices[0]} kitchen\n{devices[1]} garage\n{silent} attic\n")
    found = fleet.scan(seen, fleet.read_fleet(roster))
    text = fleet.table(found)
    assert found.unseen == [silent]
    assert "attic" in text and "no receipt seen" in text
    assert "nobody" in text  # the refused revocation, with its reason
    assert not found.invalid
    # a receipt altered on the way, and one whose key is not the device it names
    one = next((seen / "stick0").glob("*.json"))
    doc = json.loads(one.read_text())
    doc["receipt"]["status"]["api_keys"].append("eve")
    (seen / "altered.json").write_text(json.dumps(doc))
    doc = json.loads(one.read_text())
    doc["receipt"]["device"] = devices[1]
    (seen / "impostor.json").write_text(json.dumps(doc))
    result = run_tool("build", tmp_path, "receipts", str(seen), "--fleet", str(roster))
    assert result.returncode == 1
    assert "INVALID altered.json: the signature does not match" in result.stdout
    assert "INVALID impostor.json: the device id is not the hash" in result.stdout
    assert "kitchen" in result.stdout and "garage" in result.stdout


def test_usb_import_cli_prints_a_line_per_file_and_the_receipt(
        installed: Layout, tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    _device(installed)
    usb = tmp_path / "usb"
    usb.mkdir()
    document(usb, [add_key()], [signing_key])
    result = run_tool("ctl", installed.root, "usb-import", "--dir", str(usb))
    assert result.returncode == 0, result.stderr
    assert f"stick {usb}: fleet-1.control: applied control fleet 1: API key alice added" \
        in result.stdout
    assert "receipt appliance-receipts/" in result.stdout
    again = run_tool("ctl", installed.root, "usb-import", "--dir", str(usb))
    assert again.returncode == 1
    assert "fleet-1.control: refused: control fleet 1 is not newer than 1" in again.stderr


def test_init_makes_the_identity_once(tmp_path: Path) -> None:
    """First boot: the seed is copied to the state partition, the identity and the TLS pair
    are made; every later boot changes nothing and prints the same id and fingerprint."""
    root = tmp_path / "root"
    seed = Layout(root).seed
    (seed / "trust").mkdir(parents=True)
    (seed / "appliance.toml").write_text('[server]\nhost = "0.0.0.0"\nport = 8443\n')
    first = run_tool("ctl", root, "init")
    assert first.returncode == 0, first.stderr
    assert "configuration copied from" in first.stdout
    assert "made the device identity" in first.stdout
    layout = Layout(root)
    assert layout.config_dir == layout.config_link
    assert (layout.config_dir / "appliance.toml").read_text() == (
        seed / "appliance.toml").read_text()
    assert oct((layout.identity / "device.key").stat().st_mode & 0o777) == "0o600"
    again = run_tool("ctl", root, "init")
    assert again.returncode == 0
    assert again.stdout.splitlines() == first.stdout.splitlines()[-2:]
    device = identity.device_id(layout)
    assert again.stdout.startswith(f"device {device}\ncertificate sha256 ")
    status = json.loads(run_tool("ctl", root, "status", "--json").stdout)["device"]
    assert status["id"] == device and again.stdout.split()[-1] == status["certificate_sha256"]
