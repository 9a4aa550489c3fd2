"""Building a signed system update from an image build's parts (host side): the root file
system of the new version, its kernel and initrd, and its boot loader entry, named for the
version and signed by the same keys as the model bundles."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.bundle import manifest as mf
from appliance.bundle import signing
from appliance.bundle import system as sy
from appliance.errors import UsageError
from appliance.publish.archive import write_signed
from appliance.publish.build import Log
from appliance.publish.fetch import sha256_file


def build(root: Path, kernel: Path, initrd: Path, version: int, target: str,
          architecture: str, keys: list[Ed25519PrivateKey], out_dir: Path, log: Log,
          valid_days: int = 0) -> Path:
    """Write `appliance-os-<version>.system` into out_dir and return its path. `root` is the
    ext4 image of the slot (gzipped here, reproducibly), `kernel` as the package ships it."""
    for what, path in (("root", root), ("kernel", kernel), ("initrd", initrd)):
        if not path.is_file():
            raise UsageError(f"--{what} {path}: no such file")
    if not 1 <= version <= sy.MAX_VERSION:
        raise UsageError(f"version {version} is out of range (1..{sy.MAX_VERSION})")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".system-") as tmp:
        parts = Path(tmp)
        log(f"compress {root.name} ({root.stat().st_size >> 20} MiB)")
        with root.open("rb") as src, open(parts / sy.part_name(version, "root.gz"), "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1,
                              mtime=0) as gz:
            shutil.copyfileobj(src, gz, 1 << 20)
        image = kernel.read_bytes()
        if image[:2] == b"\x1f\x8b":  # arm64 kernels ship gzipped; the EFI stub needs the Image
            image = gzip.decompress(image)
        (parts / sy.part_name(version, "vmlinuz")).write_bytes(image)
        shutil.copy(initrd, parts / sy.part_name(version, "initrd"))
        (parts / sy.part_name(version, "conf")).write_text(sy.boot_entry(version, architecture))
        files = tuple(mf.FileEntry(p.name, p.stat().st_size, sha256_file(p))
                      for p in sorted(parts.iterdir()))
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        created = (datetime.fromtimestamp(int(epoch), UTC) if epoch
                   else datetime.now(UTC).replace(microsecond=0))
        expires = created + timedelta(days=valid_days) if valid_days else None
        manifest = sy.SystemManifest(sy.CHANNEL, version, created, target, architecture, files,
                                     expires)
        data = manifest.to_toml()
        sy.parse(data)  # what we sign must be what a device accepts
        sig = signing.sign(data, keys)
        target_path = write_signed(out_dir / manifest.filename, created, data, sig,
                                   [(e.path, e.size, parts / e.path) for e in files])
    log(f"system update {target_path.name}: {target_path.stat().st_size >> 20} MiB")
    return target_path
