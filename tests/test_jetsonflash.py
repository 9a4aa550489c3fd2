"""The Jetson flash script against a fake Linux_for_Tegra tree: what it calls, in which order,
and each refusal (no BSP, tampered tarball, non-empty rootfs, no device in recovery mode)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from fakel4t import calls, fake_lsusb, make_l4t

from appliance.image.jetsonflash import flash_script

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the flash script insists on root")
NVME = ("--external-device nvme0n1p1 -c tools/kernel_flash/flash_l4t_t234_nvme.xml "
        "-p -c bootloader/generic/cfg/flash_t234_qspi.xml --showlogs --network usb0 "
        "jetson-orin-nano-devkit internal")


def _kit(out: Path, flash_target: str = "nvme") -> Path:
    """A tiny rootfs tarball, its checksum file and the flash script, as the builder writes."""
    out.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"appliance\n"
        info = tarfile.TarInfo("./etc/hostname")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (out / "jetson.tar").write_bytes(buf.getvalue())
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    (out / "jetson.tar.sha256").write_text(f"{digest}  jetson.tar\n")
    script = out / "jetson-flash.sh"
    script.write_text(flash_script(artifact="jetson.tar", board="jetson-orin-nano-devkit",
                                   flash_target=flash_target, name="jetson"))
    script.chmod(0o755)
    return script


def _flash(script: Path, l4t: Path, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run([str(script), str(l4t)], capture_output=True, text=True, env=env)


def test_nvme_flow_unpacks_applies_then_flashes(tmp_path: Path) -> None:
    script = _kit(tmp_path / "out")
    l4t, log = make_l4t(tmp_path)
    fake_lsusb(tmp_path / "bin", jetson_present=True)
    result = _flash(script, l4t, tmp_path / "bin")
    assert result.returncode == 0, result.stderr
    assert (l4t / "rootfs/etc/hostname").read_text() == "appliance\n"
    recorded = calls(log)
    assert [c[0] for c in recorded] == ["apply_binaries.sh",
                                        "tools/kernel_flash/l4t_initrd_flash.sh"]
    assert recorded[0][2] == str(l4t) and "etc" in recorded[0][3].split()  # rootfs in place
    assert recorded[1][1] == NVME and recorded[1][2] == str(l4t)
    assert recorded[1][4] == "1"  # flashed with NVIDIA's A/B root slots (APP, APP_b)


def test_sdcard_needs_no_device_and_writes_an_image_beside_the_kit(tmp_path: Path) -> None:
    script = _kit(tmp_path / "out", "sdcard")
    l4t, log = make_l4t(tmp_path)
    fake_lsusb(tmp_path / "bin", jetson_present=False)
    result = _flash(script, l4t, tmp_path / "bin")
    assert result.returncode == 0, result.stderr
    assert calls(log)[-1][:2] == [
        "tools/jetson-disk-image-creator.sh",
        f"-o {tmp_path / 'out' / 'jetson-sdcard.img'} -b jetson-orin-nano-devkit"]
    assert calls(log)[-1][4] == ""  # an SD card image has one root slot


def test_internal_emmc(tmp_path: Path) -> None:
    script = _kit(tmp_path / "out", "internal")
    l4t, log = make_l4t(tmp_path)
    fake_lsusb(tmp_path / "bin", jetson_present=True)
    assert _flash(script, l4t, tmp_path / "bin").returncode == 0
    assert calls(log)[-1][1] == "jetson-orin-nano-devkit internal"
    assert calls(log)[-1][4] == "1"


@pytest.mark.parametrize("breakage, message", [
    ("no-device", "no Jetson in USB recovery mode"),
    ("no-bsp", "has no apply_binaries.sh"),
    ("tampered", "does not match jetson.tar.sha256"),
    ("rootfs-in-use", "rootfs is not empty"),
])
def test_refusals_touch_nothing(tmp_path: Path, breakage: str, message: str) -> None:
    script = _kit(tmp_path / "out")
    l4t, log = make_l4t(tmp_path)
    fake_lsusb(tmp_path / "bin", jetson_present=breakage != "no-device")
    if breakage == "no-bsp":
        (l4t / "apply_binaries.sh").unlink()
    elif breakage == "tampered":
        with (tmp_path / "out" / "jetson.tar").open("ab") as f:
            f.write(b"\0")
    elif breakage == "rootfs-in-use":
        (l4t / "rootfs" / "bin").mkdir()
    result = _flash(script, l4t, tmp_path / "bin")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 1 and message in lines[-1] and lines[-1].startswith("jetson-flash: ")
    assert calls(log) == []  # neither apply_binaries nor a flash tool ran
    assert not (l4t / "rootfs" / "etc").exists()  # nothing unpacked


def test_usage_line(tmp_path: Path) -> None:
    script = _kit(tmp_path / "out")
    result = subprocess.run([str(script)], capture_output=True, text=True)
    assert result.returncode == 1 and "usage: sudo" in result.stderr
