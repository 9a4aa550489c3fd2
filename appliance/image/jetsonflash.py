"""The Jetson hand-off: a rootfs tarball with our layer, plus a flash script that runs NVIDIA's
own Linux_for_Tegra tools on the owner's host.

NVIDIA's flow (Jetson Linux r36): unpack the BSP to Linux_for_Tegra/, put a root file system in
Linux_for_Tegra/rootfs/, run apply_binaries.sh (kernel, modules, firmware and the L4T packages
into that tree), then flash with the device in USB recovery mode: l4t_initrd_flash.sh for eMMC or
NVMe, or jetson-disk-image-creator.sh for an SD card image (no device needed). The script below
does exactly that and stops with one readable line at the first thing that is missing.
"""

from __future__ import annotations

import shlex

# how each flash_target is written, as arguments after `cd Linux_for_Tegra`. ROOTFS_AB=1 lays
# out NVIDIA's two root slots (APP, APP_b) with their retry counters: the A/B mapping of
# docs/images.md. An SD card image has one root slot (NVIDIA's creator script has no A/B).
FLASH_COMMANDS = {
    "internal": ["env", "ROOTFS_AB=1", "./tools/kernel_flash/l4t_initrd_flash.sh", "{board}",
                 "internal"],
    "nvme": ["env", "ROOTFS_AB=1", "./tools/kernel_flash/l4t_initrd_flash.sh",
             "--external-device", "nvme0n1p1",
             "-c", "tools/kernel_flash/flash_l4t_t234_nvme.xml",
             "-p", "-c bootloader/generic/cfg/flash_t234_qspi.xml",
             "--showlogs", "--network", "usb0", "{board}", "internal"],
    "sdcard": ["./tools/jetson-disk-image-creator.sh", "-o", "{image}", "-b", "{board}"],
}
NVIDIA_USB_VENDOR = "0955"  # a Jetson in recovery mode shows up as 0955:7xxx

OWNER_INPUTS = """\
What a Jetson owner supplies (none of it can be fetched or checked on this build host):
  1. NVIDIA's Jetson Linux BSP for the board (Jetson_Linux_R36.x_aarch64.tbz2), unpacked to
     Linux_for_Tegra/ on an x86-64 Ubuntu host with NVIDIA's flashing prerequisites installed
     (Linux_for_Tegra/tools/l4t_flash_prerequisites.sh);
  2. mirrors the build host can reach: Ubuntu 22.04 (jammy) arm64 from ports.ubuntu.com and
     NVIDIA's Jetson apt repository (repo.download.nvidia.com/jetson, common + t234, r36.x),
     set as [base] mirror and extra_repositories in a copy of build/targets/jetson.toml
     (a Debian build host also needs Ubuntu's archive key: apt-get install ubuntu-keyring);
  3. a CUDA build of llama-cpp-python for the board: `--llama-wheel` with a wheel built on a
     Jetson (CMAKE_ARGS as in the target file), or NVIDIA's cuda-cross-aarch64 on the host;
  4. the device, in USB recovery mode, connected to that host (not needed for an SD card image).
"""


def flash_script(*, artifact: str, board: str, flash_target: str, name: str) -> str:
    """A POSIX shell script, written beside the rootfs tarball."""
    command = " ".join(
        '"$BOARD"' if part == "{board}" else '"$HERE/' + name + '-sdcard.img"'
        if part == "{image}" else shlex.quote(part)
        for part in FLASH_COMMANDS[flash_target])
    needs_device = flash_target != "sdcard"
    recovery = f"""
if ! lsusb -d {NVIDIA_USB_VENDOR}: >/dev/null 2>&1; then
  fail "no Jetson in USB recovery mode (lsusb -d {NVIDIA_USB_VENDOR}: finds none): hold \
RECOVERY, press RESET, connect the USB-C port to this host"
fi
""" if needs_device else ""
    return f"""#!/bin/sh
# Flash the appliance rootfs ({artifact}) onto a {board} with NVIDIA's Linux_for_Tegra tools.
#   sudo ./{name}-flash.sh /path/to/Linux_for_Tegra
# Made by `appliance-build image --target {name}`; see {name}-README.txt for what you supply.
set -eu
fail() {{ echo "{name}-flash: $*" >&2; exit 1; }}
[ $# -eq 1 ] || fail "usage: sudo $0 /path/to/Linux_for_Tegra"
HERE=$(cd "$(dirname "$0")" && pwd)
L4T=$(cd "$1" 2>/dev/null && pwd) || fail "$1: no such folder"
BOARD={shlex.quote(board)}
[ "$(id -u)" -eq 0 ] || fail "run it as root: NVIDIA's tools write device nodes and rootfs owners"
[ -x "$L4T/apply_binaries.sh" ] || fail "$L4T has no apply_binaries.sh: unpack NVIDIA's \
Jetson Linux BSP (Jetson_Linux_R36.x_aarch64.tbz2) and pass its Linux_for_Tegra folder"
(cd "$HERE" && sha256sum --quiet -c {shlex.quote(artifact)}.sha256) || \
  fail "{artifact} does not match {artifact}.sha256: copy it again"
mkdir -p "$L4T/rootfs"
if [ -n "$(ls -A "$L4T/rootfs" | grep -v '^README.txt$' || true)" ]; then
  fail "$L4T/rootfs is not empty: move its contents away first"
fi
{recovery}echo "{name}-flash: unpacking the rootfs into $L4T/rootfs"
tar -xpf "$HERE/{artifact}" --numeric-owner -C "$L4T/rootfs"
cd "$L4T"
echo "{name}-flash: apply_binaries.sh (NVIDIA's kernel, firmware and L4T packages)"
./apply_binaries.sh
echo "{name}-flash: flashing ({flash_target})"
{command}
echo "{name}-flash: done"
"""
