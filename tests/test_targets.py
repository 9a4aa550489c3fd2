"""Image targets parse, and malformed ones fail naming the file and key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance.errors import FormatError, UsageError
from appliance.image import target as tg

NAMES = ["x86_64-cpu", "x86_64-cuda", "arm64", "jetson"]


@pytest.mark.parametrize("name", NAMES)
def test_shipped_targets_parse(name: str) -> None:
    t = tg.load(name)
    assert t.name == name and t.packages and t.llama_cmake_args
    # disks on Debian 13 (trixie); the Jetson rootfs on Ubuntu 22.04's python3.11 (universe)
    assert "systemd" in t.packages
    assert t.python == ("python3.11" if name == "jetson" else "python3.13")
    assert t.release == ("jammy" if name == "jetson" else "trixie")
    if t.format is tg.ImageFormat.DISK:
        assert t.esp_mb >= tg.MIN_ESP_MB


def test_target_facts() -> None:
    cpu, cuda, jetson = tg.load("x86_64-cpu"), tg.load("x86_64-cuda"), tg.load("jetson")
    assert "-DGGML_AVX512=OFF" in cpu.llama_cmake_args  # runs under TCG and on any v3 CPU
    assert cuda.stack is tg.Stack.CUDA and "nvcc" in cuda.host_tools
    assert "/dev/nvmap" in jetson.devices and jetson.format is tg.ImageFormat.ROOTFS
    assert jetson.marker_files == (
        "/opt/nvidia/l4t-packages/.nv-l4t-disable-boot-fw-update-in-preinstall",)
    assert tg.Architecture.ARM64.qemu_system() == "qemu-system-aarch64"
    assert jetson.flash_target == "nvme" and jetson.board == "jetson-orin-nano-devkit"
    assert all(tg.load(n).mdns for n in NAMES) and not any(tg.load(n).ssh_keys for n in NAMES)


def test_unknown_target() -> None:
    with pytest.raises(UsageError, match="no target 'pdp11'") as info:
        tg.load("pdp11")
    assert "x86_64-cpu" in (info.value.hint or "")
    with pytest.raises(UsageError):
        tg.load("../etc/passwd")


def _variant(tmp_path: Path, old: str, new: str) -> None:
    text = (tg.TARGETS / "x86_64-cpu.toml").read_text()
    assert old in text
    (tmp_path / "x86_64-cpu.toml").write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("old,new,message", [
    ('architecture = "amd64"', 'architecture = "mips"', "architecture is 'mips'"),
    ("esp_mb = 300", "esp_mb = 100", "esp_mb must be between 260"),
    ('hostname = "appliance"', 'hostname = "Bad Host"', "hostname"),
    ('stack = "cpu"', 'stack = "cuda"', "devices must list the GPU device nodes"),
    ("[system]", "[system]\nroot_password = 'x'", "root_password is not a known key"),
    ('"libgomp1"]', '"libgomp1", "evil; rm -rf /"]', "packages[14]"),
    ('"-DGGML_NATIVE=OFF"', '"-DGGML_NATIVE=OFF; curl x"', "cmake_args[0]"),
    ('name = "x86_64-cpu"', 'name = "other"', "but the file is x86_64-cpu.toml"),
    ("mdns = true", 'mdns = "yes"', "mdns must be"),
    ("ssh_authorized_keys = []",
     'ssh_authorized_keys = ["ssh-ed25519 AAAA x\\nPermitRootLogin yes"]',
     "ssh_authorized_keys[0]"),
    ('python = "python3.13"', 'python = "python3.13; true"', "python"),
])
def test_malformed_target(tmp_path: Path, old: str, new: str, message: str) -> None:
    _variant(tmp_path, old, new)
    with pytest.raises(FormatError, match=re.escape(message)) as info:
        tg.load("x86_64-cpu", tmp_path)
    assert "x86_64-cpu.toml" in info.value.message  # names the file
