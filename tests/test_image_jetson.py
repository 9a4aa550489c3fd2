"""The whole Jetson flow on this host: `appliance-build image --target jetson` against a local
file:// apt repository of dummy nvidia-l4t-* packages (their preinst fails, as NVIDIA's does in a
chroot, unless the marker file is there), on Debian arm64 standing in for Ubuntu 22.04, with the
arm64 CPU wheel of llama-cpp-python standing in for the CUDA one; then the generated flash
script against a fake Linux_for_Tegra tree.

    make image-test TARGET=jetson
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from conftest import PROJECT
from fakel4t import calls, fake_lsusb, make_l4t

from appliance.image import wheels as imagewheels
from appliance.image.context import Context
from appliance.image.target import load

pytestmark = pytest.mark.image
MARKER = "/opt/nvidia/l4t-packages/.nv-l4t-disable-boot-fw-update-in-preinstall"
L4T_VERSION = "36.4.0-20240912212859"
CORE_PREINST = f"""#!/bin/sh
# as NVIDIA's: outside a Jetson, installing is only allowed with the marker in place
if [ ! -e "{MARKER}" ] && ! grep -qs nvidia,tegra /proc/device-tree/compatible; then
  echo "nvidia-l4t-core: not a Jetson and no {MARKER}" >&2
  exit 1
fi
"""


def _deb(root: Path, name: str, depends: str, files: dict[str, str],
         preinst: str | None = None) -> None:
    pkg = root / name
    (pkg / "DEBIAN").mkdir(parents=True)
    control = (f"Package: {name}\nVersion: {L4T_VERSION}\nArchitecture: arm64\n"
               "Maintainer: appliance tests <tests@appliance.invalid>\n"
               f"Description: stand-in for NVIDIA's {name}\n")
    if depends:
        control += f"Depends: {depends}\n"
    (pkg / "DEBIAN/control").write_text(control)
    if preinst:
        (pkg / "DEBIAN/preinst").write_text(preinst)
        (pkg / "DEBIAN/preinst").chmod(0o755)
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg),
                    str(root / "repo" / f"{name}_{L4T_VERSION}_arm64.deb")],
                   check=True, capture_output=True)


def _repository(root: Path) -> Path:
    """A flat apt repository: two .deb files made by dpkg-deb and their Packages index."""
    (root / "repo").mkdir(parents=True)
    _deb(root, "nvidia-l4t-core", "", {
        "etc/nv_tegra_release": "# R36 (release), REVISION: 4.0, GCID: 00000000, BOARD: "
                                "generic, EABI: aarch64, DATE: Thu Sep 12 00:00:00 UTC 2024\n"},
        CORE_PREINST)
    _deb(root, "nvidia-l4t-cuda", "nvidia-l4t-core",
         {"usr/share/doc/nvidia-l4t-cuda/README": "stand-in\n"})
    index = subprocess.run(["dpkg-scanpackages", "--multiversion", "."], cwd=root / "repo",
                           check=True, capture_output=True, text=True).stdout
    (root / "repo" / "Packages").write_text(index)
    return root / "repo"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("building an image needs root")
    work = tmp_path_factory.mktemp("jetson")
    repo = _repository(work)
    # the target file as an owner with offline mirrors would copy it: Debian arm64 instead of
    # Ubuntu jammy here, NVIDIA's repository replaced by the dummy one
    doc = tomllib.loads((PROJECT / "build/targets/jetson.toml").read_text())
    doc["base"].update(distribution="debian", release="bookworm", components=["main"],
                       mirror="http://deb.debian.org/debian",
                       extra_repositories=[f"deb [trusted=yes] file://{repo} ./"])
    targets = work / "targets"
    targets.mkdir()
    (targets / "jetson.toml").write_text(tomli_w.dumps(doc))
    # stand-in for the CUDA wheel an owner builds on a Jetson: the arm64 CPU wheel
    arm64 = Context(load("arm64"), work, work, work, print, None)
    wheel = imagewheels.llama_wheel(arm64)
    out = work / "out"
    hashes = work / "api-keys"
    hashes.write_text(f"owner {'0' * 64}\n")  # the owner's key hash: the image has no key
    result = subprocess.run(
        [str(PROJECT / ".venv/bin/appliance-build"), "image", "--target", "jetson",
         "--targets", str(targets), "--llama-wheel", str(wheel), "--out", str(out),
         "--cache", str(PROJECT / ".cache/image"), "--api-keys", str(hashes)],
        capture_output=True, text=True, cwd=PROJECT)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "What a Jetson owner supplies" in result.stdout + result.stderr
    yield out


def test_rootfs_carries_our_layer_and_the_l4t_packages(built: Path) -> None:
    manifest = json.loads((built / "jetson.manifest.json").read_text())
    assert f"nvidia-l4t-core {L4T_VERSION}" in manifest["packages"]
    assert f"nvidia-l4t-cuda {L4T_VERSION}" in manifest["packages"]
    with tarfile.open(built / "jetson.tar") as tar:
        names = set(tar.getnames())
        gpu = tar.extractfile("./etc/systemd/system/appliance.service.d/gpu.conf")
        assert gpu is not None
        allow = gpu.read().decode()
        fstab = tar.extractfile("./etc/fstab")
        assert fstab is not None and b"appliance-root" not in fstab.read()
    for path in ("./opt/appliance/venv/bin/appliance-ctl", "./etc/systemd/system/appliance.service",
                 "./etc/nv_tegra_release", "./etc/appliance/api-keys",
                 "./etc/systemd/system/multi-user.target.wants/appliance.service"):
        assert path in names, path
    assert "." + MARKER not in names  # gone once the packages are in
    assert any(n.startswith("./var/lib/appliance/store/") for n in names)
    assert "SupplementaryGroups=video" in allow
    for node in ("/dev/nvmap", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu/igpu0"):
        assert f"DeviceAllow={node} rw" in allow


def test_flash_script_drives_the_fake_linux_for_tegra(built: Path, tmp_path: Path) -> None:
    l4t, log = make_l4t(tmp_path)
    fake_lsusb(tmp_path / "bin", jetson_present=True)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    result = subprocess.run([str(built / "jetson-flash.sh"), str(l4t)], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr
    recorded = calls(log)
    assert [c[0] for c in recorded] == ["apply_binaries.sh",
                                        "tools/kernel_flash/l4t_initrd_flash.sh"]
    assert {"opt", "etc", "usr", "var"} <= set(recorded[0][3].split())
    assert recorded[1][1].endswith("jetson-orin-nano-devkit internal")
    assert "--external-device nvme0n1p1" in recorded[1][1]
    assert recorded[1][4] == "1"  # NVIDIA's A/B root slots
    assert (l4t / "rootfs/opt/appliance/venv/bin/appliance-ctl").exists()
    assert "Linux_for_Tegra" in (built / "jetson-README.txt").read_text()
