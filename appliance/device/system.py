"""Whole-system updates through A/B slots: our side of it. The writing and the boot counting are
systemd's (systemd-sysupdate, systemd-boot, systemd-bless-boot); this module does what they
leave to us, in this order:

    stage    verify a `.system` file completely (signature, target, version above the running
             one and the high-water mark) into `system/staging` on the data partition
    install  run sysupdate (appliance-sysupdate.service), which writes the inactive slot, the
             kernel and initrd, and last the boot entry `appliance_<v>+3-0.conf`; the next
             boot tries the new version
    check    on a counted boot (systemd-boot says so in LoaderBootCountPath): the service is up
             and every active bundle passed its self-test on the new system, or else this try
             failed (a definite self-test failure marks the version bad at once)
    settle   every boot: audit what happened to a pending version exactly once (good, or
             fallen back after its tries), and clear a write that a power cut interrupted

    var/lib/appliance/system/staging/{manifest.toml,manifest.sig,files/appliance_<v>.*}
    var/lib/appliance/system/state.json     {"pending": v, "from": running, "last_failed": v}
    var/lib/appliance/highwater/system.<channel>
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.bundle import system as sy
from appliance.device import install, trial
from appliance.device.layout import Layout
from appliance.device.store import Store
from appliance.errors import ApplianceError, FormatError, RollbackError, StoreError
from appliance.fsutil import atomic_write, fsync_dir
from appliance.strict import load_toml

SYSTEM_TOML = "usr/lib/appliance/system.toml"
# systemd-boot's vendor GUID: the variable exists only when the booted entry is counted
BOOT_COUNT_VAR = ("sys/firmware/efi/efivars/"
                  "LoaderBootCountPath-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f")
ENTRIES = "efi/loader/entries"
BLESS = "/usr/lib/systemd/systemd-bless-boot"
SYSUPDATE_UNIT = "appliance-sysupdate.service"
_ENTRY = re.compile(r"appliance_([0-9]{1,16})(?:\+([0-9]{1,3})(?:-([0-9]{1,3}))?)?\.conf")
_ROOT_ARG = re.compile(r"(?:^|\s)root=PARTLABEL=appliance_([0-9]{1,16})(?:\s|$)")


@dataclass(frozen=True)
class Running:
    """What the image says of itself (`/usr/lib/appliance/system.toml`, written at build)."""

    version: int
    target: str
    architecture: str
    channel: str


@dataclass(frozen=True)
class Entry:
    """A version's boot loader entry: counters as systemd-boot renames them."""

    version: int
    tries_left: int | None  # None: no counter, the version is good
    tries_done: int

    @property
    def state(self) -> str:
        if self.tries_left is None:
            return "good"
        return "bad" if self.tries_left == 0 else "trying"


def folder(layout: Layout) -> Path:
    return layout.state / "system"


def highwater_name(channel: str) -> str:
    # a dot never occurs in a bundle name, so this cannot collide with a model's mark
    return f"system.{channel}"


def running(layout: Layout) -> Running | None:
    """The running system, or None on an image without A/B slots (a vendor-flashed rootfs)."""
    path = layout.root / SYSTEM_TOML
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    doc = load_toml(data, str(path), 4096)
    out = Running(doc.req_integer("version", lo=1, hi=sy.MAX_VERSION),
                  doc.req_string("target", pattern=sy.TARGET),
                  doc.req_string("architecture", pattern=sy.ARCHITECTURE),
                  doc.req_string("channel"))
    doc.done()
    return out


def entries(layout: Layout) -> dict[int, Entry]:
    """The appliance entries on the ESP by version (empty when the ESP is not readable)."""
    out: dict[int, Entry] = {}
    with contextlib.suppress(OSError):
        for name in os.listdir(layout.root / ENTRIES):
            found = _ENTRY.fullmatch(name)
            if found:
                left = None if found.group(2) is None else int(found.group(2))
                out[int(found.group(1))] = Entry(int(found.group(1)), left,
                                                 int(found.group(3) or 0))
    return out


def counted_boot(layout: Layout) -> bool:
    """Whether systemd-boot counts this boot (a version on trial)."""
    return (layout.root / BOOT_COUNT_VAR).exists()


def booted_slot(layout: Layout) -> int | None:
    """The version whose slot the kernel mounted as root (`root=PARTLABEL=appliance_<v>`)."""
    try:
        found = _ROOT_ARG.search((layout.root / "proc/cmdline").read_text())
    except OSError:
        return None
    return int(found.group(1)) if found else None


def read_state(layout: Layout) -> dict[str, Any]:
    try:
        state = json.loads((folder(layout) / "state.json").read_bytes()[:65536])
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def write_state(layout: Layout, state: dict[str, Any]) -> None:
    folder(layout).mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(folder(layout) / "state.json", json.dumps(state, sort_keys=True).encode())


# --- stage and install (the USB import, as root, under the store lock) -----------------------

@dataclass(frozen=True)
class Staged:
    manifest: sy.SystemManifest
    signers: list[str]
    path: Path  # the files sysupdate reads


def stage(path: Path, layout: Layout, store: Store) -> Staged:
    """Verify a system update completely into `system/staging`. Nothing outside that folder
    changes; any failure leaves no staging behind. Call with the store lock held."""
    me = running(layout)
    if me is None:
        raise StoreError("this device has no A/B system slots: it is updated by reflashing",
                         hint="system updates are for the disk image targets")
    with install.open_file(path) as src:
        reader = install.BundleReader(src, layout)
        manifest_bytes, sig_bytes, signers = reader.signed()
        m = sy.parse(manifest_bytes)
        install.check_expiry(m.name, m.sequence, m.expires)
        if (m.target, m.architecture, m.name) != (me.target, me.architecture, me.channel):
            raise FormatError(f"system update {m.name} {m.sequence} is for {m.target} "
                              f"({m.architecture}, channel {m.name}); this device runs "
                              f"{me.target} ({me.architecture}, channel {me.channel})")
        mark = max(store.highwater(highwater_name(m.name)), me.version)
        if m.sequence <= mark:
            raise RollbackError(f"system {m.name} version {m.sequence} must be > installed "
                                f"{mark}", hint="a newer system update is needed")
        top = folder(layout)
        top.mkdir(mode=0o700, parents=True, exist_ok=True)
        discard_staging(layout)
        free = shutil.disk_usage(top).free
        if free < m.total_size + install.SPACE_MARGIN:
            raise StoreError(f"system update needs {m.total_size >> 20} MiB, {free >> 20} MiB "
                             f"free on the data partition",
                             hint="remove old model sequences (`appliance-ctl bundle prune`)")
        tmp = top / f".staging-{m.sequence}"
        tmp.mkdir(mode=0o700)
        try:
            reader.copy_payload(m, tmp)
            for name, data in (("manifest.toml", manifest_bytes), ("manifest.sig", sig_bytes)):
                with open(tmp / name, "xb") as f:
                    f.write(data)
                    os.fsync(f.fileno())
            fsync_dir(tmp / "files")
            fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    os.replace(tmp, top / "staging")
    fsync_dir(top)
    layout.audit.append("system-verified", file=path.name, version=m.sequence,
                        target=m.target, signers=signers, result="ok")
    return Staged(m, signers, top / "staging" / "files")


def discard_staging(layout: Layout) -> None:
    top = folder(layout)
    for leftover in [top / "staging", *top.glob(".staging-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def check_running(layout: Layout) -> Running:
    """sysupdate protects the slot of the version os-release names (`ProtectVersion=%A`): it
    must be the slot the kernel booted from, or the update could overwrite the running root."""
    me = running(layout)
    slot = booted_slot(layout)
    if me is None or slot != me.version:
        raise StoreError(f"the running root (slot appliance_{slot}) is not the version the "
                         f"system says it is ({me.version if me else 'none'}): not updating")
    return me


Runner = Callable[[], None]


def start_sysupdate() -> None:
    """Write the staged version with systemd-sysupdate, in a unit of its own (the import's
    sandbox cannot write the ESP or the disk); systemctl waits for the oneshot to end."""
    result = subprocess.run(["systemctl", "start", SYSUPDATE_UNIT], capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise StoreError(f"systemd-sysupdate failed: "
                         f"{(result.stderr or result.stdout).strip()[-400:]}",
                         hint=f"journalctl -u {SYSUPDATE_UNIT}")


def install_staged(layout: Layout, store: Store, staged: Staged,
                   write: Runner = start_sysupdate) -> int:
    """Write the staged version to the inactive slot; the next boot tries it. Returns the
    seconds the write took. Call with the store lock held."""
    me = check_running(layout)
    m = staged.manifest
    started = time.monotonic()
    try:
        write()
    except ApplianceError:
        discard_staging(layout)  # audited by install_file, with the file's name
        raise
    seconds = round(time.monotonic() - started)
    store.raise_highwater(highwater_name(m.name), m.sequence)
    write_state(layout, {**read_state(layout), "pending": m.sequence, "from": me.version})
    discard_staging(layout)
    layout.audit.append("system-install", version=m.sequence, slot=f"appliance_{m.sequence}",
                        seconds=seconds, result="ok")
    return seconds


def install_file(path: Path, layout: Layout, say: Callable[[str], None],
                 write: Runner = start_sysupdate) -> tuple[int, int]:
    """Stage and write one `.system` file under the store lock: (version, seconds the write
    took). Any refusal is audited once, naming the file, and raised."""
    store = Store(layout)
    try:
        with store.locked():
            staged = stage(path, layout, store)
            say(f"{path.name}: system {staged.manifest.sequence} verified: writing the "
                "inactive slot")
            return staged.manifest.sequence, install_staged(layout, store, staged, write)
    except ApplianceError as exc:
        with contextlib.suppress(ApplianceError):
            layout.audit.append("system-import", file=path.name, result="rejected",
                                error=type(exc).__name__, detail=exc.message)
        raise


# --- check (a counted boot) and settle (every boot) ------------------------------------------

@dataclass(frozen=True)
class Verdict:
    good: bool
    definite: bool  # a self-test failed: no point in trying this version again
    detail: str


def judge(layout: Layout, health: Callable[[], str | None], service_failed: Callable[[], bool]
          ) -> Verdict | None:
    """One look at the service: None while it is still coming up."""
    if service_failed():
        return Verdict(False, False, "appliance.service failed")
    status = health()
    store = Store(layout)
    results = []
    for inst in store.active_bundles():
        try:
            report = trial.read_result(layout, inst.name, inst.sequence)
        except StoreError as exc:
            return Verdict(False, True, exc.message)
        if report is None:
            return None
        results.append(report)
    failed = [f"{r['bundle']} {r['sequence']}" for r in results if not r["passed"]]
    if failed:
        return Verdict(False, True, f"self-test failed: {', '.join(failed)}")
    if status != "ok":
        return None
    return Verdict(True, False, f"healthy; {len(results)} bundle(s) passed their self-tests")


def check(layout: Layout, timeout: float, health: Callable[[], str | None],
          service_failed: Callable[[], bool], bless: Callable[[str], None],
          say: Callable[[str], None], poll: float = 5.0) -> bool:
    """Decide a counted boot: True when the version may be marked good (systemd-bless-boot
    does that once boot-complete.target is reached). A definite failure marks it bad at once;
    a timeout or a failed service costs one of its tries."""
    me = running(layout)
    if me is None or not counted_boot(layout):
        say("system check: not a counted boot, nothing to decide")
        return True
    say(f"system {me.version}: checking (health and self-test)")
    deadline = time.monotonic() + timeout
    while True:
        verdict = judge(layout, health, service_failed)
        if verdict is None and time.monotonic() >= deadline:
            verdict = Verdict(False, False, f"not healthy within {timeout:.0f} s")
        if verdict is not None:
            break
        time.sleep(poll)
    layout.audit.append("system-check", version=me.version, passed=verdict.good,
                        detail=verdict.detail, result="ok" if verdict.good else "rejected")
    if not verdict.good and verdict.definite:
        bless("bad")
    say(f"system {me.version}: {'good' if verdict.good else 'FAILED'}: {verdict.detail}")
    return verdict.good


def settle(layout: Layout, say: Callable[[str], None]) -> list[str]:
    """Every boot: say once what became of a pending version, raise the mark to a good running
    version, and clear a staging that a power cut left. Returns the audited events."""
    me = running(layout)
    if me is None:
        return []
    events: list[str] = []
    store = Store(layout)
    with store.locked():
        state = read_state(layout)
        found = entries(layout)
        mine = found.get(me.version)
        if mine is not None and mine.state == "good":
            store.raise_highwater(highwater_name(me.channel), me.version)
        if (folder(layout) / "staging").exists() or any(folder(layout).glob(".staging-*")):
            discard_staging(layout)
            layout.audit.append("system-interrupted", result="rejected",
                                detail="a staged update was not written to its slot; plug "
                                       "the stick in again")
            events.append("system-interrupted")
            say("system: an update was interrupted before its slot was written; plug the "
                "stick in again")
        pending = state.get("pending")
        if isinstance(pending, int):
            if pending == me.version and mine is not None and mine.state == "good":
                layout.audit.append("system-good", version=pending, result="ok")
                events.append("system-good")
                say(f"system {pending}: good")
                state.pop("pending", None)
            elif pending != me.version:
                entry = found.get(pending)
                if entry is None or entry.state == "bad":
                    why = "tries exhausted or marked bad" if entry else "its entry is gone"
                    layout.audit.append("system-fallback", version=pending, running=me.version,
                                        detail=why, result="rejected")
                    events.append("system-fallback")
                    say(f"system {pending}: failed ({why}); running {me.version} again")
                    state.pop("pending", None)
                    state["last_failed"] = pending
            if state != read_state(layout):
                write_state(layout, state)
    now = status(layout) or {}
    say(f"system {me.version}: running from slot {now.get('slot')}, {now.get('state')}")
    return events


def status(layout: Layout) -> dict[str, Any] | None:
    """The system's part of `appliance-ctl status` and of a receipt."""
    me = running(layout)
    if me is None:
        return None
    state = read_state(layout)
    found = entries(layout)
    mine = found.get(me.version)
    out: dict[str, Any] = {"version": me.version, "target": me.target,
                           "slot": f"appliance_{booted_slot(layout)}",
                           # the ESP is root's: the unprivileged console status cannot tell
                           "state": mine.state if mine else "unknown (the ESP is root's)",
                           "installed": sorted(found)}
    if mine is not None and mine.state == "trying":
        out["tries_done"] = mine.tries_done
    for key in ("pending", "last_failed"):
        if isinstance(state.get(key), int):
            out[key] = state[key]
    return out


def health_probe(port: int) -> Callable[[], str | None]:
    """The service's own answer on the loopback listener (`/healthz`: ok, degraded, ...)."""
    def probe() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                body = json.loads(r.read(65536))
        except (OSError, ValueError, urllib.error.URLError):
            return None
        return body.get("status") if isinstance(body, dict) else None
    return probe


def unit_failed(unit: str) -> Callable[[], bool]:
    def failed() -> bool:
        out = subprocess.run(["systemctl", "is-failed", "--quiet", unit], capture_output=True)
        return out.returncode == 0
    return failed


def bless(verdict: str) -> None:
    subprocess.run([BLESS, verdict], capture_output=True)
