"""sd_notify messages reach a real AF_UNIX datagram socket, as systemd would receive them."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from appliance.serve import notify


def test_ready_then_watchdog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock_path = tmp_path / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(sock_path))
    receiver.settimeout(10)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    state = {"ok": True}
    stop = threading.Event()
    thread = notify.supervise(
        [("127.0.0.1", listener.getsockname()[1])],
        lambda: (state["ok"], "ok: m ok" if state["ok"] else "unhealthy: m dead"), stop)
    first = receiver.recv(4096).decode()
    assert first.startswith("READY=1") and "STATUS=ok: m ok" in first
    assert receiver.recv(4096).decode().startswith("WATCHDOG=1")
    state["ok"] = False
    seen = [receiver.recv(4096).decode() for _ in range(3)]
    assert "STATUS=unhealthy: m dead" in seen[-1] and "WATCHDOG" not in seen[-1]
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    receiver.close()
    listener.close()


def test_watchdog_meant_for_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert notify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    assert notify.watchdog_interval() == 0.5
    monkeypatch.delenv("WATCHDOG_USEC")
    assert notify.watchdog_interval() is None


def test_ready_waits_for_every_listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock_path = tmp_path / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(sock_path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    first, second = socket.socket(), socket.socket()
    first.bind(("127.0.0.1", 0))
    first.listen()
    second.bind(("127.0.0.1", 0))  # bound, not yet listening
    stop = threading.Event()
    thread = notify.supervise([("127.0.0.1", first.getsockname()[1]),
                               ("127.0.0.1", second.getsockname()[1])],
                              lambda: (True, "ok"), stop)
    receiver.settimeout(1)
    with pytest.raises(TimeoutError):
        receiver.recv(4096)
    second.listen()
    receiver.settimeout(10)
    assert receiver.recv(4096).decode().startswith("READY=1")
    stop.set()
    thread.join(timeout=15)
    for sock in (receiver, first, second):
        sock.close()
