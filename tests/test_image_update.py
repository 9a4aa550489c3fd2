"""Whole-system updates in the booted image, under qemu TCG, with the real engines: a stick's
signed `.system` file is verified, written to the inactive slot by systemd-sysupdate, and tried
on the next boot with systemd-boot's boot counting; the appliance's own check decides, and
systemd-bless-boot or the spent tries do the rest. One guest lives through all of it, on a
qcow2 overlay of the built image with its own UEFI variables, rebooting inside one qemu:

    1. version V (the image as built) boots; a stick with V+1 installs, reboots, V+1 serves
       the OpenAI client and is marked good (downtime and times measured);
    2. a stick with V and V+1 again: both refused as replays, nothing written;
    3. a stick with V+2, whose service never starts: three tries, then V+1 boots by itself;
    4. a stick with V+3, and the power cut (qemu killed) while its slot is written: V+1 boots
       normally and the interrupted write is reported.

The versions after V are made from the image's own root slot (debugfs rewrites the version,
and for V+2 adds a drop-in that breaks the service), then signed with `appliance-build
system-update` and the image's publisher key, as an owner would.

    make image-test-update        (builds the image first; about 40 minutes on 2 cores)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import test_image as ti
from conftest import PROJECT, free_port, run_tool

from appliance.image.build import copy_sparse, gpt_partitions

pytestmark = pytest.mark.image
TARGET = "x86_64-cpu"
OUT = PROJECT / "out" / "image"
IMAGE = OUT / f"{TARGET}.img"
BOOT_TIMEOUT = 2400


@dataclass
class Guest:
    work: Path
    serial: Path
    base: str = ""
    key: str = ""
    qemu: subprocess.Popen[bytes] | None = None
    port: int = 0
    log_at: list[float] = field(default_factory=list)

    def start(self) -> None:
        """Boot (again) from the same overlay and UEFI variables: what the disk holds stays."""
        qemu_binary, machine, firmware, _ = ti.MACHINES[TARGET]
        self.port = self.port or free_port()
        qmp = self.work / "qmp.sock"
        qmp.unlink(missing_ok=True)
        self.serial.touch()  # qemu appends to it across restarts
        self.qemu = subprocess.Popen([
            qemu_binary, "-machine", machine, "-accel", "tcg", "-cpu", "max", "-smp", "2",
            "-m", "3072", "-display", "none", "-monitor", "none",
            "-qmp", f"unix:{qmp},server=on,wait=off", "-device", "qemu-xhci,id=xhci",
            # a hardware watchdog, as on a PC (iTCO there): a hung boot resets and spends a try
            "-device", "i6300esb", "-action", "watchdog=reset",
            "-chardev", f"file,id=s0,path={self.serial},append=on", "-serial", "chardev:s0",
            "-drive", f"if=pflash,format=raw,readonly=on,file={firmware}",
            "-drive", f"if=pflash,format=raw,file={self.work / 'vars.fd'}",
            "-drive", f"file={self.work / 'disk.qcow2'},format=qcow2,if=virtio",
            "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{self.port}-:8443",
            "-device", "virtio-net-pci,netdev=n0",
        ])
        ti.GUEST["qmp"] = qmp
        self.base = f"https://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """A power cut: the guest gets no chance to write anything more."""
        assert self.qemu is not None
        self.qemu.kill()
        self.qemu.wait(timeout=60)

    def log(self) -> str:
        return self.serial.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float, count: int = 1) -> float:
        """Seconds until `text` is on the console `count` times."""
        started = time.monotonic()
        while self.log().count(text) < count:
            assert self.qemu is not None and self.qemu.poll() is None, self.log()[-4000:]
            assert time.monotonic() - started < timeout, (
                f"{text!r} never appeared (x{count})\n" + self._ours())
            time.sleep(3)
        return time.monotonic() - started

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base}/healthz", timeout=5,
                             verify=ti._pinned()).status_code == 200
        except (httpx.HTTPError, OSError):
            return False

    def _ours(self) -> str:
        lines = self.log().splitlines()
        ours = [line for line in lines if any(u in line for u in (*ti.OUR_UNITS, "system",
                                                                    "sysupdate", "Boot"))]
        return "\n".join(ours[-150:]) + "\n--- last lines ---\n" + "\n".join(lines[-60:])


class Uptime:
    """Polls /healthz once a second; the longest gap between answers is the downtime."""

    def __init__(self, guest: Guest) -> None:
        self.guest, self.answered, self.stop = guest, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.guest.healthy():
                self.answered.append(time.monotonic())
            time.sleep(1)

    def downtime(self) -> float:
        self.stop.set()
        self.thread.join()
        gaps = [b - a for a, b in zip(self.answered, self.answered[1:], strict=False)]
        return max(gaps, default=0.0)


def _version() -> int:
    return int(json.loads((OUT / f"{TARGET}.manifest.json").read_text())["system_version"])


def _derive(work: Path, root: Path, version: int, broken: bool = False) -> Path:
    """The image's root slot as version `version` (and, broken, with a service that never
    starts), signed as an owner would sign it."""
    copy = work / f"root-{version}.ext4"
    subprocess.run(["cp", "--sparse=always", str(root), str(copy)], check=True)
    release = work / f"os-release-{version}"
    base = subprocess.run(["debugfs", "-R", "cat /usr/lib/os-release", str(root)],
                          capture_output=True, text=True, check=True).stdout
    release.write_text("".join(line + "\n" for line in base.splitlines()
                               if not line.startswith("IMAGE_VERSION="))
                       + f"IMAGE_VERSION={version}\n")
    toml = work / f"system-{version}.toml"
    toml.write_text(f'version = {version}\ntarget = "{TARGET}"\narchitecture = "amd64"\n'
                    'channel = "appliance-os"\n')
    script = ["rm /usr/lib/os-release", f"write {release} /usr/lib/os-release",
              "rm /usr/lib/appliance/system.toml",
              f"write {toml} /usr/lib/appliance/system.toml"]
    if broken:
        dropin = work / "broken.conf"
        dropin.write_text("[Service]\nExecStart=\nExecStart=/bin/false\n")
        script += ["mkdir /etc/systemd/system/appliance.service.d",
                   f"write {dropin} /etc/systemd/system/appliance.service.d/broken.conf"]
    commands = work / f"debugfs-{version}"
    commands.write_text("\n".join(script) + "\n")
    subprocess.run(["debugfs", "-w", "-f", str(commands), str(copy)], check=True,
                   capture_output=True)
    check = subprocess.run(["debugfs", "-R", "cat /usr/lib/appliance/system.toml", str(copy)],
                           capture_output=True, text=True, check=True)
    assert f"version = {version}" in check.stdout
    done = run_tool("build", work, "system-update", "--root", str(copy),
                    "--kernel", str(work / "vmlinuz"), "--initrd", str(work / "initrd"),
                    "--version", str(version), "--target", TARGET,
                    "--key", str(OUT / f"{TARGET}-signing.key"), "--out", str(work / "out"))
    assert done.returncode == 0, done.stderr
    copy.unlink()
    return work / "out" / f"appliance-os-{version}.system"


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    if not IMAGE.exists():
        pytest.fail(f"{IMAGE} is missing: run `make image TARGET={TARGET}` first")
    work = tmp_path_factory.mktemp("update")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(IMAGE),
                    str(work / "disk.qcow2")], check=True)
    shutil.copy(ti.MACHINES[TARGET][3], work / "vars.fd")
    g = Guest(work, work / "serial.log")
    g.start()
    try:
        started = time.monotonic()
        while True:
            try:  # the console shows the fingerprint before the service listens
                if ti._pin(g.serial, g.port, work / "device.crt"):
                    break
            except OSError:
                pass
            assert time.monotonic() - started < BOOT_TIMEOUT, g.log()[-3000:]
            time.sleep(5)
        ti.GUEST["cert"] = work / "device.crt"
        while not g.healthy():
            assert time.monotonic() - started < BOOT_TIMEOUT, g._ours()
            time.sleep(5)
        print(f"boot to ready: {time.monotonic() - started:.0f} s")
        g.key = (OUT / f"{TARGET}.api-key").read_text().strip()
        yield g
    finally:
        if g.qemu is not None and g.qemu.poll() is None:
            g.qemu.terminate()
            try:
                g.qemu.wait(timeout=30)
            except subprocess.TimeoutExpired:
                g.qemu.kill()


@pytest.fixture(scope="module")
def updates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("versions")
    v = _version()
    own = OUT / f"appliance-os-{v}.system"
    assert own.exists(), "the image build writes its own version as a system update"
    with tarfile.open(own) as tar:  # the kernel and initrd of the build, as the image has them
        for part in ("vmlinuz", "initrd"):
            member = tar.extractfile(f"appliance_{v}.{part}")
            assert member is not None
            (work / part).write_bytes(member.read())
    first, last = gpt_partitions(IMAGE)[f"appliance_{v}"]
    root = work / "root.ext4"
    copy_sparse(IMAGE, first * 512, (last - first + 1) * 512, root)
    made = {"own": own, "good": _derive(work, root, v + 1),
            "broken": _derive(work, root, v + 2, broken=True), "later": _derive(work, root, v + 3)}
    root.unlink()
    for name, path in made.items():
        print(f"system update {name}: {path.name}, {path.stat().st_size >> 20} MiB")
    return made


def _running(v: int) -> str:
    return f"system {v}: running from slot appliance_{v}, good"


def test_a_good_update_boots_serves_and_is_marked_good(guest: Guest,
                                                       updates: dict[str, Path]) -> None:
    v = _version()
    guest.wait_for(_running(v), 600)
    stick = ti._stick([updates["good"]], guest.work, "sysgood")
    uptime = Uptime(guest)
    plugged = time.monotonic()
    ti._plug(stick, "sysgood")
    guest.wait_for(f"installed system {v + 1}: written in", 3600)
    applied = time.monotonic() - plugged
    guest.wait_for(f"rebooting into system {v + 1}", 300)
    guest.wait_for(f"system {v + 1}: good", BOOT_TIMEOUT)
    guest.wait_for(_running(v + 1), 600)
    while not guest.healthy():
        time.sleep(2)
    downtime = uptime.downtime()
    total = time.monotonic() - plugged
    print(f"update {updates['good'].stat().st_size >> 20} MiB: verified and written in "
          f"{applied:.0f} s, service down {downtime:.0f} s, plug to marked good {total:.0f} s")
    log = guest.log()
    assert f"system {v + 1}: checking (health and self-test)" in log
    client = ti._client(guest.base, guest.key)
    chat = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=4,
                                          messages=[{"role": "user", "content": "Hi"}])
    assert chat.usage and chat.usage.completion_tokens >= 1
    # the first receipt: written before the reboot; the stick stayed in, so the new version
    # read it again and refused it as a replay (the second)
    first, *again = ti._receipts(stick, guest.work / "r-good")
    result = first["results"][0]
    assert (result["kind"], result["result"], result["sequence"]) == ("system", "installed",
                                                                      v + 1)
    assert first["status"]["system"]["pending"] == v + 1
    assert [r["results"][0]["result"] for r in again] == ["refused"] * len(again)


def test_replayed_updates_are_refused(guest: Guest, updates: dict[str, Path]) -> None:
    v = _version()
    stick = ti._stick([updates["own"], updates["good"]], guest.work, "sysold")
    receipts_before = guest.log().count("receipt")
    ti._plug(stick, "sysold")
    guest.wait_for("receipt", 900, count=receipts_before + 1)
    log = guest.log()
    for version in (v, v + 1):
        assert (f"appliance-os-{version}.system: refused: system appliance-os version "
                f"{version} must be > installed {v + 1}") in log
    receipts = ti._receipts(stick, guest.work / "r-old")
    assert [r["result"] for r in receipts[-1]["results"]] == ["refused", "refused"]
    assert receipts[-1]["status"]["system"]["version"] == v + 1
    assert guest.healthy()


def test_an_update_that_never_gets_healthy_falls_back(guest: Guest,
                                                      updates: dict[str, Path]) -> None:
    v = _version()
    stick = ti._stick([updates["broken"]], guest.work, "sysbad")
    started = time.monotonic()
    ti._plug(stick, "sysbad")
    guest.wait_for(f"installed system {v + 2}: written in", 3600)
    guest.wait_for(f"system {v + 2}: failed (tries exhausted or marked bad); running "
                   f"{v + 1} again", 3 * BOOT_TIMEOUT)
    guest.wait_for(_running(v + 1), 600, count=2)
    while not guest.healthy():
        time.sleep(2)
    print(f"broken update: plug to serving {v + 1} again {time.monotonic() - started:.0f} s")
    log = guest.log()
    assert log.count(f"system {v + 2}: FAILED: appliance.service failed") == 3
    client = ti._client(guest.base, guest.key)
    assert {m.id for m in client.models.list()} >= {"smollm2-135m-instruct"}


def test_a_power_cut_during_the_write_keeps_the_old_slot(guest: Guest,
                                                         updates: dict[str, Path]) -> None:
    v = _version()
    stick = ti._stick([updates["later"]], guest.work, "syscut")
    ti._plug(stick, "syscut")
    guest.wait_for(f"system {v + 3} verified: writing the inactive slot", 1800)
    # sysupdate says which file goes where as it starts writing the slot
    guest.wait_for(f"Acquiring /var/lib/appliance/system/staging/files/appliance_{v + 3}"
                   ".root.gz", 600)
    time.sleep(10)
    guest.kill()
    assert f"installed system {v + 3}" not in guest.log()
    subprocess.run(["qemu-img", "check", "-q", "-r", "all", str(guest.work / "disk.qcow2")],
                   check=False)
    booted = guest.log().count(_running(v + 1))
    guest.start()
    guest.wait_for("an update was interrupted before its slot was written", BOOT_TIMEOUT)
    guest.wait_for(_running(v + 1), 600, count=booted + 1)
    started = time.monotonic()
    while not guest.healthy():
        assert time.monotonic() - started < BOOT_TIMEOUT, guest._ours()
        time.sleep(3)
