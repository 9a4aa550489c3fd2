"""Append-only, hash-chained audit log of every change to the device's bundles and keys.

Each line is a JSON object whose `hash` covers the line's other fields, including `prev`, the hash
of the line before. `audit.head` records the newest line's number and hash, so that cutting lines
off the end is detected as well as editing or removing lines in the middle.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from appliance.errors import StoreError
from appliance.faults import checkpoint
from appliance.fsutil import atomic_write

GENESIS = "0" * 64


def _now() -> datetime:
    """Wall-clock time, or SOURCE_DATE_EPOCH while an image is being built reproducibly."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    return datetime.fromtimestamp(int(epoch), UTC) if epoch else datetime.now(UTC)


def _digest(entry: dict[str, Any]) -> str:
    body = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class Verified:
    """What `AuditLog.verify` found: the intact entries and any trace of an interrupted append."""

    entries: int
    torn_bytes: int = 0  # an unfinished last line (power cut or kill during an append)
    head_behind: bool = False  # the last line was written, the head not yet updated


@dataclass(frozen=True)
class AuditLog:
    """The log file plus `<log>.head`. An append writes and fsyncs its line, then replaces the
    head. A crash can therefore leave exactly two traces, both only at the end: an unfinished
    line (no newline), or one complete line the head does not count yet. Both are recognised as
    interrupted appends, never as tampering, and the next append repairs them and records that
    it did. Anything else that differs from the head is a broken chain."""

    path: Path

    @property
    def head_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    def append(self, event: str, **details: Any) -> None:
        """Record one event. Serialised across processes by a lock on the log file itself."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.path.open("a+b") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                n, prev = self._recover(f)
                self._write(f, n, prev, event, details)
        except OSError as exc:
            raise StoreError(f"cannot write the audit log {self.path}: {exc.strerror}") from exc

    def _write(self, f: BinaryIO, n: int, prev: str, event: str,
               details: dict[str, Any]) -> tuple[int, str]:
        entry: dict[str, Any] = {
            "n": n + 1,
            "time": _now().isoformat(timespec="seconds"),
            "event": event,
            **details,
            "prev": prev,
        }
        entry["hash"] = _digest(entry)
        f.seek(0, os.SEEK_END)
        f.write(json.dumps(entry, sort_keys=True, ensure_ascii=True).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
        checkpoint("audit line written, head not yet")
        atomic_write(self.head_path, f"{n + 1} {entry['hash']}\n".encode())
        return n + 1, entry["hash"]

    def _recover(self, f: BinaryIO) -> tuple[int, str]:
        """Repair what an interrupted append left (under the lock) and return the head. Only
        the end of the log is looked at; `verify` checks the whole chain."""
        f.seek(0)
        lines, tail = _split(f.read())
        n, prev = self._head()
        behind = len(lines) == n + 1 and _follows(lines[-1], n, prev)
        if behind:
            last = json.loads(lines[-1])
            n, prev = last["n"], last["hash"]
            atomic_write(self.head_path, f"{n} {prev}\n".encode())
        if tail:
            f.truncate(sum(len(line) + 1 for line in lines))
            os.fsync(f.fileno())
        if tail or behind:
            n, prev = self._write(f, n, prev, "audit-recovered", {
                "torn_bytes": len(tail),
                "torn_sha256": hashlib.sha256(tail).hexdigest() if tail else None,
                "head_behind": behind,
            })
        return n, prev

    def head(self) -> tuple[int, str]:
        """(entries, hash of the newest): what a receipt quotes to pin the history."""
        return self._head()

    def _head(self) -> tuple[int, str]:
        try:
            n, digest = self.head_path.read_text().split()
            return int(n), digest
        except FileNotFoundError:
            return 0, GENESIS
        except ValueError as exc:
            raise StoreError(f"{self.head_path} is damaged",
                             hint="run `appliance-ctl audit verify`") from exc

    def entries(self) -> list[dict[str, Any]]:
        """The complete entries (an unfinished last line is left out)."""
        if not self.path.exists():
            return []
        lines, _ = _split(self.path.read_bytes())
        return [_entry(line, i) for i, line in enumerate(lines, start=1)]

    def verify(self) -> Verified:
        """Check every link of the chain and the head; read-only.

        Raises StoreError naming the first line that breaks the chain. The traces of an
        interrupted append are reported in the result instead (`append` repairs them)."""
        if not self.path.exists():
            return self._check([], b"")
        lines, tail = _split(self.path.read_bytes())
        return self._check(lines, tail)

    def _check(self, lines: list[bytes], tail: bytes) -> Verified:
        prev, n = GENESIS, 0
        for n, line in enumerate(lines, start=1):
            entry = _entry(line, n)
            claimed = entry.pop("hash", None)
            if entry.get("n") != n or entry.get("prev") != prev or claimed != _digest(entry):
                raise StoreError(
                    f"audit log broken at line {n}: a line was edited, removed or reordered")
            prev = claimed
        head_n, head_hash = self._head()
        if (head_n, head_hash) == (n, prev):
            return Verified(n, len(tail))
        # one intact, chained line past the head: written and fsynced, head not yet replaced
        if head_n == n - 1 and _follows(lines[-1], head_n, head_hash):
            return Verified(n, len(tail), head_behind=True)
        raise StoreError(
            f"audit log has {n} lines but its head records {head_n}: lines were cut off")


def _split(data: bytes) -> tuple[list[bytes], bytes]:
    """(complete lines, bytes after the last newline)."""
    end = data.rfind(b"\n") + 1
    return data[:end].splitlines(), data[end:]


def _follows(line: bytes, n: int, prev: str) -> bool:
    """Whether `line` is a well-formed entry n + 1 chained to `prev`."""
    try:
        entry = _entry(line, n + 1)
    except StoreError:
        return False
    claimed = entry.pop("hash", None)
    return entry.get("n") == n + 1 and entry.get("prev") == prev and claimed == _digest(entry)


def _entry(line: bytes, n: int) -> dict[str, Any]:
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):
        raise StoreError(f"audit line {n} is not JSON") from None
    if not isinstance(entry, dict):
        raise StoreError(f"audit line {n} is not an object")
    return entry
