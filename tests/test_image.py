"""Boot test: the built image (x86_64-cpu, or arm64 with IMAGE_TARGET=arm64) boots under qemu
(software emulation) and makes its own identity and TLS certificate; the client pins the
certificate whose fingerprint the console shows, the official OpenAI client gets models, a
chat, an embedding and a transcription over HTTPS through a port forward (clear HTTP is not
served there), the status appears on the serial console, and the guest opens no connection of
its own (checked in a capture of its network traffic). USB sticks are then attached to the
running guest (qemu usb-storage through QMP): one with demo-2, which goes live without a
reboot behind its self-test, one with a validly signed demo-3 whose self-test fails, after
which the device falls back to 2 by itself (the client is answered throughout); one with a
control document that adds an API key and revokes the built-in one, and one with that
document replayed beside a wrongly signed one. Each stick gets a signed receipt, verified
here. When a boot test fails it prints what the guest's units wrote on the console.

    make image-test [TARGET=arm64]        (builds the image first)
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import PROJECT, free_port, run_tool
from rebundle import failing_copy

from appliance.bundle import keys, receipt
from appliance.image.build import gpt_partitions

pytestmark = pytest.mark.image
TARGET = os.environ.get("IMAGE_TARGET", "x86_64-cpu")
IMAGE = PROJECT / "out" / "image" / f"{TARGET}.img"
MACHINES = {  # qemu binary, machine, UEFI firmware code + variables (Debian's OVMF and AAVMF)
    "x86_64-cpu": ("qemu-system-x86_64", "q35", Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
                   Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),
    "arm64": ("qemu-system-aarch64", "virt", Path("/usr/share/AAVMF/AAVMF_CODE.fd"),
              Path("/usr/share/AAVMF/AAVMF_VARS.fd")),
}
READY_TIMEOUT = 2400  # seconds; Python and three engines start slowly under TCG
GUEST_MAC = bytes.fromhex("525400123456")


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path, Path]]:
    if not IMAGE.exists():
        pytest.fail(f"{IMAGE} is missing: run `make image TARGET={TARGET}` first")
    qemu_binary, machine, firmware, variables = MACHINES[TARGET]
    work = tmp_path_factory.mktemp("boot")
    vars_fd = work / "vars.fd"
    shutil.copy(variables, vars_fd)
    port, plain = free_port(), free_port()
    serial, pcap, qmp = work / "serial.log", work / "net.pcap", work / "qmp.sock"
    started = time.monotonic()
    qemu = subprocess.Popen([
        qemu_binary, "-machine", machine, "-accel", "tcg", "-cpu", "max", "-smp", "2",
        "-m", "3072", "-snapshot", "-no-reboot", "-display", "none", "-monitor", "none",
        "-qmp", f"unix:{qmp},server=on,wait=off", "-device", "qemu-xhci,id=xhci",
        "-serial", f"file:{serial}",
        "-drive", f"if=pflash,format=raw,readonly=on,file={firmware}",
        "-drive", f"if=pflash,format=raw,file={vars_fd}",
        "-drive", f"file={IMAGE},format=raw,if=virtio",
        # restrict=on: the guest reaches nothing, only the forwarded port reaches it
        "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:8443,"
                   f"hostfwd=tcp:127.0.0.1:{plain}-:8080",
        "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC.hex(':')}",
        "-object", f"filter-dump,id=d0,netdev=n0,file={pcap}",
    ])
    base = f"https://127.0.0.1:{port}"
    GUEST["qmp"], GUEST["cert"] = qmp, work / "device.crt"
    PORTS["plain"] = plain
    try:
        while time.monotonic() - started < READY_TIMEOUT:
            assert qemu.poll() is None, serial.read_text(errors="replace")[-3000:]
            try:
                if _pin(serial, port, work / "device.crt") and httpx.get(
                        f"{base}/healthz", timeout=5, verify=_pinned()).status_code == 200:
                    break
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(5)
        else:
            raise AssertionError("not ready: " + serial.read_text(errors="replace")[-3000:])
        print(f"boot to ready: {time.monotonic() - started:.0f} s")
        key = (IMAGE.parent / f"{TARGET}.api-key").read_text().strip()
        yield base, key, serial, pcap
    finally:
        qemu.terminate()
        try:
            qemu.wait(timeout=30)
        except subprocess.TimeoutExpired:
            qemu.kill()


GUEST: dict[str, Path] = {}
PORTS: dict[str, int] = {}
FINGERPRINT = re.compile(r"certificate sha256 ((?:[0-9A-F]{2}:){31}[0-9A-F]{2})")


def _pin(serial: Path, port: int, cert: Path) -> bool:
    """What an owner does: take the certificate the device presents and keep it only if its
    fingerprint is the one the console shows. Then every client verifies against it."""
    if cert.exists():
        return True
    shown = FINGERPRINT.search(serial.read_text(errors="replace"))
    if shown is None:
        return False
    pem = ssl.get_server_certificate(("127.0.0.1", port), timeout=10)  # unverified: compared
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
    assert ":".join(re.findall("..", digest)) == shown.group(1), "the device shows another key"
    cert.write_text(pem)
    return True


def _pinned() -> ssl.SSLContext:
    # the certificate names 127.0.0.1 too, so the host name is checked as well
    return ssl.create_default_context(cafile=str(GUEST["cert"]))


def _client(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=600,
                         http_client=httpx.Client(verify=_pinned(), timeout=600))
OUR_UNITS = ("appliance-", "appliance.service", "stick ", "self-test", "demo ", "bundle ")


@pytest.fixture(autouse=True)
def _explain_failures(request: pytest.FixtureRequest,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """When a boot test fails, print what the guest's units said: their warnings and errors
    reach the serial console (journald forwards them) with their own console lines."""
    yield
    report = getattr(request.node, "report_call", None)
    serial = next(iter(tmp_path_factory.getbasetemp().glob("boot*/serial.log")), None)
    if report is not None and report.failed and serial is not None:
        lines = serial.read_text(errors="replace").splitlines()
        ours = [line for line in lines if any(u in line for u in OUR_UNITS)]
        print("\n--- the guest's units said ---\n" + "\n".join(ours[-200:]))
        print("--- last lines of the console ---\n" + "\n".join(lines[-60:]))


def test_openai_client_against_the_guest(guest: tuple[str, str, Path, Path],
                                         tmp_path: Path) -> None:
    base, key, _, _ = guest
    client = _client(base, key)
    ids = {m.id for m in client.models.list()}
    assert ids == {"smollm2-135m-instruct", "all-minilm-l6-v2", "whisper-tiny.en"}
    chat = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=4,
                                          messages=[{"role": "user", "content": "Hi"}])
    assert chat.usage and chat.usage.completion_tokens >= 1
    emb = client.embeddings.create(model="all-minilm-l6-v2", input="hello")
    assert len(emb.data[0].embedding) == 384
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(wav),
                    "The weather today is sunny with a light breeze."], check=True)
    with wav.open("rb") as f:
        text = client.audio.transcriptions.create(model="whisper-tiny.en", file=f).text
    assert "sunny" in text.lower() and "breeze" in text.lower(), text
    with pytest.raises(openai.AuthenticationError):
        _client(base, "wrong").models.list()
    # without the pin the certificate is not trusted; clear HTTP is not served on the LAN
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0).models.list()
    with pytest.raises(httpx.HTTPError):
        httpx.get(base.replace("https:", "http:") + "/healthz", timeout=10)
    with pytest.raises(httpx.HTTPError):  # the loopback listener is the guest's own
        httpx.get(f"http://127.0.0.1:{PORTS['plain']}/healthz", timeout=10)


def test_status_on_the_console(guest: tuple[str, str, Path, Path]) -> None:
    _, _, serial, _ = guest
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        log = serial.read_text(errors="replace")
        if "health ok" in log:
            break
        time.sleep(2)
    assert "bundle demo: active 1" in log and "health ok" in log, log[-3000:]
    assert re.search(r"device: [0-9a-f]{64}", log) and FINGERPRINT.search(log), log[-3000:]


def _qmp(commands: list[str]) -> None:
    """Human monitor commands through qemu's QMP socket (attach a USB stick at run time)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(str(GUEST["qmp"]))
        reader = sock.makefile("r")
        reader.readline()  # greeting
        for message in [{"execute": "qmp_capabilities"}] + [
                {"execute": "human-monitor-command", "arguments": {"command-line": c}}
                for c in commands]:
            sock.sendall(json.dumps(message).encode() + b"\n")
            while True:
                reply = json.loads(reader.readline())
                if "event" not in reply:
                    break
            assert "error" not in reply, reply
            # a monitor command answers with nothing or "OK" when it worked, else with why
            assert str(reply.get("return", "")).strip() in ("", "{}", "OK"), reply


def _stick(files: list[Path], work: Path, name: str) -> Path:
    """A FAT file system image holding some files, as a stick formatted without partitions."""
    image = work / f"{name}.img"
    size_kib = sum(f.stat().st_size for f in files) // 1024 + 32 * 1024
    subprocess.run(["mkfs.vfat", "-C", "-n", name.upper()[:11], str(image), str(size_kib)],
                   check=True, capture_output=True)
    for f in files:
        subprocess.run(["mcopy", "-i", str(image), str(f), "::/"], check=True)
    return image


def _plug(image: Path, name: str) -> None:
    # writable (the receipt), and not behind -snapshot: the test reads the receipt back
    _qmp([f"drive_add 0 if=none,id={name},file={image},format=raw,snapshot=off",
          f"device_add usb-storage,bus=xhci.0,drive={name},id={name}dev"])


def _receipts(image: Path, into: Path) -> list[dict[str, Any]]:
    """The receipts on a stick image, each verified (signature and device id)."""
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mcopy", "-s", "-n", "-i", str(image), f"::/{receipt.FOLDER}", str(into)],
                   check=True, capture_output=True)
    return [receipt.verify(p.read_bytes(), p.name).body
            for p in sorted((into / receipt.FOLDER).glob("*.json"))]


class _Load:
    """A client that keeps asking while a stick is processed: failures and who answered."""

    def __init__(self, base: str, key: str) -> None:
        self.client = _client(base, key)
        self.failures: list[str] = []
        self.fingerprints: list[str] = []

    def ask(self) -> str:
        try:
            r = self.client.chat.completions.create(
                model="smollm2-135m-instruct", max_tokens=2,
                messages=[{"role": "user", "content": "Hi"}])
            self.client.embeddings.create(model="all-minilm-l6-v2", input="hello")
            self.fingerprints.append(r.system_fingerprint or "")
            return r.system_fingerprint or ""
        except openai.APIError as exc:
            self.failures.append(repr(exc))
            return ""


def _count(serial: Path, text: str) -> int:
    return serial.read_text(errors="replace").count(text)


def _wait_serial(serial: Path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = serial.read_text(errors="replace")
        if text in log:
            return log
        time.sleep(3)
    raise AssertionError(f"{text!r} never appeared on the console")


@pytest.fixture(scope="module")
def sticks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """demo-2 signed by the image's publisher key, and a validly signed demo-3 whose chat
    self-test cannot pass."""
    work = tmp_path_factory.mktemp("sticks")
    key = IMAGE.parent / f"{TARGET}-signing.key"
    built = run_tool("build", work, "bundle", str(PROJECT / "bundles/demo.toml"), "--key",
                     str(key), "--out", str(work / "out"), "--cache",
                     str(PROJECT / ".cache" / "bundle"), "--sequence", "2")
    assert built.returncode == 0, built.stderr
    scratch = work / "scratch"
    pub = work / "k.pub"
    pub.write_bytes(keys.public_pem(keys.load_private(key).public_key()))
    assert run_tool("ctl", scratch, "keys", "add", str(pub)).returncode == 0
    assert run_tool("ctl", scratch, "bundle", "import",
                    str(work / "out/demo-2.bundle")).returncode == 0
    bad = failing_copy(scratch, key, 3, work / "out")
    return {"good": _stick([work / "out/demo-2.bundle"], work, "good"),
            "bad": _stick([bad], work, "bad")}


def test_usb_stick_goes_live_without_a_reboot(guest: tuple[str, str, Path, Path],
                                              sticks: dict[str, Path]) -> None:
    """udev, the import unit, the verified install, the swap and the self-test: the client
    ends up answered by sequence 2 and keeps being answered throughout."""
    base, key, serial, _ = guest
    load = _Load(base, key)
    load.ask()
    plugged = time.monotonic()
    _plug(sticks["good"], "good")
    deadline = plugged + 1800
    while not load.ask().endswith("-demo-2"):
        assert time.monotonic() < deadline, "sequence 2 never answered"
        time.sleep(2)
    live = time.monotonic() - plugged
    log = _wait_serial(serial, "demo 2: self-test passed", 600)
    print(f"stick to sequence 2 answering under TCG: {live:.0f} s; "
          f"{len(load.fingerprints)} answers, {len(load.failures)} failed")
    assert re.search(r"stick sd[a-z]+: demo-2\.bundle: imported demo sequence 2, on trial", log)
    assert load.failures == []


def test_usb_stick_failing_its_self_test_falls_back(guest: tuple[str, str, Path, Path],
                                                    sticks: dict[str, Path]) -> None:
    base, key, serial, _ = guest
    load = _Load(base, key)
    _plug(sticks["bad"], "bad")
    deadline = time.monotonic() + 1800
    while "demo 3: self-test FAILED" not in serial.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the trial of 3 never ended"
        load.ask()
        time.sleep(2)
    log = serial.read_text(errors="replace")
    assert "demo-3.bundle: imported demo sequence 3, on trial" in log
    assert "Zanzibar" in log and "back to 2" in log
    for _ in range(3):
        assert load.ask().endswith("-demo-2")
    assert load.failures == []
    assert not any(f.endswith("-demo-3") for f in load.fingerprints)


@pytest.fixture(scope="module")
def control_sticks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """A control document signed by the image's publisher key that adds the key "field" and
    revokes the built-in "owner"; on a second stick, the same document again (a replay) and
    a document with a higher sequence signed by a key the device does not trust."""
    work = tmp_path_factory.mktemp("control")
    new_key = "sk-appliance-" + secrets.token_urlsafe(32)
    spec = work / "fleet.toml"
    for sequence, signer in ((1, IMAGE.parent / f"{TARGET}-signing.key"),
                             (2, work / "stranger.key")):
        if sequence == 2:
            assert run_tool("build", work, "keygen", "--out", str(work / "stranger")
                            ).returncode == 0
        spec.write_text(f'name = "fleet"\nsequence = {sequence}\n'
                        f'[[actions]]\naction = "apikey-add"\nname = "field{sequence}"\n'
                        f'key = "{new_key}"\n'
                        '[[actions]]\naction = "apikey-revoke"\nname = "owner"\n')
        built = run_tool("build", work, "control", str(spec), "--key", str(signer), "--out",
                         str(work / f"out{sequence}"))
        assert built.returncode == 0, built.stderr
    first, forged = work / "out1/fleet-1.control", work / "out2/fleet-2.control"
    return {"key": new_key, "work": work, "apply": _stick([first], work, "ctl"),
            "replay": _stick([first, forged], work, "replay")}


def test_control_stick_swaps_the_api_keys_and_leaves_a_receipt(
        guest: tuple[str, str, Path, Path], control_sticks: dict[str, Path | str]) -> None:
    base, key, serial, _ = guest
    new_key = str(control_sticks["key"])
    receipts = _count(serial, "the stick can be removed")
    _plug(Path(control_sticks["apply"]), "ctl")
    log = _wait_serial(serial, "fleet-1.control: applied control fleet 1", 600)
    deadline = time.monotonic() + 300
    while _count(serial, "the stick can be removed") == receipts:  # the bundle sticks' too
        assert time.monotonic() < deadline, "no receipt for the control stick"
        time.sleep(3)
    log = serial.read_text(errors="replace")
    assert "API key field1 added; API key owner revoked" in log
    deadline = time.monotonic() + 60
    while True:  # the service takes the new keys without a restart (checked once a second)
        try:
            _client(base, key).models.list()
        except openai.AuthenticationError:
            break
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(2)
    assert len(list(_client(base, new_key).models.list())) == 3
    [body] = _receipts(Path(control_sticks["apply"]), Path(control_sticks["work"]) / "r1")
    assert body["results"] == [{"file": "fleet-1.control", "kind": "control",
                                "result": "applied", "name": "fleet", "sequence": 1,
                                "detail": "API key field1 added; API key owner revoked"}]
    shown = FINGERPRINT.search(log)
    assert shown and body["certificate_sha256"] == shown.group(1)
    assert body["status"]["api_keys"] == ["field1"]
    pinned = GUEST["cert"].read_bytes()
    crt = Path(control_sticks["work"]) / "r1" / receipt.FOLDER / f"{body['device']}.crt"
    assert ssl.PEM_cert_to_DER_cert(crt.read_text()) == ssl.PEM_cert_to_DER_cert(
        pinned.decode())
    table = run_tool("build", Path(control_sticks["work"]), "receipts",
                     str(Path(control_sticks["work"]) / "r1"))
    assert table.returncode == 0 and str(body["device"])[:16] in table.stdout, table.stdout


def test_replayed_or_wrongly_signed_control_is_refused(
        guest: tuple[str, str, Path, Path], control_sticks: dict[str, Path | str]) -> None:
    base, _, serial, _ = guest
    before = _count(serial, "the stick can be removed")
    _plug(Path(control_sticks["replay"]), "replay")
    deadline = time.monotonic() + 600
    while _count(serial, "the stick can be removed") == before:
        assert time.monotonic() < deadline, "no receipt for the second control stick"
        time.sleep(3)
    log = serial.read_text(errors="replace")
    assert "fleet-1.control: refused: control fleet 1 is not newer than 1" in log
    assert "fleet-2.control: refused: 0 trusted signature(s), 1 required" in log
    [body] = _receipts(Path(control_sticks["replay"]), Path(control_sticks["work"]) / "r2")
    assert [r["result"] for r in body["results"]] == ["refused", "refused"]
    assert len(list(_client(base, str(control_sticks["key"])).models.list())) == 3


MDNS = ("224.0.0.251", "ff02::fb")


def _guest_traffic(pcap: Path) -> tuple[list[str], int]:
    """Connections the guest started (TCP SYN without ACK; UDP other than DHCP, DHCPv6 and
    mDNS to its multicast group), over IPv4 and IPv6; and how many mDNS packets it sent."""
    data = pcap.read_bytes()
    found, mdns, pos = [], 0, 24  # pcap global header
    while pos + 16 <= len(data):
        incl = struct.unpack("<I", data[pos + 8:pos + 12])[0]
        frame = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        if frame[6:12] != GUEST_MAC:
            continue
        if frame[12:14] == b"\x08\x00" and len(frame) >= 34:
            ihl = (frame[14] & 0x0F) * 4
            proto, dst, l4 = frame[23], str(ipaddress.IPv4Address(frame[30:34])), frame[14 + ihl:]
        elif frame[12:14] == b"\x86\xdd" and len(frame) >= 54:
            proto, dst, l4 = frame[20], str(ipaddress.IPv6Address(frame[38:54])), frame[54:]
        else:
            continue
        if proto == 6 and len(l4) >= 14 and l4[13] & 0x02 and not l4[13] & 0x10:
            found.append(f"tcp to {dst}:{struct.unpack('>H', l4[2:4])[0]}")
        elif proto == 17 and len(l4) >= 4:
            port = struct.unpack(">H", l4[2:4])[0]
            if port == 5353 and dst in MDNS:
                mdns += 1
            elif port not in (67, 547):
                found.append(f"udp to {dst}:{port}")
    return found, mdns


def test_guest_opens_no_connection(guest: tuple[str, str, Path, Path]) -> None:
    *_, pcap = guest
    assert pcap.stat().st_size > 24
    found, mdns = _guest_traffic(pcap)
    assert found == []
    assert mdns > 0  # systemd-resolved announced appliance.local on the LAN


def test_file_systems_are_clean_and_dated_by_the_build() -> None:
    """e2fsck finds nothing after the inode times were settled, and the times are the build's
    (SOURCE_DATE_EPOCH), not the clock of the build host."""
    epoch = json.loads((IMAGE.parent / f"{TARGET}.manifest.json").read_text())[
        "source_date_epoch"]
    manifest = json.loads((IMAGE.parent / f"{TARGET}.manifest.json").read_text())
    parts = gpt_partitions(IMAGE)
    # ESP, slot A (this version), slot B (empty until a system update), data
    assert list(parts) == ["esp", f"appliance_{manifest['system_version']}", "_empty", "data"]
    esp, root, empty, data = parts.values()
    assert esp[0] == 34 and root[0] > esp[1] and empty[0] > root[1] and data[0] > empty[1]
    assert empty[1] - empty[0] == root[1] - root[0]
    for first, _ in (root, data):
        check = subprocess.run(["e2fsck", "-fn", f"{IMAGE}?offset={first * 512}"],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    stat = subprocess.run(["debugfs", "-R", "stat /etc/hostname",
                           f"{IMAGE}?offset={root[0] * 512}"], capture_output=True, text=True)
    for field in ("ctime", "atime", "mtime"):
        assert f"{field}: 0x{epoch:08x}:" in stat.stdout, stat.stdout
