"""The fleet table: receipts from many devices' sticks, verified, newest per device.

An owner with twenty boxes and no network copies each stick's `appliance-receipts/` into one
folder and runs `appliance-build receipts FOLDER [--fleet FLEET]`. FLEET lists the devices
the owner expects, one `device-id name` per line, so that silent ones show up too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.bundle import receipt
from appliance.bundle.control import DEVICE_ID
from appliance.errors import ApplianceError, FormatError


@dataclass
class Fleet:
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)   # device -> newest body
    invalid: list[str] = field(default_factory=list)                  # "file: why"
    names: dict[str, str] = field(default_factory=dict)               # device -> owner's name

    @property
    def unseen(self) -> list[str]:
        return sorted(d for d in self.names if d not in self.latest)


def read_fleet(path: Path) -> dict[str, str]:
    names = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        device, _, name = line.partition(" ")
        if not DEVICE_ID.fullmatch(device):
            raise FormatError(f"{path}:{n}: expected `device-id name` (64 hex digits first)")
        names[device] = name.strip() or device[:16]
    return names


def scan(folder: Path, names: dict[str, str] | None = None) -> Fleet:
    fleet = Fleet(names=dict(names or {}))
    for path in sorted(folder.rglob("*.json")):
        if path.is_symlink() or not path.is_file():
            continue
        try:
            found = receipt.verify(path.read_bytes(), str(path.relative_to(folder)))
        except ApplianceError as exc:
            fleet.invalid.append(exc.message)
            continue
        current = fleet.latest.get(found.device)
        # newest by the device's own audit count: an offline device's clock may be wrong
        if current is None or _order(found.body) > _order(current):
            fleet.latest[found.device] = found.body
    return fleet


def _order(body: dict[str, Any]) -> tuple[int, str]:
    return body["audit"]["entries"], body["written"]


def table(fleet: Fleet) -> str:
    rows = [("device", "name", "last receipt", "bundles", "last stick", "problems")]
    for device, body in sorted(fleet.latest.items(), key=lambda kv: fleet.names.get(kv[0], "~")):
        status = body.get("status", {})
        bundles = ", ".join(_bundle(b) for b in status.get("bundles", [])) or "none"
        results = body.get("results", [])
        done = sum(r.get("result") not in ("refused", "present") for r in results)
        refused = [r for r in results if r.get("result") == "refused"]
        problems = [f"{r.get('file')}: {r.get('detail')}" for r in refused]
        problems += [f"{b['name']} {b['bad']} failed self-test" for b in status.get("bundles", [])
                     if b.get("bad")]
        if fleet.names and device not in fleet.names:
            problems.append("not in the fleet list")
        rows.append((device[:16], fleet.names.get(device, "?"), str(body.get("written")),
                     bundles, f"{done} done, {len(refused)} refused",
                     "; ".join(problems) or "-"))
    for device in fleet.unseen:
        rows.append((device[:16], fleet.names[device], "never", "-", "-", "no receipt seen"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5]
             for r in rows]
    lines += [f"INVALID {why}" for why in fleet.invalid]
    return "\n".join(lines)


def _bundle(b: dict[str, Any]) -> str:
    state = "trial" if b.get("on_trial") else "good" if b.get("active") == b.get(
        "last_good") else "untested"
    return f"{b.get('name')} {b.get('active')} ({state})"
