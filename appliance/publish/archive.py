"""Writing a signed archive (bundle, control document, system update): the manifest, its
signature, then the payload files, into a temporary file that is synced and renamed into place,
so a reader of `target` never sees half an archive."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from appliance.bundle.tarformat import TarWriter
from appliance.errors import StoreError


def write_signed(target: Path, created: datetime, manifest: bytes, sig: bytes,
                 files: Sequence[tuple[str, int, Path]] = (),
                 progress: Callable[[str], None] | None = None) -> Path:
    """Write `target` from the signed manifest and the (name in the archive, size, source)
    files; on failure nothing is left behind and StoreError names the target."""
    tmp = target.with_name(f".{target.name}.tmp")
    total, done = sum(size for _, size, _ in files), 0
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as out:
            tar = TarWriter(out, int(created.timestamp()))
            tar.add_bytes("manifest.toml", manifest)
            tar.add_bytes("manifest.sig", sig)
            for name, size, source in files:
                with source.open("rb") as src:
                    tar.add_stream(name, size, src)
                done += size
                if progress:
                    progress(f"write {name} ({done * 100 // max(total, 1)}%)")
            tar.close()
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):  # e.g. its folder is not one
            tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {target}: {exc.strerror or exc}") from exc
    return target
