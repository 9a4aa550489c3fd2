"""Verifying and installing a bundle on the device.

The order is the security argument:
1. the first two members must be manifest.toml and manifest.sig, both small;
2. the signatures are checked over the manifest's exact bytes against the trust store
   (threshold), before the manifest is parsed;
3. the manifest is parsed strictly, its expiry and sequence checked (anti-rollback) before a
   single payload byte is copied;
4. each payload member must be a regular file listed in the manifest, seen once, of exactly the
   declared size; it is hashed while it is copied into a staging folder and never read past that
   size;
5. only a complete, verified staging folder is fsynced, renamed into place and activated with
   one rename of the `current` link.
Any failure before step 5 leaves the store, the high-water mark and the active bundle as they were.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Protocol

from appliance.bundle import manifest as mf
from appliance.bundle import signing
from appliance.bundle.tarformat import Member, TarReader
from appliance.device import trial
from appliance.device.layout import Layout
from appliance.device.store import STAGING_PREFIX, Installed, Store
from appliance.errors import (
    AlreadyInstalled,
    ApplianceError,
    FormatError,
    IntegrityError,
    RollbackError,
    StoreError,
)
from appliance.faults import checkpoint
from appliance.fsutil import fsync_dir

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
SPACE_MARGIN = 64 * 1024 * 1024
_PICKLE_OPCODES = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_ZIP_MAGIC = b"PK\x03\x04"


class Payload(Protocol):
    """What a payload is checked against: a model or a system manifest."""

    @property
    def by_path(self) -> dict[str, mf.FileEntry]: ...

    @property
    def total_size(self) -> int: ...


@dataclass(frozen=True)
class Verified:
    manifest: mf.Manifest
    manifest_bytes: bytes
    sig_bytes: bytes
    signers: list[str]


def _sniff(path: str, head: bytes) -> None:
    """Refuse serialised Python objects whatever their file name says."""
    if head.startswith(_PICKLE_OPCODES) or head.startswith(_ZIP_MAGIC):
        raise FormatError(f"{path!r} is a pickle or zip archive; bundles never carry those")


class BundleReader:
    """One pass over a bundle file: authenticate the manifest, then stream the payload."""

    def __init__(self, src: BinaryIO, layout: Layout) -> None:
        self._tar = TarReader(src)
        self._members = self._tar.members()
        self._layout = layout

    def _next(self, expected: str) -> Member:
        member = next(self._members, None)
        if member is None or member.name != expected:
            found = "the end of the archive" if member is None else repr(member.name[:80])
            raise FormatError(f"bundle member {expected} expected, found {found}")
        return member

    def signed(self) -> tuple[bytes, bytes, list[str]]:
        """Steps 1-2: the manifest's raw bytes, its signatures, and the trusted signers."""
        manifest_bytes = self._tar.read_small(self._next("manifest.toml"), mf.MAX_MANIFEST,
                                              "manifest.toml")
        sig_bytes = self._tar.read_small(self._next("manifest.sig"), signing.MAX_SIG_FILE,
                                         "manifest.sig")
        trust = self._layout.trust
        signers = signing.verify(manifest_bytes, sig_bytes, trust.keys(), trust.threshold())
        return manifest_bytes, sig_bytes, signers

    def end(self) -> None:
        """A document without payload: nothing may follow its two members."""
        extra = next(self._members, None)
        if extra is not None:
            raise FormatError(f"member {extra.name[:80]!r} follows a control document")

    def authenticate(self, now: datetime | None = None) -> Verified:
        """Steps 1-3: signatures over the raw bytes first, then parse; raises on any failure."""
        manifest_bytes, sig_bytes, signers = self.signed()
        manifest = mf.parse(manifest_bytes)
        check_expiry(manifest.name, manifest.sequence, manifest.expires, now)
        return Verified(manifest, manifest_bytes, sig_bytes, signers)

    def copy_payload(self, manifest: Payload, dest: Path | None,
                     progress: Progress | None = None) -> None:
        """Step 4: verify every payload member; write it under `dest` when given."""
        seen: set[str] = set()
        done, total = 0, manifest.total_size
        for member in self._members:
            try:
                path = mf.check_path(member.name)
            except FormatError as exc:
                raise FormatError(f"bundle member rejected: {exc.message}", exc.hint) from None
            entry = manifest.by_path.get(path)
            if entry is None:
                raise FormatError(f"bundle member {path!r} is not listed in the manifest")
            if path in seen:
                raise FormatError(f"bundle member {path!r} appears twice")
            seen.add(path)
            if member.size != entry.size:
                raise IntegrityError(
                    f"{path!r} is {member.size} bytes in the archive, {entry.size} in the manifest"
                )
            digest = hashlib.sha256()
            out = None
            if dest is not None:
                target = dest / "files" / path
                target.parent.mkdir(parents=True, exist_ok=True)
                out = open(target, "xb")  # noqa: SIM115 - closed in finally
            try:
                first = True
                for chunk in self._tar.read_data(member, entry.size):
                    if first:
                        _sniff(path, chunk[:8])
                        first = False
                    digest.update(chunk)
                    if out is not None:
                        out.write(chunk)
                        checkpoint(f"copy {path}")
                    done += len(chunk)
                    if progress:
                        progress(done, total)
                if out is not None:
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                if out is not None:
                    out.close()
            if digest.hexdigest() != entry.sha256:
                raise IntegrityError(
                    f"{path!r} does not match its sha256 in the manifest",
                    hint="the bundle was damaged or altered; copy it again from the source",
                )
        missing = sorted(set(manifest.by_path) - seen)
        if missing:
            raise IntegrityError(f"bundle lacks {len(missing)} listed file(s), e.g. {missing[0]!r}")


def check_expiry(name: str, sequence: int, expires: datetime | None,
                 now: datetime | None = None) -> None:
    if expires is not None and expires <= (now or datetime.now(UTC)):
        raise RollbackError(f"bundle {name} {sequence} expired {expires:%Y-%m-%d}",
                            hint="ask the publisher for a current bundle")


def open_file(path: Path) -> BinaryIO:
    """Open a regular file for reading, never through a link (on a stick a link could point
    anywhere) and never blocking on a FIFO; what is checked is what was opened (fstat)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        why = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise StoreError(f"cannot read {path}: {why}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StoreError(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def verify_file(bundle: Path, layout: Layout, progress: Progress | None = None) -> Verified:
    """Check a bundle completely, as an import would, without installing it."""
    with open_file(bundle) as src:
        reader = BundleReader(src, layout)
        verified = reader.authenticate()
        store = Store(layout)
        _refuse_if_installed(store, verified)
        store.check_sequence(verified.manifest.name, verified.manifest.sequence)
        reader.copy_payload(verified.manifest, None, progress)
    return verified


def _audit_failure(layout: Layout, event: str, bundle: Path, exc: ApplianceError) -> None:
    with contextlib.suppress(StoreError):  # the original error matters more than a log line
        layout.audit.append(event, file=bundle.name, result="rejected",
                            error=type(exc).__name__, detail=exc.message)


def verify(bundle: Path, layout: Layout, progress: Progress | None = None) -> Verified:
    try:
        verified = verify_file(bundle, layout, progress)
    except ApplianceError as exc:
        _audit_failure(layout, "verify", bundle, exc)
        raise
    m = verified.manifest
    layout.audit.append("verify", file=bundle.name, result="ok", bundle=m.name,
                        sequence=m.sequence, signers=verified.signers)
    return verified


def import_bundle(bundle: Path, layout: Layout, progress: Progress | None = None,
                  keep: int = 2) -> Installed:
    """Verify, stage, and atomically activate a bundle. Raises ApplianceError subclasses."""
    store = Store(layout)
    with store.locked():
        store.cleanup()
        try:
            installed = _import_locked(bundle, store, progress)
        except ApplianceError as exc:
            _audit_failure(layout, "import", bundle, exc)
            raise
        layout.audit.append("import", file=bundle.name, result="ok", bundle=installed.name,
                            sequence=installed.sequence, trial=True)
        store.prune(installed.name, keep)
        return installed


def _refuse_if_installed(store: Store, verified: Verified) -> None:
    """The same signed manifest as an installed sequence: say so, rather than calling it a
    rollback. Never activates it: a stick left in must not undo an owner's rollback."""
    m = verified.manifest
    if store.manifest_bytes(m.name, m.sequence) != verified.manifest_bytes:
        return  # not installed, or another bundle under that number: the sequence check decides
    if store.active(m.name) == m.sequence:
        state = "active"
        hint = "nothing to do"
    elif m.sequence in store.bad(m.name):
        state = "failed its self-test before, not active"
        hint = "nothing to do; a bundle with a higher sequence replaces it"
    else:
        state = "not active"
        hint = f"appliance-ctl bundle activate {m.name} {m.sequence}"
    raise AlreadyInstalled(f"bundle {m.name} sequence {m.sequence} is already installed "
                           f"({state})", hint=hint)


def _import_locked(bundle: Path, store: Store, progress: Progress | None) -> Installed:
    layout = store.layout
    with open_file(bundle) as src:
        reader = BundleReader(src, layout)
        verified = reader.authenticate()
        m = verified.manifest
        _refuse_if_installed(store, verified)
        store.check_sequence(m.name, m.sequence)
        folder = layout.store / m.name
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < m.total_size + SPACE_MARGIN:
            raise StoreError(
                f"bundle needs {m.total_size >> 20} MiB, {free >> 20} MiB free in {layout.store}",
                hint="roll back and remove old bundles, or free space on the data partition",
            )
        staging = folder / f"{STAGING_PREFIX}{m.sequence}"
        staging.mkdir()
        checkpoint("staging created")
        try:
            reader.copy_payload(m, staging, progress)
            for name, data in (("manifest.toml", verified.manifest_bytes),
                               ("manifest.sig", verified.sig_bytes)):
                with open(staging / name, "xb") as f:
                    f.write(data)
                    os.fsync(f.fileno())
            for sub, _dirs, _files in os.walk(staging, topdown=False):
                fsync_dir(Path(sub))
            checkpoint("payload synced")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    final = folder / str(m.sequence)
    os.replace(staging, final)
    fsync_dir(folder)
    checkpoint("renamed into place")
    store.raise_highwater(m.name, m.sequence)
    checkpoint("high-water raised")
    trial.begin(store, m.name, m.sequence)  # before it is active: it never goes live untested
    checkpoint("on trial")
    store.activate(m.name, m.sequence)
    checkpoint("activated")
    return store.load(m.name, m.sequence)
