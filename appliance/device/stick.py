"""A USB stick, the sealed device's only way in and out: control documents first (a trust
rotation must apply before the bundles its new keys signed), then a system update (the newest
`*.system`: verified, then written to the inactive slot; the next boot tries it), then model
bundles; then, once their trials have ended, a receipt signed by the device is written back
onto the stick.

Nothing on the stick is executed or followed: only regular files at its top named *.control,
*.system or *.bundle are read, each verified before anything changes. The one thing written is a new
file in `appliance-receipts/` (and the device certificate beside it, for pinning), opened with
O_NOFOLLOW | O_EXCL relative to that folder, which must be a real folder.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.bundle import control as ctl
from appliance.bundle import receipt
from appliance.bundle import system as sy
from appliance.device import apikeys, control, identity, install, system, tlscert, trial
from appliance.device.layout import Layout
from appliance.device.store import Store
from appliance.errors import AlreadyInstalled, ApplianceError, StoreError

_SEQUENCE = re.compile(r"(.*)-([0-9]{1,18})\.(control|bundle|system)")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
MAX_FILES = 64  # of each kind on one stick: a stick of junk costs seconds, not hours


@dataclass(frozen=True)
class StickResult:
    """One file of a stick: what was done with it, or why it was refused."""

    file: str
    kind: str                       # control, system or model
    result: str                     # applied, installed, imported, present or refused
    detail: str = ""
    name: str | None = None
    sequence: int | None = None
    settings_changed: bool = False


@dataclass
class StickReport:
    results: list[StickResult] = field(default_factory=list)
    receipt: str | None = None      # the file written on the stick
    receipt_error: str | None = None
    passed_over: int = 0            # files not looked at (links, odd names, too many)

    @property
    def settings_changed(self) -> bool:
        return any(r.settings_changed for r in self.results)

    @property
    def system_installed(self) -> int | None:
        """The system version written to the inactive slot, if one was."""
        done = [r.sequence for r in self.results if r.kind == "system" and r.result == "installed"]
        return done[0] if done else None


def _order(path: Path) -> tuple[str, int, str]:
    found = _SEQUENCE.fullmatch(path.name)
    return (found.group(1), int(found.group(2)), "") if found else (path.name, 0, path.name)


def _files(folder: Path, suffix: str) -> tuple[list[Path], int]:
    """The regular files named *suffix at the top of the stick, at most MAX_FILES, with
    plain names (a name reaches the console and the audit log); and how many were passed over."""
    found: list[Path] = []
    passed_over = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.endswith(suffix):
                continue
            if (len(found) >= MAX_FILES or not SAFE_NAME.fullmatch(entry.name)
                    or not entry.is_file(follow_symlinks=False)):
                passed_over += 1
                continue
            found.append(Path(entry.path))
    return sorted(found, key=_order), passed_over


def process(layout: Layout, folder: Path, check_settings: control.SettingsCheck,
            wait: float = 0.0, say: Callable[[str], None] = lambda line: None,
            writable: Callable[[], None] = lambda: None,
            write_slot: system.Runner = system.start_sysupdate) -> StickReport:
    """Apply a stick's control documents, install its system update, import its bundles, wait
    up to `wait` seconds for their trials to end, and write the receipt (`writable` is called
    first: the stick is read-only until then). `say` gets one line per file as it is done."""
    report = StickReport()
    device = identity.device_id(layout) or ""
    controls, skipped = _files(folder, ctl.SUFFIX)
    updates, more = _files(folder, sy.SUFFIX)
    bundles, rest = _files(folder, ".bundle")
    report.passed_over = skipped + more + rest
    if report.passed_over:
        say(f"{report.passed_over} file(s) passed over: links, odd names, or more than "
            f"{MAX_FILES} of a kind")
    for path in controls:
        try:
            applied = control.apply_file(path, layout, device, check_settings)
        except ApplianceError as exc:
            result = StickResult(path.name, "control", "refused", exc.message)
        else:
            c = applied.control
            result = StickResult(path.name, "control", "applied", "; ".join(applied.done),
                                 c.name, c.sequence, applied.settings_changed)
        report.results.append(result)
        say(_line(result))
    # the newest first: once it is in, an older one on the same stick is a rollback
    for path in sorted(updates, key=_order, reverse=True):
        result = _system(layout, path, say, write_slot)
        report.results.append(result)
        say(_line(result))
    for path in bundles:
        try:
            inst = install.import_bundle(path, layout)
        except AlreadyInstalled as exc:  # a stick left in, at the next boot
            result = StickResult(path.name, "model", "present", exc.message)
        except ApplianceError as exc:
            result = StickResult(path.name, "model", "refused", exc.message)
        else:
            result = StickResult(path.name, "model", "imported", "on trial", inst.name,
                                 inst.sequence)
        report.results.append(result)
        say(_line(result))
    _wait_for_trials(layout, wait)
    try:
        writable()
        report.receipt = write_receipt(layout, folder, report.results, report.passed_over)
    except (ApplianceError, OSError) as exc:
        report.receipt_error = getattr(exc, "message", None) or str(exc)
    return report


def _system(layout: Layout, path: Path, say: Callable[[str], None],
            write_slot: system.Runner) -> StickResult:
    try:
        version, seconds = system.install_file(path, layout, say, write_slot)
    except ApplianceError as exc:
        return StickResult(path.name, "system", "refused", exc.message)
    return StickResult(path.name, "system", "installed",
                       f"written in {seconds} s; the next boot tries it", sy.CHANNEL, version)


def _line(r: StickResult) -> str:
    if r.result == "refused":
        return f"{r.file}: refused: {r.detail}"
    if r.result == "present":
        return f"{r.file}: {r.detail}"
    if r.kind == "system":
        return f"{r.file}: installed system {r.sequence}: {r.detail}"
    if r.kind == "control":
        return f"{r.file}: applied control {r.name} {r.sequence}: {r.detail}"
    return f"{r.file}: imported {r.name} sequence {r.sequence}, on trial"


def _wait_for_trials(layout: Layout, wait: float) -> None:
    """Until no active sequence is on trial (the trial unit settles them), or `wait` ends."""
    store = Store(layout)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not any(store.trial(n) is not None and store.trial(n) == store.active(n)
                   for n in store.names()):
            return
        time.sleep(1)


def status_summary(layout: Layout) -> dict[str, Any]:
    """What the receipt says of the device now: bundles and their self-tests, trust, keys."""
    store = Store(layout)
    bundles = []
    for name in store.names():
        active, on_trial = store.active(name), store.trial(name)
        entry: dict[str, Any] = {
            "name": name, "active": active, "last_good": store.last_good(name),
            "on_trial": on_trial is not None and on_trial == active, "bad": store.bad(name)}
        if active is not None:
            try:
                result = trial.read_result(layout, name, active)
            except ApplianceError as exc:
                result = {"passed": False, "error": exc.message}
            entry["self_test"] = result
        bundles.append(entry)
    trust = layout.trust
    return {"bundles": bundles, "system": system.status(layout),
            "trust": {"version": trust.version(), "threshold": trust.threshold(),
                      "keys": sorted(trust.keys())},
            "api_keys": sorted(apikeys.read(layout.api_keys))}


def write_receipt(layout: Layout, stick: Path, results: list[StickResult],
                  passed_over: int = 0) -> str:
    me = identity.load(layout)
    entries, head = layout.audit.head()
    body: dict[str, Any] = {
        "format": receipt.FORMAT, "device": me.id,
        "public_key": base64.b64encode(me.public_raw).decode(),
        "written": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "software": __version__,
        "results": [{k: v for k, v in asdict(r).items() if v not in (None, "", False)}
                    for r in results],
        "passed_over": passed_over,
        "status": status_summary(layout),
        "audit": {"entries": entries, "head": head},
    }
    cert = layout.identity / "tls.crt"
    if cert.exists():
        body["certificate_sha256"] = tlscert.fingerprint(cert)
    data = receipt.sign(body, me.key)
    folder = _receipt_folder(stick)
    try:
        stem = f"{me.id}-{body['written'].replace(':', '')}"
        for n in range(100):  # two sticks in one second: a new name, never an overwrite
            candidate = f"{stem}-{n:02d}.json"
            try:
                _create(folder, candidate, data)
                break
            except FileExistsError:
                continue
        else:
            raise StoreError("the stick holds 100 receipts of this second already")
        if cert.exists():
            _replace(folder, f"{me.id}.crt", cert.read_bytes())
        os.fsync(folder)
    finally:
        os.close(folder)
    return f"{receipt.FOLDER}/{candidate}"


def _receipt_folder(stick: Path) -> int:
    """A descriptor of the stick's receipt folder, made if missing; never through a link."""
    top = os.open(stick, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(receipt.FOLDER, 0o755, dir_fd=top)
        try:
            return os.open(receipt.FOLDER, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                           dir_fd=top)
        except OSError as exc:
            raise StoreError(f"{receipt.FOLDER} on the stick is not a folder "
                             "(a link or a file): no receipt written") from exc
    finally:
        os.close(top)


def _create(folder: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                 dir_fd=folder)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace(folder: int, name: str, data: bytes) -> None:
    tmp = f".{name}.new"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=folder)
    _create(folder, tmp, data)
    os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
