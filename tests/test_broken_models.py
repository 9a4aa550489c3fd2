"""One broken model must not stop the others. A bundle can be validly signed and still carry a
model that fails on this device (a damaged CTranslate2 file, an ONNX graph whose external data
points outside its folder): the service starts, serves the other models, and says which one
failed and why in /healthz, in status and to a client that asks for it."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Server, run_tool, start_server
from factory import Factory

from appliance.bundle import keys, signing
from appliance.bundle import manifest as mf
from appliance.bundle.tarformat import TarWriter
from appliance.device.install import import_bundle
from appliance.device.layout import Layout
from appliance.device.store import Store
from appliance.serve.runtime import Runtime
from appliance.serve.settings import Settings

WHISPER = "models/whisper-tiny.en/ct2/model.bin"


def rebundle(demo: tuple[Path, Path], scratch: Path, out: Path,
             changes: dict[str, bytes]) -> Path:
    """demo-1.bundle with some files replaced, signed again by the demo key (so it verifies
    and installs: the damage is in what was signed)."""
    keys_dir, bundles = demo
    assert run_tool("ctl", scratch, "keys", "add", str(keys_dir / "k.pub")).returncode == 0
    assert run_tool("ctl", scratch, "bundle", "import",
                    str(bundles / "demo-1.bundle")).returncode == 0
    inst = Store(Layout(scratch)).load("demo", 1)
    files = {f.path: changes.get(f.path) or inst.file(f.path).read_bytes()
             for f in inst.manifest.files}
    entries = tuple(mf.FileEntry(p, len(d), hashlib.sha256(d).hexdigest())
                    for p, d in sorted(files.items()))
    manifest = dataclasses.replace(inst.manifest, files=entries).to_toml()
    out.mkdir(parents=True)
    path = out / "demo-1.bundle"
    with path.open("wb") as f:
        tar = TarWriter(f, 1_700_000_000)
        tar.add_bytes("manifest.toml", manifest)
        tar.add_bytes("manifest.sig", signing.sign(manifest, [keys.load_private(
            keys_dir / "k.key")]))
        for p, d in sorted(files.items()):
            tar.add_bytes(p, d)
        tar.close()
    return path


def onnx_pointing_outside(original: bytes) -> bytes:
    """The embeddings graph with one weight stored "externally" at a path outside its folder."""
    import onnx
    from onnx.external_data_helper import set_external_data
    model = onnx.load_from_string(original)
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    size = len(tensor.raw_data)
    set_external_data(tensor, location="../../../../../../../../etc/passwd", length=size)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    return model.SerializeToString()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           demo_bundles: tuple[Path, Path]) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("broken")
    keys_dir, bundles = demo_bundles
    scratch = Store(Layout(tmp / "scratch"))
    run_tool("ctl", tmp / "scratch", "keys", "add", str(keys_dir / "k.pub"))
    run_tool("ctl", tmp / "scratch", "bundle", "import", str(bundles / "demo-1.bundle"))
    onnx_path = next(f.path for f in scratch.load("demo", 1).manifest.files
                     if f.path.endswith(".onnx") and "int8" in f.path)
    original = scratch.load("demo", 1).file(onnx_path).read_bytes()
    changes = {WHISPER: b"\x00garbage, not a CTranslate2 model" * 1000,
               onnx_path: onnx_pointing_outside(original)}
    broken = rebundle(demo_bundles, tmp / "scratch2", tmp / "out", changes)
    srv = start_server(tmp / "root", (keys_dir, broken.parent), "")
    yield srv
    srv.stop()


@pytest.mark.models
def test_the_others_are_served(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=server.key, max_retries=0)
    assert [m.id for m in client.models.list()] == ["smollm2-135m-instruct"]
    r = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=8,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].message.content
    with pytest.raises(openai.APIStatusError) as info:
        client.embeddings.create(model="all-minilm-l6-v2", input="hello")
    assert info.value.status_code == 503
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "model_unavailable"
    assert "failed to load" in body["message"]


@pytest.mark.models
def test_health_and_status_name_the_failures(server: Server) -> None:
    health = httpx.get(f"{server.base}/healthz")
    assert health.status_code == 200  # the served models are fine; a restart would not help
    report = health.json()
    assert report["status"] == "degraded"
    assert report["engines"] == {"smollm2-135m-instruct": "ok"}
    assert report["failed"] == ["all-minilm-l6-v2", "whisper-tiny.en"]  # ids, no paths
    status = run_tool("ctl", server.root, "status")
    assert status.returncode == 0
    assert "health degraded" in status.stdout
    whisper = next(line for line in status.stdout.splitlines() if "whisper-tiny.en" in line
                   and "not loaded" in line)
    assert "RuntimeError" in whisper
    onnx = next(line for line in status.stdout.splitlines() if "all-minilm-l6-v2" in line
                and "not loaded" in line)
    assert "escapes model directory" in onnx
    print(status.stdout)


_CRASH_WHILE_LOADING = """
import os, sys
from pathlib import Path
from appliance.serve.runtime import Runtime
from appliance.serve.settings import Settings
from appliance.device.layout import Layout
def crash(self, inst, loaded):
    os.abort()  # as a native library would take the process down
Runtime._load_chat = crash
Runtime(Layout(Path(sys.argv[1])), Settings()).load()
"""


def test_a_model_that_crashes_the_process_is_skipped_next_start(installed: Layout,
                                                                factory: Factory) -> None:
    """No restart loop: the model whose load killed the process is skipped on the next start
    (until the bundle changes or the device reboots) and reported."""
    crashed = subprocess.run([sys.executable, "-c", _CRASH_WHILE_LOADING, str(installed.root)],
                             capture_output=True, timeout=60)
    assert crashed.returncode < 0
    runtime = Runtime(installed, Settings())
    runtime.load()
    model = runtime.models["tiny"]
    assert model.engine is None and model.error is not None
    assert "stopped while loading" in model.error
    assert runtime.health()["failed"] == ["tiny"]
    runtime.close()
    # a new sequence of the bundle gets its chance again (and fails the ordinary way here:
    # the factory's weights are not a real GGUF)
    import_bundle(factory.bundle(sequence=2), installed)
    again = Runtime(installed, Settings())
    again.load()
    assert again.models["tiny"].error is not None
    assert "stopped while loading" not in again.models["tiny"].error
    again.close()


_STOPPED_WHILE_LOADING = """
import signal, sys, time
from pathlib import Path
from appliance.serve.runtime import Runtime
from appliance.serve.service import _stop
from appliance.serve.settings import Settings
from appliance.device.layout import Layout
def slow(self, inst, loaded):
    print("loading", flush=True)
    time.sleep(30)
Runtime._load_chat = slow
signal.signal(signal.SIGTERM, _stop)  # as serve() does while it loads
Runtime(Layout(Path(sys.argv[1])), Settings()).load()
"""


def test_a_stop_while_loading_is_not_taken_for_a_crash(installed: Layout) -> None:
    """systemctl stop (SIGTERM) during a long load unwinds: the model is not skipped later."""
    proc = subprocess.Popen([sys.executable, "-c", _STOPPED_WHILE_LOADING, str(installed.root)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "loading"
    assert (installed.run / "loading").exists()
    proc.terminate()
    assert proc.wait(timeout=30) == 128 + 15
    assert not (installed.run / "loading").exists()
    again = Runtime(installed, Settings())
    again.load()
    error = again.models["tiny"].error
    assert error is not None and "stopped while loading" not in error
    again.close()
