"""Changing the device's mutable configuration (trust, API keys, settings, control marks) as
a whole: a change is made in a copy of the live folder, synced, and goes live with one
rename of the `config` link. A crash at any point leaves the old folder or the new one live,
never a mix; a half-made copy is removed by the next change.

Callers hold the store lock (`Store.locked()`), which serialises every change of the device.
"""

from __future__ import annotations

import contextlib
import grp
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.device.layout import Layout
from appliance.errors import StoreError
from appliance.faults import checkpoint
from appliance.fsutil import atomic_symlink, fsync_dir

_GENERATION = re.compile(r"config\.([0-9]{1,12})")
SERVICE_GROUP = "appliance"
# the service reads these (as group `appliance`); keys and marks stay root's
SHARED = ("appliance.toml", "api-keys")


def generation(layout: Layout) -> int:
    """The live generation number; 0 while the seed is read as it is."""
    try:
        target = os.readlink(layout.config_link)
    except FileNotFoundError:
        return 0
    found = _GENERATION.fullmatch(target)
    if found is None:
        raise StoreError(f"{layout.config_link} points at {target!r}, not a config generation")
    return int(found.group(1))


@contextmanager
def change(layout: Layout) -> Iterator[Path]:
    """Yield a copy of the live configuration to edit; it goes live when the block ends
    without an error, and is thrown away otherwise."""
    state = layout.state
    state.mkdir(parents=True, exist_ok=True)
    live = layout.config_dir
    number = generation(layout) + 1
    new = state / f"config.{number}"
    shutil.rmtree(new, ignore_errors=True)  # a copy left by a crash before its rename
    if live.is_dir():
        shutil.copytree(live, new, symlinks=False)
    else:
        new.mkdir()
    try:
        yield new
        _seal(new)
        checkpoint("config staged")
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    atomic_symlink(new.name, layout.config_link)
    checkpoint("config live")
    for old in state.iterdir():
        found = _GENERATION.fullmatch(old.name)
        if found is not None and int(found.group(1)) != number:
            shutil.rmtree(old, ignore_errors=True)


def _seal(folder: Path) -> None:
    """Modes and ownership as the service needs them, then everything synced."""
    folder.chmod(0o750)
    gid = _service_gid()
    for sub, dirs, files in os.walk(folder):
        for name in files:
            path = Path(sub) / name
            shared = path.parent == folder and name in SHARED
            public = path.parent.name == "trust"  # keys and policy: `status` reads them
            path.chmod(0o640 if shared else 0o644 if public else 0o600)
            if shared and gid is not None:
                os.chown(path, -1, gid)
            with path.open("rb") as f:
                os.fsync(f.fileno())
        for name in dirs:
            (Path(sub) / name).chmod(0o755 if name == "trust" else 0o700)
        fsync_dir(Path(sub))
    if gid is not None:
        os.chown(folder, -1, gid)


def _service_gid() -> int | None:
    # no such group on a development machine, and only root may give a file to it
    with contextlib.suppress(KeyError):
        gid = grp.getgrnam(SERVICE_GROUP).gr_gid
        return gid if os.geteuid() == 0 else None
    return None
