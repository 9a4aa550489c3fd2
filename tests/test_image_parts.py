"""Pieces of the image builder that run without building an image."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from appliance.image import build as image
from appliance.image import wheels as imagewheels
from appliance.image.target import Architecture, load


def _build_dir(root: Path, sha: str, files: dict[str, str], update: str = "ee") -> Path:
    root.mkdir()
    (root / "t.manifest.json").write_text(json.dumps(
        {"sha256": sha, "packages": ["a 1"],
         "system_update": {"file": "appliance-os-5.system", "sha256": update}}))
    (root / "t.files").write_text("".join(f"{h}  {p}\n" for p, h in files.items()))
    return root


def test_compare_lists_differences(tmp_path: Path) -> None:
    a = _build_dir(tmp_path / "a", "11" * 32,
                   {"etc/hostname": "aa", "etc/appliance/api-keys": "bb"})
    b = _build_dir(tmp_path / "b", "22" * 32,
                   {"etc/hostname": "aa", "etc/appliance/api-keys": "cc", "var/extra": "dd"})
    assert image.compare(a, b) == ["image differs: 1111111111111111 vs 2222222222222222",
                                   "file differs: etc/appliance/api-keys",
                                   "file differs: var/extra"]
    same = _build_dir(tmp_path / "c", "11" * 32, {"etc/hostname": "aa",
                                                  "etc/appliance/api-keys": "bb"})
    assert image.compare(a, same) == ["image identical"]
    other_update = _build_dir(tmp_path / "d", "11" * 32, {"etc/hostname": "aa",
                                                          "etc/appliance/api-keys": "bb"}, "ff")
    assert image.compare(a, other_update) == ["image identical", "system_update differ"]


def test_missing_tool_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(image.ImageError, match="needs mmdebstrap") as info:
        image.need("mmdebstrap")
    assert info.value.hint == "apt-get install mmdebstrap"


def _stops_at_build_wheels(ctx: image.Context, message: str) -> image.ImageError:
    """check_host notes the missing toolkit and lets the build go on; build_wheels, the step
    that needs it, stops with the reason and what to install."""
    notes: list[str] = []
    ctx.log = notes.append
    image.check_host(ctx)
    assert any(message in n and "stops at build_wheels" in n for n in notes), notes
    with pytest.raises(image.ImageError, match=message) as info:
        image.build_wheels(ctx)
    assert "--llama-wheel" in (info.value.hint or "")
    return info.value


def test_cuda_target_without_nvcc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image.shutil, "which",
                        lambda tool: None if tool == "nvcc" else f"/usr/bin/{tool}")
    ctx = image.Context(load("x86_64-cuda"), tmp_path, tmp_path, tmp_path, print, None)
    _stops_at_build_wheels(ctx, "needs nvcc on the build host")


def test_cuda_target_without_cublas_says_so(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    (tmp_path / "cuda" / "include").mkdir(parents=True)  # nvcc present, cuBLAS not (as here)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    ctx = image.Context(load("x86_64-cuda"), tmp_path, tmp_path, tmp_path, print, None)
    _stops_at_build_wheels(ctx, "needs cuBLAS headers")
    (tmp_path / "cuda" / "include" / "cublas_v2.h").write_text("")
    assert image.toolkit_problem(ctx) is None


def test_foreign_architecture_turns_on_emulation(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    seen: list[str] = []
    monkeypatch.setattr(image, "enable_emulation", seen.append)
    image.check_host(image.Context(load("arm64"), tmp_path, tmp_path, tmp_path, print, None))
    assert seen == ["aarch64"]


def test_emulation_names_the_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image.shutil, "which",
                        lambda tool: None if tool.startswith("qemu-") else f"/usr/bin/{tool}")
    with pytest.raises(image.ImageError, match="needs qemu-aarch64-static") as info:
        image.enable_emulation("aarch64")
    assert info.value.hint == "apt-get install qemu-user-static"


def test_jetson_without_a_cuda_cross_toolkit_says_what_to_supply(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    monkeypatch.setattr(image, "enable_emulation", lambda machine: None)
    ctx = image.Context(load("jetson"), tmp_path, tmp_path, tmp_path, print, None)
    _stops_at_build_wheels(ctx, "needs the CUDA cross target")
    ctx.llama_wheel = tmp_path / "llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl"
    assert image.toolkit_problem(ctx) is None  # a wheel built on the device needs neither


def test_marker_files_exist_before_packages_install(tmp_path: Path) -> None:
    ctx = image.Context(load("jetson"), tmp_path, tmp_path, tmp_path, print, None)
    marker = "/opt/nvidia/l4t-packages/.nv-l4t-disable-boot-fw-update-in-preinstall"
    assert ctx.setup_hooks == [f'mkdir -p "$1/opt/nvidia/l4t-packages" && touch "$1{marker}"']
    assert ctx.mirrors[0] == "http://ports.ubuntu.com/ubuntu-ports" and len(ctx.mirrors) == 3
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["sh", "-c", ctx.setup_hooks[0], "hook", str(root)], check=True)
    assert (root / marker.lstrip("/")).is_file()


def test_platform_tags_follow_the_image_glibc() -> None:
    tags = imagewheels.platform_tags(Architecture.ARM64, (2, 36))
    assert tags[0] == "manylinux_2_36_aarch64" and "manylinux_2_17_aarch64" in tags
    assert tags[-2:] == ["manylinux2014_aarch64", "linux_aarch64"]
    assert not any("x86_64" in t or "2_37" in t for t in tags)


def test_retag_keeps_the_wheel_valid(tmp_path: Path) -> None:
    wheel = tmp_path / "demo-1.0-py3-none-linux_x86_64.whl"
    meta = "Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-linux_x86_64\n"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("demo/lib.so", b"\x7fELF")
        z.writestr("demo-1.0.dist-info/WHEEL", meta)
        z.writestr("demo-1.0.dist-info/RECORD", "demo/lib.so,sha256=x,4\n"
                   f"demo-1.0.dist-info/WHEEL,sha256=old,{len(meta)}\n"
                   "demo-1.0.dist-info/RECORD,,\n")
    out = imagewheels.retag(wheel, "linux_aarch64")
    assert out.name == "demo-1.0-py3-none-linux_aarch64.whl" and not wheel.exists()
    with zipfile.ZipFile(out) as z:
        new = z.read("demo-1.0.dist-info/WHEEL")
        record = z.read("demo-1.0.dist-info/RECORD").decode()
        assert z.read("demo/lib.so") == b"\x7fELF"
    assert b"Tag: py3-none-linux_aarch64" in new
    digest = base64.urlsafe_b64encode(hashlib.sha256(new).digest()).rstrip(b"=").decode()
    assert f"demo-1.0.dist-info/WHEEL,sha256={digest},{len(new)}" in record.splitlines()


def _tree(tmp_path: Path) -> Path:
    """Just enough of a Debian tree for the network and SSH steps."""
    tree = tmp_path / "work" / "tree"
    for folder in ("etc/systemd/network", "etc/systemd/system", "etc/ssh/sshd_config.d",
                   "lib/systemd/system", "root"):
        (tree / folder).mkdir(parents=True)
    for unit in ("ssh.service", "systemd-resolved.service"):
        (tree / "lib/systemd/system" / unit).write_text(
            "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n")
    (tree / "etc/ssh/ssh_host_ed25519_key").write_text("made at package install\n")
    return tree


def _with_system(name: str, tmp_path: Path, **changes: object) -> image.Context:
    target = dataclasses.replace(load(name), **changes)  # type: ignore[arg-type]
    ctx = image.Context(target, tmp_path, tmp_path / "work", tmp_path, print, None)
    ctx.step = "test"
    return ctx


def test_ssh_only_with_keys_and_only_by_key(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    image.install_ssh(_with_system("x86_64-cpu", tmp_path))
    assert not (tree / "root/.ssh").exists()  # no keys in the target: no SSH at all
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBbX owner@laptop"
    image.install_ssh(_with_system("x86_64-cpu", tmp_path, ssh_keys=(key,)))
    assert (tree / "root/.ssh/authorized_keys").read_text() == key + "\n"
    assert (tree / "root/.ssh/authorized_keys").stat().st_mode & 0o777 == 0o600
    conf = (tree / "etc/ssh/sshd_config.d/appliance.conf").read_text()
    assert "PasswordAuthentication no" in conf and "PermitRootLogin prohibit-password" in conf
    assert "HostKey /var/lib/appliance/ssh/" in conf
    assert not list((tree / "etc/ssh").glob("ssh_host_*"))  # no host key shared by all devices
    wants = tree / "etc/systemd/system/ssh.service.wants/appliance-ssh-hostkey.service"
    assert wants.is_symlink()


def test_mdns_is_answered_by_resolved(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    image.install_network(_with_system("arm64", tmp_path))
    assert "MulticastDNS=yes" in (tree / "etc/systemd/network/20-lan.network").read_text()
    assert "MulticastDNS=yes" in (tree / "etc/systemd/resolved.conf.d/appliance.conf").read_text()
    assert (tree / "etc/hostname").read_text() == "appliance\n"
    image.install_network(_with_system("arm64", tmp_path, mdns=False))
    assert "MulticastDNS" not in (tree / "etc/systemd/network/20-lan.network").read_text()


def test_no_system_update_writes_none_and_leaves_no_stale_one(tmp_path: Path) -> None:
    """`--no-system-update` (the boot tests' build) skips the `.system` file, and removes one
    an earlier build left, so out/ never offers an update that is not this image."""
    (tmp_path / "appliance-os-1.system").write_bytes(b"an older version")
    ctx = image.Context(load("x86_64-cpu"), tmp_path, tmp_path, tmp_path, print, None,
                        system_update=False)
    image.make_system_update(ctx)  # would need the disk image, absent here, if it ran
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert "system_update" not in ctx.inputs
