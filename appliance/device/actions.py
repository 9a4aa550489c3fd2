"""What an owner does to the device: activate or roll back a bundle, change the trust store,
mount a USB stick. Each action takes the store lock and is audited here, whoever calls it
(the CLI and the USB unit; signed control documents are in `appliance.device.control`)."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.device import config, trial
from appliance.device.layout import Layout
from appliance.device.store import Store
from appliance.device.trust import TrustStore
from appliance.errors import StoreError, UsageError


def activate(layout: Layout, name: str, sequence: int, force: bool = False) -> int | None:
    """Make an installed sequence active (on trial unless it is the last good one); returns
    the one it replaced. A sequence that failed its self-test needs `force`."""
    return _switch(layout, "activate", name, sequence, force)


def rollback(layout: Layout, name: str) -> tuple[int, int | None]:
    """Back to the last good sequence, or else the one before the active one: (now active,
    was active)."""
    target = Store(layout).rollback_target(name)
    return target, _switch(layout, "rollback", name, target, force=False)


def _switch(layout: Layout, event: str, name: str, sequence: int, force: bool) -> int | None:
    store = Store(layout)
    with store.locked():
        store.cleanup()
        if sequence in store.bad(name) and not force:
            raise UsageError(f"bundle {name} sequence {sequence} failed its self-test",
                             hint="activate it anyway with --force (it goes on trial again)")
        on_trial = trial.begin(store, name, sequence)  # first: never live untested
        previous = store.activate(name, sequence)
        layout.audit.append(event, bundle=name, sequence=sequence, previous=previous,
                            trial=on_trial, forced=force, result="ok")
    return previous


def trust_key(layout: Layout, pub_file: Path) -> str:
    with Store(layout).locked():
        with config.change(layout) as new:
            kid = TrustStore(new / "trust").add(pub_file)
        layout.audit.append("key-add", keyid=kid, result="ok")
    return kid


def distrust_key(layout: Layout, kid_prefix: str) -> str:
    with Store(layout).locked():
        with config.change(layout) as new:
            kid = TrustStore(new / "trust").remove(kid_prefix)
        layout.audit.append("key-remove", keyid=kid, result="ok")
    return kid


def set_threshold(layout: Layout, value: int) -> None:
    with Store(layout).locked():
        with config.change(layout) as new:
            TrustStore(new / "trust").set_threshold(value)
        layout.audit.append("key-threshold", threshold=value, result="ok")


@dataclass(frozen=True)
class Mounted:
    path: Path
    device: Path

    def writable(self) -> None:
        """Remount read-write, only for the receipt, which `appliance.device.stick` writes
        into its one folder without following links."""
        done = subprocess.run(["mount", "-o", f"remount,rw,{STICK_OPTIONS}", str(self.path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise StoreError(f"cannot write to {self.device}: {done.stderr.strip()}")


STICK_OPTIONS = "nosuid,nodev,noexec,noatime"
STICK_TYPES = "vfat,exfat"  # what sticks are formatted with; no other kernel parser is exposed


@contextmanager
def mounted(device: Path) -> Iterator[Mounted]:
    """Mount a stick read-only, nosuid, nodev, noexec. The mount point is only ever removed
    empty: if the stick cannot be unmounted, nothing on it is deleted."""
    mnt = Path(tempfile.mkdtemp(prefix="appliance-usb-"))
    done = subprocess.run(["mount", "-t", STICK_TYPES, "-o", f"ro,{STICK_OPTIONS}",
                           str(device), str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        mnt.rmdir()
        raise StoreError(f"cannot mount {device}: {done.stderr.strip()}")
    try:
        yield Mounted(mnt, device)
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        with contextlib.suppress(OSError):
            mnt.rmdir()
