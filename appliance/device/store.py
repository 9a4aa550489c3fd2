"""The device's bundle store: where installed bundles live and which one is active.

Paths are in `appliance.device.layout`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.bundle import manifest as mf
from appliance.device.layout import Layout
from appliance.errors import IntegrityError, RollbackError, StoreError, UsageError
from appliance.fsutil import atomic_symlink, atomic_write, fsync_dir

STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
LOCK_WAIT = 900.0  # an import of a large bundle on a slow stick takes minutes
DEFAULT_KEEP = 2  # the active sequence and the one before it, for rollback


@dataclass(frozen=True)
class Installed:
    name: str
    sequence: int
    path: Path
    manifest: mf.Manifest

    def file(self, rel: str) -> Path:
        return self.path / "files" / rel


class Store:
    """Reads and switches installed bundles. Mutating calls expect `locked()` to be held."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One change of the device at a time. Two sticks, or a stick and a trial being
        settled, simply take turns: the lock is waited for (up to LOCK_WAIT seconds)."""
        self.layout.state.mkdir(parents=True, exist_ok=True)
        with (self.layout.state / "lock").open("a") as f:
            deadline = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoreError(
                            "another bundle operation is running on this device",
                            hint="wait for it to finish, then try again",
                        ) from None
                    time.sleep(0.2)
            yield

    def names(self) -> list[str]:
        if not self.layout.store.is_dir():
            return []
        return sorted(p.name for p in self.layout.store.iterdir() if mf.NAME.fullmatch(p.name))

    def sequences(self, name: str) -> list[int]:
        folder = self.layout.store / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())

    def active(self, name: str) -> int | None:
        try:
            target = os.readlink(self.layout.store / name / "current")
        except FileNotFoundError:
            return None
        return int(target) if target.isdigit() else None

    def manifest_bytes(self, name: str, sequence: int) -> bytes | None:
        """The signed manifest of an installed sequence as imported; None if not installed."""
        try:
            return (self.layout.store / name / str(sequence) / "manifest.toml").read_bytes()
        except OSError:
            return None

    def load(self, name: str, sequence: int) -> Installed:
        data = self.manifest_bytes(name, sequence)
        if data is None:
            raise StoreError(f"bundle {name} {sequence} is not installed")
        return Installed(name, sequence, self.layout.store / name / str(sequence),
                         mf.parse(data, f"{name}/{sequence}/manifest.toml"))

    def check(self, inst: Installed) -> None:
        """Re-hash an installed bundle against its manifest: exactly the listed files, intact.

        Raises IntegrityError naming the first file that differs."""
        files = inst.path / "files"
        present = {p.relative_to(files).as_posix() for p in files.rglob("*") if not p.is_dir()}
        extra = present - set(inst.manifest.by_path)
        if extra:
            raise IntegrityError(f"{inst.name} {inst.sequence}: unlisted file {sorted(extra)[0]!r}")
        for entry in inst.manifest.files:
            path = inst.file(entry.path)
            if not path.is_file() or path.is_symlink() or path.stat().st_size != entry.size:
                raise IntegrityError(f"{inst.name} {inst.sequence}: {entry.path!r} is missing "
                                     "or has the wrong size")
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            if digest.hexdigest() != entry.sha256:
                raise IntegrityError(f"{inst.name} {inst.sequence}: {entry.path!r} was altered",
                                     hint="import the bundle again from its source")

    # --- the states of an activation (installed -> trial -> good, or -> bad) ---------------
    # One small file each beside `current`, replaced atomically under the store lock:
    # `trial` (the sequence whose self-test has not passed yet), `last-good` (the one to fall
    # back to), `bad` (sequences that failed: never activated again without --force).

    def trial(self, name: str) -> int | None:
        return self._number(name, "trial")

    def last_good(self, name: str) -> int | None:
        return self._number(name, "last-good")

    def bad(self, name: str) -> list[int]:
        text = self._read_state(name, "bad")
        try:
            return sorted(int(x) for x in text.split())
        except ValueError:
            raise StoreError(f"the list of failed sequences of {name} is damaged") from None

    def set_trial(self, name: str, sequence: int | None) -> None:
        self._write_state(name, "trial", "" if sequence is None else str(sequence))

    def set_last_good(self, name: str, sequence: int) -> None:
        self._write_state(name, "last-good", str(sequence))

    def clear_last_good(self, name: str) -> None:
        self._write_state(name, "last-good", "")

    def mark_bad(self, name: str, sequence: int) -> None:
        self.set_bad(name, [*self.bad(name), sequence])

    def set_bad(self, name: str, sequences: list[int]) -> None:
        self._write_state(name, "bad", " ".join(map(str, sorted(set(sequences)))))

    def _number(self, name: str, what: str) -> int | None:
        text = self._read_state(name, what).strip()
        if not text:
            return None
        if not text.isdigit():
            raise StoreError(f"the {what} mark of {name} is damaged")
        return int(text)

    def _read_state(self, name: str, what: str) -> str:
        try:
            return (self.layout.store / name / what).read_text()
        except FileNotFoundError:
            return ""

    def _write_state(self, name: str, what: str, value: str) -> None:
        path = self.layout.store / name / what
        if not value:
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)
        else:
            atomic_write(path, f"{value}\n".encode())

    def active_bundles(self) -> list[Installed]:
        out = []
        for name in self.names():
            seq = self.active(name)
            if seq is not None:
                out.append(self.load(name, seq))
        return out

    def _mark(self, name: str) -> int:
        try:
            return int((self.layout.highwater_dir / name).read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError as exc:
            raise StoreError(f"the high-water mark of {name} is damaged",
                             hint=f"check {self.layout.highwater_dir / name}") from exc

    def highwater(self, name: str) -> int:
        """Highest sequence ever installed for `name` (the mark, or an installed folder)."""
        return max([self._mark(name), *self.sequences(name)])

    def raise_highwater(self, name: str, sequence: int) -> None:
        if sequence > self._mark(name):
            self.layout.highwater_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.layout.highwater_dir / name, f"{sequence}\n".encode())

    def reset_highwater(self, name: str, sequence: int) -> None:
        """Lower the mark (a signed trust rotation's recovery from an absurd sequence); the
        sequences above it must be gone first, as they count too."""
        self.layout.highwater_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.layout.highwater_dir / name, f"{sequence}\n".encode())

    def discard(self, name: str, sequence: int) -> None:
        if sequence == self.active(name):
            raise UsageError(f"bundle {name} sequence {sequence} is active")
        self._discard(self.layout.store / name / str(sequence))

    def check_sequence(self, name: str, sequence: int) -> None:
        mark = self.highwater(name)
        if sequence <= mark:
            raise RollbackError(
                f"bundle {name} sequence {sequence} must be > installed {mark}",
                hint="build the bundle again with a higher sequence",
            )

    def activate(self, name: str, sequence: int) -> int | None:
        """Point `current` at an installed sequence; return the previously active one."""
        if sequence not in self.sequences(name):
            raise UsageError(
                f"bundle {name} sequence {sequence} is not installed",
                hint=f"installed: {self.sequences(name) or 'none'}",
            )
        previous = self.active(name)
        atomic_symlink(str(sequence), self.layout.store / name / "current")
        return previous

    def rollback_target(self, name: str) -> int:
        """The last good sequence when it is not the active one, else the newest older one."""
        current = self.active(name)
        good = self.last_good(name)
        if good is not None and good != current:
            return good
        older = [s for s in self.sequences(name) if current is None or s < current]
        if not older:
            raise UsageError(
                f"bundle {name} has no older installed sequence to roll back to",
                hint=f"installed: {self.sequences(name) or 'none'}",
            )
        return older[-1]

    def prune(self, name: str, keep: int = DEFAULT_KEEP) -> list[int]:
        """Remove all but the active sequence and the newest older ones (`keep` in all)."""
        current = self.active(name)
        older = [s for s in self.sequences(name) if current is None or s < current]
        kept = set(older[max(0, len(older) - (keep - 1)):]) if keep > 1 else set()
        kept.add(self.last_good(name) or 0)  # always keep what a failed trial falls back to
        doomed = [s for s in self.sequences(name) if s != current and s not in kept]
        for seq in doomed:
            self._discard(self.layout.store / name / str(seq))
        return doomed

    def _discard(self, path: Path) -> None:
        # rename first, so a crash never leaves a half-deleted folder under a valid name
        trash = path.with_name(f"{TRASH_PREFIX}{path.name}")
        os.replace(path, trash)
        fsync_dir(path.parent)
        shutil.rmtree(trash)

    def cleanup(self) -> list[Path]:
        """Remove what an interrupted operation left behind; reconcile high-water marks."""
        removed: list[Path] = []
        for name in self.names():
            folder = self.layout.store / name
            for entry in folder.iterdir():
                if entry.name.startswith((STAGING_PREFIX, TRASH_PREFIX, ".current.", ".trial.",
                                          ".last-good.", ".bad.")):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                    removed.append(entry)
            if self.sequences(name):
                self.raise_highwater(name, max(self.sequences(name)))
        return removed
