"""Pinned TLS: off loopback the real `appliance-ctl serve` answers HTTPS only, with the device's
own certificate, which a client trusts by pinning it; clear HTTP exists only on 127.0.0.1
(`local_port`). An empty store: no model is needed to test the transport."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from conftest import cli_env, free_port, run_tool
from openai import OpenAI

from appliance.cli import ctl
from appliance.device import tlscert
from appliance.device.layout import Layout
from appliance.errors import FormatError, StoreError
from appliance.serve import settings


def lan_address() -> str | None:
    """The first non-loopback IPv4 address of this machine that can be bound, if any."""
    found: list[str] = []
    if shutil.which("ip"):
        out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True,
                             text=True).stdout
        found += [line.split()[3].split("/")[0] for line in out.splitlines()
                  if len(line.split()) > 3]
    with contextlib.suppress(OSError):
        found += socket.gethostbyname_ex(socket.gethostname())[2]
    for address in found:
        if address.startswith("127."):
            continue
        try:
            with socket.socket() as s:
                s.bind((address, 0))
            return address
        except OSError:
            continue
    return None


LAN = lan_address()


@dataclass
class Device:
    root: Path
    port: int
    local_port: int
    key: str
    proc: subprocess.Popen[str]

    @property
    def cert(self) -> Path:
        return Layout(self.root).identity / tlscert.CERT

    @property
    def base(self) -> str:
        return f"https://{LAN}:{self.port}/v1"


def pinned(cert: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cert)
    ctx.check_hostname = False  # connecting by address: the pin is the trust
    return ctx


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    if LAN is None:
        pytest.skip("no non-loopback IPv4 address to serve on")
    root = tmp_path_factory.mktemp("tls") / "root"
    created = run_tool("ctl", root, "apikey", "create", "tests")
    assert created.returncode == 0, created.stderr
    assert tlscert.ensure(Layout(root).identity, ["appliance.local"])
    port, local_port = free_port(), free_port()
    env = {**cli_env(root), "APPLIANCE_HOST": LAN, "APPLIANCE_PORT": str(port),
           "APPLIANCE_LOCAL_PORT": str(local_port)}
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli.ctl", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dev = Device(root, port, local_port, created.stdout.strip(), proc)
    deadline = time.monotonic() + 60
    while True:
        try:  # any HTTP answer: an empty store is "unhealthy" (503)
            httpx.get(f"http://127.0.0.1:{local_port}/healthz", timeout=2)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline and proc.poll() is None, (
                proc.stdout.read() if proc.poll() is not None and proc.stdout else "no start")
            time.sleep(0.2)
    yield dev
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=20)


def test_pinned_openai_client_lists_models(device: Device) -> None:
    client = OpenAI(base_url=device.base, api_key=device.key, max_retries=0, timeout=10,
                    http_client=httpx.Client(verify=pinned(device.cert)))
    assert client.models.list().data == []


def test_unpinned_client_is_refused(device: Device) -> None:
    client = OpenAI(base_url=device.base, api_key=device.key, max_retries=0, timeout=10)
    with pytest.raises(openai.APIConnectionError) as caught:
        client.models.list()
    assert "CERTIFICATE_VERIFY_FAILED" in repr(caught.value.__cause__)


def test_another_pinned_certificate_is_refused(device: Device, tmp_path: Path) -> None:
    assert tlscert.ensure(tmp_path / "other", ["appliance.local"])
    client = OpenAI(base_url=device.base, api_key=device.key, max_retries=0, timeout=10,
                    http_client=httpx.Client(verify=pinned(tmp_path / "other" / tlscert.CERT)))
    with pytest.raises(openai.APIConnectionError):
        client.models.list()


def test_clear_http_on_the_tls_port_gets_no_http_answer(device: Device) -> None:
    assert LAN is not None
    with socket.create_connection((LAN, device.port), timeout=10) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {LAN}\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert not answer.startswith(b"HTTP/"), answer
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{LAN}:{device.port}/healthz", timeout=10)


def test_local_listener_is_plain_http_on_loopback_only(device: Device) -> None:
    health = httpx.get(f"http://127.0.0.1:{device.local_port}/healthz", timeout=10)
    assert health.status_code in (200, 503) and "status" in health.json()
    models = httpx.get(f"http://127.0.0.1:{device.local_port}/v1/models", timeout=10,
                       headers={"Authorization": f"Bearer {device.key}"})
    assert models.json()["data"] == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{LAN}:{device.local_port}/healthz", timeout=10)


def test_runtime_json_and_status(device: Device, tmp_path: Path) -> None:
    layout = Layout(device.root)
    runtime = json.loads((layout.run / "runtime.json").read_text())
    assert runtime["listen"] == f"{LAN}:{device.port}" and runtime["tls"] is True
    assert runtime["local"] == f"http://127.0.0.1:{device.local_port}"
    assert runtime["fingerprint"] == tlscert.fingerprint(device.cert)
    shown = run_tool("ctl", device.root, "status", "--json")
    assert json.loads(shown.stdout)["runtime"]["health"]["status"] == "unhealthy", shown.stdout
    # without a local listener, status asks the main one, pinned to the device certificate
    other = Layout(tmp_path / "root")
    other.run.mkdir(parents=True)
    del runtime["local"]
    (other.run / "runtime.json").write_text(json.dumps(runtime))
    other.identity.mkdir(parents=True)
    shutil.copy(device.cert, other.identity / tlscert.CERT)
    report = ctl._runtime_report(other)
    assert report is not None and report["health"]["status"] == "unhealthy", report
    tlscert.ensure(tmp_path / "stranger", ["appliance.local"])  # a certificate not served
    shutil.copy(tmp_path / "stranger" / tlscert.CERT, other.identity / tlscert.CERT)
    report = ctl._runtime_report(other)
    assert report is not None and report["health"]["status"].startswith("not answering")


def test_sigterm_stops_both_listeners(device: Device) -> None:
    """Last: it stops the module's server."""
    assert LAN is not None
    device.proc.send_signal(signal.SIGTERM)
    assert device.proc.wait(timeout=15) == 128 + signal.SIGTERM
    for address in ((LAN, device.port), ("127.0.0.1", device.local_port)):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=5).close()
    assert not (Layout(device.root).run / "runtime.json").exists()  # the runtime was closed


def test_serving_off_loopback_needs_the_certificate(tmp_path: Path) -> None:
    if LAN is None:
        pytest.skip("no non-loopback IPv4 address to serve on")
    root = tmp_path / "root"
    assert run_tool("ctl", root, "apikey", "create", "tests").returncode == 0
    served = subprocess.run([sys.executable, "-m", "appliance.cli.ctl", "serve"],
                            env={**cli_env(root), "APPLIANCE_HOST": LAN,
                                 "APPLIANCE_PORT": str(free_port())},
                            capture_output=True, text=True, timeout=60)
    assert served.returncode == 2, served.stderr
    assert "appliance-ctl init" in served.stderr and "TLS" in served.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "0.0.0.0"])
def test_local_port_may_not_be_the_loopback_port(tmp_path: Path, host: str) -> None:
    with pytest.raises(FormatError, match="local_port"):
        settings.load(Layout(tmp_path), env={"APPLIANCE_HOST": host, "APPLIANCE_PORT": "8080",
                                             "APPLIANCE_LOCAL_PORT": "8080"})


def test_tls_whenever_off_loopback(tmp_path: Path) -> None:
    s = settings.load(Layout(tmp_path), env={"APPLIANCE_HOST": "192.0.2.7",
                                             "APPLIANCE_LOCAL_PORT": "8080"})
    assert s.tls and (s.port, s.local_port) == (8080, 8080)  # other addresses: no clash
    assert not settings.load(Layout(tmp_path), env={}).tls
    assert settings.load(Layout(tmp_path), env={"APPLIANCE_HOST": "0.0.0.0"}).tls
    (tmp_path / "etc/appliance").mkdir(parents=True)
    (tmp_path / "etc/appliance/appliance.toml").write_text("[server]\nlocal_port = 70000\n")
    with pytest.raises(FormatError, match="local_port must be between 0 and 65535"):
        settings.load(Layout(tmp_path), env={})


def test_ensure_is_idempotent_and_fingerprint_matches_openssl(tmp_path: Path) -> None:
    identity = tmp_path / "identity"
    assert tlscert.ensure(identity, ["appliance.local", "192.0.2.7"])
    before = {p.name: p.read_bytes() for p in identity.iterdir()}
    assert tlscert.ensure(identity, ["something.else"]) is False
    assert {p.name: p.read_bytes() for p in identity.iterdir()} == before
    assert (identity / tlscert.KEY).stat().st_mode & 0o777 == 0o640
    if shutil.which("openssl") is None:
        pytest.skip("no openssl")
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in",
                          str(identity / tlscert.CERT)], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().partition("=")[2] == tlscert.fingerprint(identity / tlscert.CERT)
    # what strict verification (Python 3.13's default) asks of a pinned server certificate
    cert = str(identity / tlscert.CERT)
    subprocess.run(["openssl", "verify", "-x509_strict", "-partial_chain", "-purpose",
                    "sslserver", "-CAfile", cert, cert], check=True, capture_output=True)


def test_certificate_without_its_key_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    tlscert.ensure(a, ["appliance.local"])
    tlscert.ensure(b, ["appliance.local"])
    shutil.copy(b / tlscert.CERT, a / tlscert.CERT)
    with pytest.raises(StoreError, match="does not match"):
        tlscert.load(a)
    with pytest.raises(StoreError, match="does not match"):
        tlscert.server_context(a)


def test_a_crash_between_key_and_certificate_keeps_the_key(tmp_path: Path) -> None:
    identity = tmp_path / "identity"
    tlscert.ensure(identity, ["appliance.local"])
    key = (identity / tlscert.KEY).read_bytes()
    (identity / tlscert.CERT).unlink()
    assert tlscert.ensure(identity, ["appliance.local"])
    assert (identity / tlscert.KEY).read_bytes() == key
    tlscert.load(identity)


def test_strict_verification_accepts_the_certificate_by_name(tmp_path: Path) -> None:
    """Loopback never serves TLS, so an in-process TLS server with the device certificate:
    Python 3.13's default verification (strict X.509, partial chains) with the host name
    checked accepts it for `localhost`, and refuses a name it does not carry."""
    identity = tmp_path / "identity"
    tlscert.ensure(identity, ["appliance.local"])
    server_ctx = tlscert.server_context(identity)
    assert server_ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept(count: int) -> None:
        for _ in range(count):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=accept, args=(2,), daemon=True)
    thread.start()
    client = ssl.create_default_context(cafile=identity / tlscert.CERT)
    client.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    assert client.check_hostname
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            client.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.recv(2) == b"ok"
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            pytest.raises(ssl.SSLCertVerificationError, match="match"):
        client.wrap_socket(raw, server_hostname="example.com")
    thread.join(timeout=10)
    listener.close()
