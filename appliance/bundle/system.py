"""System updates: a whole new root for the inactive A/B slot, in the bundle format (manifest.toml
+ manifest.sig, then the payload), told apart by `kind = "system"` in the signed manifest.

    format = 1
    kind = "system"
    name = "appliance-os"          # the update channel: its sequence must rise (no replay)
    sequence = 1796040184          # = the IMAGE_VERSION of the system inside
    created = 2026-11-30T12:00:00Z
    expires = ...                  # optional
    [system]
    target = "x86_64-cpu"          # the image target it was built for; a device takes only its own
    architecture = "amd64"
    [[files]]                      # exactly these four, named by the version
    path = "appliance_1796040184.root.gz"   # the root file system (ext4), gzip
    size = ...
    sha256 = "..."
    # appliance_<v>.vmlinuz, appliance_<v>.initrd, appliance_<v>.conf (the boot loader entry)

The same trust store signs it as signs model bundles (one trust root). The device verifies it
completely into a staging folder before systemd-sysupdate writes a byte to the inactive slot
(appliance/device/system.py); sysupdate itself verifies nothing of a local source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from appliance.bundle import manifest as mf
from appliance.errors import FormatError
from appliance.strict import load_toml

KIND = "system"
SUFFIX = ".system"
CHANNEL = "appliance-os"
PARTS = ("root.gz", "vmlinuz", "initrd", "conf")  # what one version is made of, in write order
TARGET = re.compile(r"[a-z0-9][a-z0-9_-]{0,40}")
ARCHITECTURE = re.compile(r"amd64|arm64")
MAX_VERSION = 10**15  # a version is a number sysupdate compares; far above any epoch second


def part_name(version: int, part: str) -> str:
    return f"appliance_{version}.{part}"


@dataclass(frozen=True)
class SystemManifest:
    name: str
    sequence: int
    created: datetime
    target: str
    architecture: str
    files: tuple[mf.FileEntry, ...]
    expires: datetime | None = None
    by_path: dict[str, mf.FileEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_path", {f.path: f for f in self.files})

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.sequence}{SUFFIX}"

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_toml(self) -> bytes:
        import tomli_w  # host side only

        doc: dict[str, Any] = {"format": mf.FORMAT_VERSION, "kind": KIND, "name": self.name,
                               "sequence": self.sequence, "created": self.created}
        if self.expires is not None:
            doc["expires"] = self.expires
        doc["system"] = {"target": self.target, "architecture": self.architecture}
        doc["files"] = [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files]
        return tomli_w.dumps(doc).encode()


def parse(data: bytes, origin: str = "manifest.toml") -> SystemManifest:
    """Parse a system manifest strictly. Raises FormatError naming the key at fault."""
    doc = load_toml(data, origin, mf.MAX_MANIFEST)
    fmt = doc.req_integer("format", lo=1, hi=1000)
    if fmt != mf.FORMAT_VERSION:
        raise FormatError(f"{origin}: format {fmt} is not supported "
                          f"(this device reads {mf.FORMAT_VERSION})")
    kind = doc.string("kind", required=False, max_len=16) or "model"
    if kind != KIND:
        raise doc.fail("kind", f"is {kind!r}: a {SUFFIX} file must hold a system update")
    name = doc.req_string("name", pattern=mf.NAME)
    sequence = doc.req_integer("sequence", lo=1, hi=MAX_VERSION)
    created = doc.timestamp("created")
    expires = doc.timestamp("expires", required=False)
    system = doc.table("system")
    assert system is not None and created is not None
    target = system.req_string("target", pattern=TARGET)
    architecture = system.req_string("architecture", pattern=ARCHITECTURE)
    system.done()
    files = tuple(mf.parse_file(f) for f in doc.tables("files", max_items=len(PARTS)))
    doc.done()
    wanted = sorted(part_name(sequence, p) for p in PARTS)
    if sorted(f.path for f in files) != wanted:
        raise FormatError(f"{origin}: a system update of version {sequence} holds exactly "
                          f"{', '.join(wanted)}")
    if expires is not None and expires <= created:
        raise FormatError(f"{origin}: expires is not after created")
    return SystemManifest(name, sequence, created, target, architecture, files, expires)


def boot_entry(version: int, architecture: str) -> str:
    """The systemd-boot Type #1 entry of one version: its kernel and initrd on the ESP, its root
    slot by GPT partition name (sysupdate names the slot it writes `appliance_<v>`). `panic=10`
    turns a kernel panic into a reboot, which costs the try systemd-boot already counted."""
    console = "ttyS0" if architecture == "amd64" else "ttyAMA0"
    return (f"title appliance {version}\nsort-key appliance\nversion {version}\n"
            f"linux /appliance/{part_name(version, 'vmlinuz')}\n"
            f"initrd /appliance/{part_name(version, 'initrd')}\n"
            f"options root=PARTLABEL=appliance_{version} ro console={console} quiet "
            "systemd.show_status=1 panic=10\n")
