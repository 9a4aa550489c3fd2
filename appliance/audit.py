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
from typing import Any

from appliance.errors import StoreError
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
class AuditLog:
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
                n, prev = self._head()
                entry: dict[str, Any] = {
                    "n": n + 1,
                    "time": _now().isoformat(timespec="seconds"),
                    "event": event,
                    **details,
                    "prev": prev,
                }
                entry["hash"] = _digest(entry)
                f.write(json.dumps(entry, sort_keys=True, ensure_ascii=True).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
                atomic_write(self.head_path, f"{n + 1} {entry['hash']}\n".encode())
        except OSError as exc:
            raise StoreError(f"cannot write the audit log {self.path}: {exc.strerror}") from exc

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
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_bytes().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError as exc:
                raise StoreError(f"audit line {len(out) + 1} is not JSON") from exc
        return out

    def verify(self) -> int:
        """Check every link of the chain and the head; return the number of entries.

        Raises StoreError naming the first line that breaks the chain.
        """
        prev, n = GENESIS, 0
        for n, entry in enumerate(self.entries(), start=1):
            if not isinstance(entry, dict):
                raise StoreError(f"audit line {n} is not an object")
            claimed = entry.pop("hash", None)
            if entry.get("n") != n or entry.get("prev") != prev or claimed != _digest(entry):
                raise StoreError(
                    f"audit log broken at line {n}: a line was edited, removed or reordered")
            prev = claimed
        head_n, head_hash = self._head()
        if (head_n, head_hash) != (n, prev):
            raise StoreError(
                f"audit log has {n} lines but its head records {head_n}: lines were cut off"
            )
        return n
