"""The audit log survives an append cut short: a torn last line or a head that was not yet
replaced is an interrupted write, repaired and recorded by the next append; it never reads as
tampering, and tampering still does."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env, run_tool

from appliance.device.audit import AuditLog
from appliance.errors import StoreError


def _log(tmp_path: Path, entries: int = 3) -> AuditLog:
    log = AuditLog(tmp_path / "state" / "audit.log")
    for i in range(entries):
        log.append("import", bundle="demo", sequence=i + 1, result="ok")
    return log


def test_torn_last_line_is_an_interrupted_write(tmp_path: Path) -> None:
    log = _log(tmp_path)
    whole = json.dumps({"n": 4, "event": "import", "prev": "x" * 64}).encode()
    torn = whole[: len(whole) // 2]
    with log.path.open("ab") as f:
        f.write(torn)
    found = log.verify()  # read-only: reports, does not fail
    assert (found.entries, found.torn_bytes, found.head_behind) == (3, len(torn), False)
    assert len(log.entries()) == 3

    log.append("key-add", keyid="k", result="ok")  # repairs, records, then appends
    events = [e["event"] for e in log.entries()]
    assert events == ["import"] * 3 + ["audit-recovered", "key-add"]
    recovered = log.entries()[3]
    assert recovered["torn_bytes"] == len(torn)
    assert recovered["torn_sha256"] == hashlib.sha256(torn).hexdigest()
    assert log.verify() == type(found)(5)


def test_head_not_yet_replaced_is_an_interrupted_write(tmp_path: Path) -> None:
    log = _log(tmp_path)
    head = log.head_path.read_bytes()
    log.append("import", bundle="demo", sequence=4, result="ok")
    log.head_path.write_bytes(head)  # as if the process died between the line and the head
    found = log.verify()
    assert (found.entries, found.head_behind) == (4, True)
    log.append("apikey-create", name="x", result="ok")
    entries = log.entries()
    assert [e["event"] for e in entries[3:]] == ["import", "audit-recovered", "apikey-create"]
    assert entries[4]["head_behind"] is True
    assert log.verify().entries == 6


def test_tampering_is_still_tampering(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = log.path.read_bytes().splitlines(keepends=True)
    # a torn tail after a cut: the head counts 3 lines, only 2 are left
    log.path.write_bytes(b"".join(lines[:2]) + lines[2][:10])
    with pytest.raises(StoreError, match="cut off"):
        log.verify()
    # an edited middle line followed by a torn tail
    edited = json.loads(lines[1])
    edited["sequence"] = 99
    log.path.write_bytes(lines[0] + json.dumps(edited).encode() + b"\n" + lines[2] + b'{"n"')
    with pytest.raises(StoreError, match="broken at line 2"):
        log.verify()
    # two unacknowledged lines is not one interrupted append
    log.path.write_bytes(b"".join(lines))
    head = log.head_path.read_bytes()
    log.append("a")
    log.append("b")
    log.head_path.write_bytes(head)
    with pytest.raises(StoreError, match="cut off"):
        log.verify()


_APPENDER = """
import sys
from pathlib import Path
from appliance.device.audit import AuditLog
log = AuditLog(Path(sys.argv[1]))
i = 0
while True:
    i += 1
    log.append("import", bundle="demo", sequence=i, note="x" * 3000, result="ok")
"""


def test_kill_during_appends_never_breaks_the_chain(tmp_path: Path) -> None:
    """SIGKILL at random moments of a process that appends without pause (3 KB lines, so some
    kills land inside a write); after each, the log verifies and the next append repairs it."""
    path = tmp_path / "state" / "audit.log"
    path.parent.mkdir(parents=True)
    rng = random.Random(7)
    repaired = 0
    for _ in range(25):
        proc = subprocess.Popen([sys.executable, "-c", _APPENDER, str(path)])
        time.sleep(0.05 + rng.random() * 0.15)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log = AuditLog(path)
        found = log.verify()
        log.append("check", result="ok")
        repaired += bool(found.torn_bytes or found.head_behind)
        after = log.verify()
        assert (after.torn_bytes, after.head_behind) == (0, False)
    print(f"25 kills, {repaired} left an interrupted append that was repaired")


def test_kill_between_line_and_head_via_checkpoint(tmp_path: Path) -> None:
    """The crash point inside an append, hit exactly: the CLI's own audit entry is cut after
    its line and before its head; `audit verify` says so and exits 0."""
    root = tmp_path / "root"
    assert run_tool("ctl", root, "apikey", "create", "first").returncode == 0
    points = tmp_path / "points"
    probe = tmp_path / "probe"
    shutil.copytree(root, probe, symlinks=True)
    subprocess.run([sys.executable, "-m", "appliance.cli.ctl", "apikey", "create", "two"],
                   env={**cli_env(probe), "APPLIANCE_CHECKPOINT_LOG": str(points)}, check=True,
                   capture_output=True)
    at = next(line.split()[0] for line in points.read_text().splitlines()
              if "audit line written" in line)
    env = {**cli_env(root), "APPLIANCE_KILL_AT": at}
    killed = subprocess.run([sys.executable, "-m", "appliance.cli.ctl", "apikey", "create", "two"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    checked = run_tool("ctl", root, "audit", "verify")
    assert checked.returncode == 0, checked.stderr
    assert "audit log intact: 2 entries" in checked.stdout
    assert "interrupted" in checked.stdout
    assert run_tool("ctl", root, "apikey", "create", "three").returncode == 0
    again = run_tool("ctl", root, "audit", "verify")
    assert "audit log intact: 4 entries" in again.stdout and "interrupted" not in again.stdout
