"""systemd notifications: READY when the API answers, STATUS lines, and a WATCHDOG ping that
stops as soon as an engine is dead or stuck, so systemd restarts the service.

systemd-python is used where it is installed (the image); otherwise the datagram is written to
$NOTIFY_SOCKET directly. Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def notify(message: str) -> None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        daemon = importlib.import_module("systemd.daemon")
        daemon.notify(message)
        return
    except ImportError:
        pass
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


def watchdog_interval() -> float | None:
    """Half of WatchdogSec, or None when systemd does not watch this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


def supervise(listeners: list[tuple[str, int]], healthy: Callable[[], tuple[bool, str]],
              stop: threading.Event | None = None) -> threading.Thread:
    """Start the thread that says READY once every `(host, port)` of `listeners` accepts
    connections, then pings the watchdog while `healthy()` holds and reports its status line
    (until `stop` is set). Only TCP is probed, so a TLS listener is probed the same way."""
    stop = stop or threading.Event()

    def run() -> None:
        for host, port in listeners:
            target = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
            while True:
                try:
                    socket.create_connection((target, port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.2)
        ok, status = healthy()
        notify(f"READY=1\nSTATUS={status}")
        interval = watchdog_interval() or 10.0
        while not stop.wait(interval):
            ok, status = healthy()
            if ok:
                notify(f"WATCHDOG=1\nSTATUS={status}")
            else:
                log.error("not pinging the watchdog: %s", status)
                notify(f"STATUS={status}")

    thread = threading.Thread(target=run, name="systemd-notify", daemon=True)
    thread.start()
    return thread
