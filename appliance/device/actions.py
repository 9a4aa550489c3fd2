"""What an owner does to the device: activate or roll back a bundle, change the trust store,
import a USB stick. Each action takes the store lock and is audited here, whoever calls it
(the CLI, the USB unit, and later signed control documents)."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.device import config, install, trial
from appliance.device.layout import Layout
from appliance.device.store import Installed, Store
from appliance.device.trust import TrustStore
from appliance.errors import ApplianceError, StoreError, UsageError


def activate(layout: Layout, name: str, sequence: int, force: bool = False) -> int | None:
    """Make an installed sequence active (on trial unless it is the last good one); returns
    the one it replaced. A sequence that failed its self-test needs `force`."""
    return _switch(layout, "activate", name, sequence, force)


def rollback(layout: Layout, name: str) -> tuple[int, int | None]:
    """Back to the last good sequence, or else the one before the active one: (now active,
    was active)."""
    store = Store(layout)
    good, current = store.last_good(name), store.active(name)
    target = good if good is not None and good != current else store.rollback_target(name)
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
class StickResult:
    """One file of a stick: what was imported, or why it was refused."""

    file: str
    imported: Installed | None = None
    error: str | None = None


def import_folder(layout: Layout, folder: Path) -> list[StickResult]:
    """Import the bundles at the top of a stick. Nothing on it is executed or followed: only
    regular files named *.bundle, each verified before anything is installed (and each import,
    accepted or refused, is audited by `install`)."""
    results = []
    for entry in sorted(folder.iterdir()):
        if entry.suffix != ".bundle" or entry.is_symlink() or not entry.is_file():
            continue
        try:
            results.append(StickResult(entry.name, install.import_bundle(entry, layout)))
        except ApplianceError as exc:
            results.append(StickResult(entry.name, error=exc.message))
    return results


def import_device(layout: Layout, device: Path) -> list[StickResult]:
    """Mount a stick read-only (nosuid, nodev, noexec), import it, unmount."""
    with mounted(device) as folder:
        return import_folder(layout, folder)


@contextmanager
def mounted(device: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="appliance-usb-") as mnt:
        done = subprocess.run(["mount", "-o", "ro,nosuid,nodev,noexec", str(device), mnt],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise StoreError(f"cannot mount {device}: {done.stderr.strip()}")
        try:
            yield Path(mnt)
        finally:
            subprocess.run(["umount", mnt], check=False)
