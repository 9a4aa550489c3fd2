"""Fault injection for the crash-safety tests.

When APPLIANCE_KILL_AT=N is set, the N-th checkpoint reached by this process kills it with SIGKILL,
exactly as a power cut would stop it. APPLIANCE_CHECKPOINT_LOG names a file that receives one line
per checkpoint, so a test can count the points it has to try. Unset, a checkpoint costs one dict
lookup.
"""

from __future__ import annotations

import os
import signal

_count = 0


def checkpoint(label: str) -> None:
    global _count
    kill_at = os.environ.get("APPLIANCE_KILL_AT")
    log = os.environ.get("APPLIANCE_CHECKPOINT_LOG")
    if kill_at is None and log is None:
        return
    _count += 1
    if log:
        with open(log, "a") as f:
            f.write(f"{_count} {label}\n")
    if kill_at is not None and _count == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
