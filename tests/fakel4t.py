"""A fake Linux_for_Tegra tree whose NVIDIA scripts only record how they were called, and a
fake `lsusb` that does or does not see a Jetson in recovery mode."""

from __future__ import annotations

from pathlib import Path

RECORDER = """#!/bin/sh
# records: the script, its arguments, where it ran, what the rootfs held, and ROOTFS_AB
printf '%s|%s|%s|%s|%s\\n' "{name}" "$*" "$(pwd)" "$(ls rootfs 2>/dev/null | tr '\\n' ' ')" \
  "${{ROOTFS_AB:-}}" >> "{calls}"
"""
SCRIPTS = ("apply_binaries.sh", "tools/kernel_flash/l4t_initrd_flash.sh",
           "tools/jetson-disk-image-creator.sh")


def make_l4t(root: Path) -> tuple[Path, Path]:
    """Linux_for_Tegra/ with recording scripts; returns (folder, calls log)."""
    l4t, calls = root / "Linux_for_Tegra", root / "calls.log"
    for rel in SCRIPTS:
        script = l4t / rel
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(RECORDER.format(name=rel, calls=calls))
        script.chmod(0o755)
    (l4t / "rootfs").mkdir()
    (l4t / "rootfs" / "README.txt").write_text("NVIDIA's placeholder\n")
    return l4t, calls


def fake_lsusb(bin_dir: Path, jetson_present: bool) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    lsusb = bin_dir / "lsusb"
    if jetson_present:
        lsusb.write_text("#!/bin/sh\necho 'Bus 001 Device 007: ID 0955:7523 NVIDIA Corp. APX'\n")
    else:
        lsusb.write_text("#!/bin/sh\nexit 1\n")
    lsusb.chmod(0o755)


def calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [line.split("|") for line in log.read_text().splitlines()]
