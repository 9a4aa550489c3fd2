"""The real demo bundle: built from its PyPI packages, verified, imported and rolled back."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import run_tool

from appliance.bundle import manifest as mf

pytestmark = pytest.mark.models


def run(tool: str, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_tool(tool, root, *args)


@pytest.fixture(scope="module")
def demo(demo_bundles: tuple[Path, Path]) -> tuple[Path, Path]:
    return demo_bundles


def test_demo_bundle_contents(demo: tuple[Path, Path]) -> None:
    _, out = demo
    import tarfile
    with tarfile.open(out / "demo-1.bundle") as tf:
        names = tf.getnames()
        data = tf.extractfile("manifest.toml")
        assert data is not None
        manifest = mf.parse(data.read())
    assert names[:2] == ["manifest.toml", "manifest.sig"]
    assert {m.id: m.task.value for m in manifest.models} == {
        "smollm2-135m-instruct": "chat", "all-minilm-l6-v2": "embeddings",
        "whisper-tiny.en": "transcription"}
    for model in manifest.models:
        assert model.license in manifest.by_path  # every model's license travels with it
    embed = next(m for m in manifest.models if m.task is mf.Task.EMBEDDINGS)
    assert {v.quantization for v in embed.variants} == {"fp32", "int8"}
    whisper = next(m for m in manifest.models if m.task is mf.Task.TRANSCRIPTION)
    assert "models/whisper-tiny.en/ct2/tokenizer.json" in whisper.variants[0].files


def test_demo_verify_import_rollback(demo: tuple[Path, Path]) -> None:
    tmp, out = demo
    root = tmp / "device"
    assert run("ctl", root, "keys", "add", str(tmp / "k.pub")).returncode == 0
    verified = run("ctl", root, "bundle", "verify", str(out / "demo-1.bundle"))
    assert verified.returncode == 0, verified.stderr
    first = run("ctl", root, "bundle", "import", str(out / "demo-1.bundle"))
    assert first.returncode == 0, first.stderr
    assert "imported demo sequence 1" in first.stdout
    for model in ("smollm2-135m-instruct", "all-minilm-l6-v2", "whisper-tiny.en"):
        assert model in first.stdout
    assert run("ctl", root, "bundle", "import", str(out / "demo-2.bundle")).returncode == 0
    back = run("ctl", root, "bundle", "rollback", "demo")
    assert back.returncode == 0 and "sequence 1 active (was 2)" in back.stdout
    assert run("ctl", root, "bundle", "check", "demo").returncode == 0
    again = run("ctl", root, "bundle", "import", str(out / "demo-1.bundle"))
    assert again.returncode == 5 and "sequence 1 is already installed (active)" in again.stderr


def test_self_test_clips_come_out_the_same(tmp_path: Path) -> None:
    """The clip is part of the signed bundle, which an image preloads: two builds must give
    the same bytes (sox dithers with random noise unless told not to)."""
    from appliance.publish.goldens import speak
    first, second = tmp_path / "a.wav", tmp_path / "b.wav"
    speak("The quick brown fox jumps over the lazy dog.", first)
    speak("The quick brown fox jumps over the lazy dog.", second)
    assert first.read_bytes() == second.read_bytes()
    assert len(first.read_bytes()) > 16_000  # about 3 s of 16 kHz 16-bit audio
