"""Building an OS image for a target: one readable list of named steps over one Context.

    host check -> signed bundle -> base tree (mmdebstrap) -> wheels for the image's Python
    (appliance/imagewheels.py) -> venv -> units, network, SSH, keys and settings -> preloaded
    bundle -> disk (genimage) or rootfs tarball (+ Jetson flash kit) -> manifest

Every external tool goes through `run()`, which names the step and the tool when it fails, and
`need()` checks for each tool before anything starts, naming the package to install.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from appliance.bundle import keys
from appliance.bundle import system as sy
from appliance.device import apikeys
from appliance.device import system as sysmod
from appliance.device.install import import_bundle
from appliance.device.layout import Layout
from appliance.errors import UsageError
from appliance.image import jetsonflash
from appliance.image import wheels as imagewheels
from appliance.image.context import PROJECT, Context, ImageError, Log, need, run
from appliance.image.target import Architecture, ImageFormat, Stack, Target
from appliance.publish import build as bundle_mod
from appliance.publish import system as system_update

# --- steps ----------------------------------------------------------------------------------

def check_host(ctx: Context) -> None:
    """Fail before any work when a tool or a host capability is missing. A missing GPU
    toolkit only stops the build at the step that needs it (build_wheels): everything before
    it is still built and checked."""
    t = ctx.target
    for tool in ("mmdebstrap", "systemctl", "systemd-sysusers"):
        need(tool)
    if t.format is ImageFormat.DISK:
        for tool in ("genimage", "mke2fs", "debugfs", "mkdosfs", "mcopy"):
            need(tool)
    ctx.toolkit_missing = toolkit_problem(ctx)
    if ctx.toolkit_missing is not None:
        ctx.log(f"  note: {ctx.toolkit_missing.message}; the build goes on and stops at "
                "build_wheels")
    if t.architecture.uname() != os.uname().machine:
        enable_emulation(t.architecture.uname())


def toolkit_problem(ctx: Context) -> ImageError | None:
    """What the build host lacks to compile llama.cpp for the target's GPU stack, if anything
    (a wheel given with --llama-wheel needs nothing)."""
    t = ctx.target
    if ctx.llama_wheel is not None or t.stack is Stack.CPU:
        return None
    for tool in t.host_tools:
        if shutil.which(tool) is None:
            return ImageError(
                f"target {t.name} builds llama.cpp with {t.stack.value}, which needs {tool} on "
                "the build host",
                hint="install NVIDIA's CUDA toolkit, or pass --llama-wheel with a wheel built on "
                     "the device")
    cuda = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    headers = [cuda / "include" / "cublas_v2.h", Path("/usr/include/cublas_v2.h")]  # Debian's
    if t.stack is Stack.CUDA and not any(h.exists() for h in headers):
        # llama.cpp's CUDA backend links cuBLAS; nvcc alone is not enough
        return ImageError(
            f"target {t.name} builds llama.cpp with CUDA, which needs cuBLAS headers "
            f"({headers[0]} is missing)",
            hint="install a CUDA toolkit with cuBLAS of the target's CUDA version (Debian 13: "
                 "nvidia-cuda-toolkit, CUDA 12.4) or set CUDA_HOME, or pass --llama-wheel with "
                 "a CUDA wheel built elsewhere")
    cross = cuda / "targets" / f"{t.architecture.uname()}-linux"
    if t.architecture.uname() != os.uname().machine and not cross.is_dir():
        return ImageError(
            f"target {t.name} cross-compiles llama.cpp with CUDA for {t.architecture}, which "
            f"needs the CUDA cross target {cross}",
            hint="install NVIDIA's cuda-cross-aarch64 for the device's CUDA release, or pass "
                 "--llama-wheel with a wheel built on the device")
    return None


def enable_emulation(machine: str) -> None:
    """Foreign trees run their package scripts through qemu-user: binfmt_misc must be mounted
    and qemu-<machine> registered with the F flag (the interpreter is opened once, so chroots
    need no copy of it)."""
    need(f"qemu-{machine}-static")
    need("update-binfmts")
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        result = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise ImageError(f"cannot mount binfmt_misc: {result.stderr.strip()}",
                             hint="run the build as root on a host (or privileged container) "
                                  "that may mount binfmt_misc")
    entry = binfmt / f"qemu-{machine}"
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        subprocess.run(["update-binfmts", "--enable", f"qemu-{machine}"], capture_output=True)
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        raise ImageError(f"qemu-{machine} is not registered with binfmt_misc",
                         hint="apt-get install qemu-user-static binfmt-support")


def build_wheels(ctx: Context) -> None:
    if ctx.toolkit_missing is not None:
        raise ctx.toolkit_missing
    ctx.inputs["wheels"] = imagewheels.collect(ctx)


def build_bundle(ctx: Context) -> None:
    """The preloaded bundle, signed with the given key (or a new one kept beside the image)."""
    t = ctx.target
    if ctx.signing_key is None:
        prefix = ctx.out / f"{t.name}-signing"
        if not prefix.with_suffix(".key").exists():
            keys.generate(prefix)
        ctx.signing_key = prefix.with_suffix(".key")
    private = keys.load_private(ctx.signing_key)
    ctx.trust_pub = ctx.work / "publisher.pub"
    ctx.trust_pub.write_bytes(keys.public_pem(private.public_key()))
    if t.preload:
        ctx.bundle = bundle_mod.build(PROJECT / t.preload, [private], ctx.work / "bundle",
                                      ctx.cache.parent / "bundle", ctx.log)
        ctx.inputs["bundle"] = ctx.bundle.name


LOCAL_PORT = 8080  # the loopback HTTP listener (console, on-device tools)
# GPT partition types of a root slot (the Discoverable Partitions Specification), which
# sysupdate's `MatchPartitionType=root` looks for
ROOT_TYPES = {Architecture.AMD64: "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
              Architecture.ARM64: "b921b045-1df0-41c3-af44-4c6f280d3fae"}
# The initramfs is built once, after every package is in: the kernel's postinst and the
# initramfs-tools trigger would each build it (five minutes apiece under qemu-user for arm64).
INITRAMFS_OFF = ('chroot "$1" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs'
                 ' && printf "#!/bin/sh\\nexit 0\\n" > "$1/usr/sbin/update-initramfs"'
                 ' && chmod 755 "$1/usr/sbin/update-initramfs"')
INITRAMFS_ONCE = ('rm -f "$1/usr/sbin/update-initramfs"'
                  ' && chroot "$1" dpkg-divert --quiet --local --rename --remove'
                  ' /usr/sbin/update-initramfs'
                  ' && if [ -x "$1/usr/sbin/update-initramfs" ] && [ -d "$1/lib/modules" ];'
                  ' then chroot "$1" update-initramfs -c -k all; fi')


def install_base_tree(ctx: Context) -> None:
    t = ctx.target
    ctx.log(f"  {t.distribution} {t.release} {t.architecture.value}, {len(t.packages)} packages")
    packages = [*t.packages, t.python, f"{t.python}-venv"]
    if t.ssh_keys:
        packages.append("openssh-server")
    if t.mdns:
        packages.append("systemd-resolved")
    # marker files exist before the first package installs, and go once all are in
    removals = [f'rm -f "$1{m}"' for m in t.marker_files]
    run(ctx, "mmdebstrap", "--mode=root", "--variant=apt", f"--architectures={t.architecture}",
        f"--components={','.join(t.components)}", f"--include={','.join(packages)}",
        *ctx.mirror_options, *[f"--setup-hook={hook}" for hook in ctx.setup_hooks],
        f"--essential-hook={INITRAMFS_OFF}", f"--customize-hook={INITRAMFS_ONCE}",
        "--customize-hook=chroot \"$1\" apt-get clean",
        "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/*",
        *[f"--customize-hook={hook}" for hook in removals],
        t.release, ctx.tree, *ctx.mirrors)
    versions = run(ctx, "chroot", ctx.tree, "dpkg-query", "-W", "-f", "${Package} ${Version}\n")
    ctx.inputs["packages"] = versions.strip().splitlines()


def install_python_env(ctx: Context) -> None:
    """A venv with the image's own python3, installed only from the wheels built above."""
    staged = ctx.tree / "tmp" / "wheels"
    shutil.copytree(ctx.wheels, staged)
    run(ctx, "chroot", ctx.tree, ctx.target.python, "-m", "venv", "/opt/appliance/venv")
    run(ctx, "chroot", ctx.tree, "/opt/appliance/venv/bin/pip", "install", "-q", "--no-index",
        "--find-links", "/tmp/wheels", "appliance", "llama-cpp-python",
        env={"PIP_CONFIG_FILE": "/dev/null", "PIP_FIND_LINKS": "", "PIP_CONSTRAINT": ""})
    shutil.rmtree(staged)
    shutil.copy(PROJECT / "README.md", ctx.tree / "opt/appliance/README.md")


def install_units(ctx: Context) -> None:
    """Units, the service user, tmpfiles, mounts; firstboot off, no root login."""
    tree, units = ctx.tree, PROJECT / "systemd"
    system = tree / "etc/systemd/system"
    for unit in ("appliance.service", "appliance-import@.service",
                 "appliance-console-status.service", "appliance-trial.service",
                 "appliance-trial.path", "appliance-init.service"):
        shutil.copy(units / unit, system / unit)
    if ctx.target.devices:
        dropin = system / "appliance.service.d"
        dropin.mkdir()
        allow = "\n".join(f"DeviceAllow={d} rw" for d in ctx.target.devices)
        # the GPU nodes belong to the video group on Jetson (root:video 0660)
        (dropin / "gpu.conf").write_text(
            f"[Service]\nPrivateDevices=no\nSupplementaryGroups=video\n{allow}\n")
    shutil.copy(units / "90-appliance-usb.rules", tree / "etc/udev/rules.d/")
    shutil.copy(units / "appliance.sysusers", tree / "usr/lib/sysusers.d/appliance.conf")
    shutil.copy(units / "appliance.tmpfiles", tree / "usr/lib/tmpfiles.d/appliance.conf")
    # the root file system is read-only: users exist before first boot
    run(ctx, "systemd-sysusers", f"--root={tree}")
    run(ctx, "systemd-tmpfiles", f"--root={tree}", "--create",
        tree / "usr/lib/tmpfiles.d/appliance.conf")
    (tree / "etc/machine-id").write_text("")  # systemd makes a transient one on a read-only root
    tmpfs = "tmpfs /tmp tmpfs nosuid,nodev,mode=1777 0 0\n"
    if ctx.target.format is ImageFormat.ROOTFS:
        # the vendor's flash tools lay out the partitions and mount the root read-write
        (tree / "etc/fstab").write_text(tmpfs)
    else:
        # no line for /: the boot entry names the slot (root=PARTLABEL=appliance_<v>) and
        # mounts it ro; both slots' file systems carry the same label. The ESP is mounted on
        # demand, for systemd-sysupdate and systemd-bless-boot.
        (tree / "etc/fstab").write_text(
            "LABEL=appliance-data /var/lib/appliance ext4 defaults,nosuid,nodev,noexec 0 2\n"
            # no idle timeout: expiring the mount would stop a sysupdate that requires it
            # quiet: chmod on FAT succeeds without effect instead of failing a writer that asks
            "PARTLABEL=esp /efi vfat noauto,x-systemd.automount,umask=0077,quiet,nosuid,nodev,"
            "noexec 0 0\n"
            + tmpfs +
            "tmpfs /var/tmp tmpfs nosuid,nodev,mode=1777 0 0\n"
            "tmpfs /var/log tmpfs nosuid,nodev,mode=0755 0 0\n"
            "tmpfs /var/lib/systemd tmpfs nosuid,nodev,mode=0755 0 0\n")
    run(ctx, "systemctl", f"--root={tree}", "enable", "appliance.service",
        "appliance-init.service", "appliance-console-status.service", "appliance-trial.path",
        "systemd-networkd.service")
    run(ctx, "systemctl", f"--root={tree}", "mask", "systemd-firstboot.service",
        "systemd-networkd-wait-online.service")
    run(ctx, "chroot", tree, "passwd", "--lock", "root")


SYSTEM_UNITS = ("appliance-sysupdate.service", "appliance-boot-check.service",
                "appliance-system-settle.service")


def install_system_slots(ctx: Context) -> None:
    """A/B system slots: the version this image is (os-release's IMAGE_VERSION, which
    sysupdate protects as the running one), sysupdate's transfer definitions, the check that
    decides a new version on its counted boot, the settle step of every boot, and a hardware
    watchdog (a hung boot resets, and the reset costs a try)."""
    t, tree, v = ctx.target, ctx.tree, ctx.version
    if t.format is not ImageFormat.DISK:
        return
    if not (tree / "usr/lib/systemd/systemd-sysupdate").exists():
        raise ImageError(f"target {t.name} has no systemd-sysupdate for its A/B slots",
                         hint="add systemd-container (Debian 13 or later) to its packages")
    release = tree / "usr/lib/os-release"
    lines = [line for line in release.read_text().splitlines()
             if not line.startswith(("IMAGE_ID=", "IMAGE_VERSION="))]
    release.unlink()  # a regular file of base-files; never write through a link
    release.write_text("\n".join([*lines, "IMAGE_ID=appliance", f"IMAGE_VERSION={v}"]) + "\n")
    (tree / sysmod.SYSTEM_TOML).parent.mkdir(parents=True, exist_ok=True)
    (tree / sysmod.SYSTEM_TOML).write_text(
        f'version = {v}\ntarget = "{t.name}"\narchitecture = "{t.architecture.value}"\n'
        f'channel = "{sy.CHANNEL}"\n')
    transfers = tree / "usr/lib/sysupdate.d"
    transfers.mkdir(parents=True, exist_ok=True)
    for transfer in sorted((PROJECT / "systemd/sysupdate.d").glob("*.transfer")):
        shutil.copy(transfer, transfers / transfer.name)
    for unit in SYSTEM_UNITS:
        shutil.copy(PROJECT / "systemd" / unit, tree / "etc/systemd/system" / unit)
    conf = tree / "etc/systemd/system.conf.d"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "appliance-watchdog.conf").write_text("[Manager]\nRuntimeWatchdogSec=60s\n")
    (tree / "efi").mkdir(exist_ok=True)  # the root is read-only: the mount point is made here
    run(ctx, "systemctl", f"--root={tree}", "enable", "appliance-boot-check.service",
        "appliance-system-settle.service")
    # sysupdate runs its helpers directly; importd's socket is never needed
    run(ctx, "systemctl", f"--root={tree}", "mask", "systemd-importd.socket")
    ctx.inputs["system_version"] = v


def install_network(ctx: Context) -> None:
    """DHCP with a link-local fallback on every wired port; the name <hostname>.local answered
    over mDNS by systemd-resolved when the target asks for it (nothing else is resolved)."""
    t, tree = ctx.target, ctx.tree
    mdns = "MulticastDNS=yes\n" if t.mdns else ""
    (tree / "etc/systemd/network/20-lan.network").write_text(
        f"[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\nLinkLocalAddressing=yes\n{mdns}")
    (tree / "etc/hostname").write_text(t.hostname + "\n")
    if t.mdns:
        conf = tree / "etc/systemd/resolved.conf.d"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "appliance.conf").write_text("[Resolve]\nMulticastDNS=yes\nLLMNR=no\n")
        run(ctx, "systemctl", f"--root={tree}", "enable", "systemd-resolved.service")


def install_ssh(ctx: Context) -> None:
    """Only with ssh_authorized_keys: root logs in with those keys and nothing else; the host
    key is made on each device's first boot (appliance-ssh-hostkey.service)."""
    t, tree = ctx.target, ctx.tree
    if not t.ssh_keys:
        return
    ssh = tree / "root/.ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    (ssh / "authorized_keys").write_text("".join(k + "\n" for k in t.ssh_keys))
    (ssh / "authorized_keys").chmod(0o600)
    for key in (tree / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # the package made these at install time: one set for every device
    (tree / "etc/ssh/sshd_config.d/appliance.conf").write_text(
        "HostKey /var/lib/appliance/ssh/ssh_host_ed25519_key\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nAllowUsers root\nX11Forwarding no\n")
    shutil.copy(PROJECT / "systemd/appliance-ssh-hostkey.service",
                tree / "etc/systemd/system/appliance-ssh-hostkey.service")
    run(ctx, "systemctl", f"--root={tree}", "enable", "appliance-ssh-hostkey.service",
        "ssh.service")


def install_config(ctx: Context) -> None:
    """The seed of the device's configuration: trusted publisher key, service settings, and
    the API key hashes the owner gave (none: the first control document adds one). The image
    holds no secret of its own: each device makes its identity and TLS key on first boot."""
    t, layout = ctx.target, Layout(ctx.tree)
    assert ctx.trust_pub is not None
    layout.trust.add(ctx.trust_pub)
    hosts = [t.hostname, f"{t.hostname}.local"]
    # HTTPS on the LAN with the device's certificate; clear HTTP only on loopback (the console)
    layout.config.write_text(
        f'[server]\nhost = "{t.listen}"\nport = {t.port}\nlocal_port = {LOCAL_PORT}\n'
        f"allowed_hosts = {json.dumps(hosts)}\n")
    keyfile = ctx.tree / "etc/appliance/api-keys"
    if ctx.api_keys is None:
        ctx.log("  no API key hashes given: the first control document must add a key")
        return
    keys = apikeys.read(ctx.api_keys)  # checked here: a typo must not ship
    apikeys.write(keyfile, keys)
    gid = int(run(ctx, "chroot", ctx.tree, "getent", "group", "appliance").split(":")[2])
    os.chown(keyfile, 0, gid)
    keyfile.chmod(0o640)
    ctx.log(f"  API keys: {', '.join(keys)} (hashes only)")


def preload_bundle(ctx: Context) -> None:
    if ctx.bundle is not None:
        inst = import_bundle(ctx.bundle, Layout(ctx.tree))
        ctx.log(f"  preloaded {inst.name} sequence {inst.sequence}")


def make_disk(ctx: Context) -> None:
    """GPT disk: ESP (systemd-boot, kernel, initrd), read-only root, data partition."""
    t = ctx.target
    if t.format is ImageFormat.ROOTFS:
        clamp_mtimes(ctx.tree, ctx.epoch)
        list_tree(ctx)
        run(ctx, "tar", "--sort=name", f"--mtime=@{ctx.epoch}", "--numeric-owner", "-C",
            ctx.tree, "-cf", ctx.out / f"{t.name}.tar", ".")
        if t.stack is Stack.JETSON:
            write_flash_kit(ctx)
        return
    esp = ctx.work / "esp"
    (esp / "EFI/BOOT").mkdir(parents=True)
    (esp / "loader/entries").mkdir(parents=True)
    (esp / "appliance").mkdir()
    efi_name = "BOOTX64.EFI" if t.architecture is Architecture.AMD64 else "BOOTAA64.EFI"
    stub = "x64" if t.architecture is Architecture.AMD64 else "aa64"
    shutil.copy(ctx.tree / f"usr/lib/systemd/boot/efi/systemd-boot{stub}.efi",
                esp / "EFI/BOOT" / efi_name)
    kernel, initrd = boot_files(ctx)
    image = kernel.read_bytes()
    if image[:2] == b"\x1f\x8b":  # arm64 kernels ship gzipped; the EFI stub needs the Image
        image = gzip.decompress(image)
    v = ctx.version
    (esp / "appliance" / sy.part_name(v, "vmlinuz")).write_bytes(image)
    shutil.copy(initrd, esp / "appliance" / sy.part_name(v, "initrd"))
    # the newest entry that is not bad boots: systemd-boot sorts same-sort-key entries by
    # version, and puts entries whose tries are spent last
    (esp / "loader/loader.conf").write_text(
        "default appliance_*\ntimeout 0\neditor no\nauto-entries no\nauto-firmware no\n")
    (esp / "loader/entries" / sy.part_name(v, "conf")).write_text(
        sy.boot_entry(v, t.architecture.value))
    for folder in (ctx.tree, esp):
        clamp_mtimes(folder, ctx.epoch)
    list_tree(ctx)
    # identifiers derived from the target and the build time, not random: two builds of the
    # same inputs can then be compared byte for byte
    ids = {part: uuid.uuid5(uuid.NAMESPACE_URL, f"appliance:{t.name}:{ctx.epoch}:{part}")
           for part in ("disk", "root", "data", "root-seed", "data-seed", "esp-part",
                        "root-part", "slot-b-part", "data-part")}
    root_type = ROOT_TYPES[t.architecture]
    serial = ids["disk"].hex[:8]
    files = [p.relative_to(esp).as_posix() for p in esp.rglob("*") if p.is_file()]
    entries = "\n".join(f'    file "{f}" {{ image = "esp/{f}" }}' for f in files)
    cfg = ctx.work / "genimage.cfg"
    cfg.write_text(f"""
image esp.vfat {{
  vfat {{
    label = "ESP"
    extraargs = "--invariant -i {serial}"
{entries}
  }}
  size = {t.esp_mb}M
}}
image root.ext4 {{
  ext4 {{ label = "appliance-root" use-mke2fs = true
          extraargs = "-U {ids['root']} -E hash_seed={ids['root-seed']}" }}
  mountpoint = "/"
  size = {t.root_mb}M
}}
image data.ext4 {{
  ext4 {{ label = "appliance-data" use-mke2fs = true
          extraargs = "-U {ids['data']} -E hash_seed={ids['data-seed']}" }}
  mountpoint = "/var/lib/appliance"
  size = {t.data_mb}M
}}
image {t.name}.img {{
  hdimage {{ partition-table-type = "gpt" disk-uuid = "{ids['disk']}" }}
  partition esp {{ image = "esp.vfat" partition-type-uuid = "U"
                   partition-uuid = "{ids['esp-part']}" }}
  partition {slot_name(ctx.version)} {{ image = "root.ext4" partition-type-uuid = "{root_type}"
                    partition-uuid = "{ids['root-part']}" }}
  partition _empty {{ size = {t.root_mb}M partition-type-uuid = "{root_type}"
                      partition-uuid = "{ids['slot-b-part']}" }}
  partition data {{ image = "data.ext4" partition-type-uuid = "L"
                    partition-uuid = "{ids['data-part']}" }}
}}
""")
    with tempfile.TemporaryDirectory(dir=ctx.work) as tmp:
        run(ctx, "genimage", "--config", cfg, "--rootpath", ctx.tree, "--inputpath", ctx.work,
            "--outputpath", ctx.out, "--tmppath", Path(tmp) / "genimage")
    for part in ("esp.vfat", "root.ext4", "data.ext4"):
        (ctx.out / part).unlink(missing_ok=True)
    settle_inode_times(ctx, ctx.out / f"{t.name}.img")


def boot_files(ctx: Context) -> tuple[Path, Path]:
    """The kernel and initrd the tree's packages installed (the newest, if several)."""
    return (sorted((ctx.tree / "boot").glob("vmlinuz-*"))[-1],
            sorted((ctx.tree / "boot").glob("initrd.img-*"))[-1])


def slot_name(version: int) -> str:
    """The GPT name of a version's root slot, as systemd-sysupdate names the slot it writes."""
    return f"appliance_{version}"


def make_system_update(ctx: Context) -> None:
    """The same version as a signed system update (`appliance-os-<v>.system`), for devices
    already in the field: the root slot exactly as in the disk image, its kernel, initrd and
    boot entry, signed with the key of the preloaded bundle (one trust root)."""
    t = ctx.target
    if t.format is not ImageFormat.DISK:
        return
    for old in ctx.out.glob(f"{sy.CHANNEL}-*{sy.SUFFIX}"):  # never beside another version
        old.unlink()
    if not ctx.system_update:
        ctx.log("skipped (--no-system-update)")
        return
    assert ctx.signing_key is not None
    disk = ctx.out / f"{t.name}.img"
    first, last = gpt_partitions(disk)[slot_name(ctx.version)]
    root = ctx.work / "root.ext4"
    copy_sparse(disk, first * 512, (last - first + 1) * 512, root)
    kernel, initrd = boot_files(ctx)
    update = system_update.build(root, kernel, initrd, ctx.version, t.name,
                                 t.architecture.value, [keys.load_private(ctx.signing_key)],
                                 ctx.out, ctx.log)
    root.unlink()
    ctx.inputs["system_update"] = {"file": update.name, "sha256": sha256_of(update)}


def copy_sparse(src: Path, offset: int, size: int, dest: Path) -> None:
    """Copy a byte range, leaving holes where the source has zeros (a 3 GiB slot is mostly
    empty)."""
    block = 1 << 20
    zero = bytes(block)
    with src.open("rb") as f, dest.open("wb") as out:
        f.seek(offset)
        left = size
        while left:
            chunk = f.read(min(block, left))
            if not chunk:
                raise ImageError(f"{src} ends inside the partition at {offset}")
            if chunk == zero[:len(chunk)]:
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
            left -= len(chunk)
        out.truncate(size)


def gpt_partitions(disk: Path) -> dict[str, tuple[int, int]]:
    """(first, last) sector of each partition in a GPT disk, by GPT partition name."""
    with disk.open("rb") as f:
        f.seek(512)
        header = f.read(92)
        table, count, size = struct.unpack("<QII", header[72:88])
        f.seek(table * 512)
        entries = [f.read(size) for _ in range(count)]
    return {e[56:128].decode("utf-16-le").rstrip("\0"): struct.unpack("<QQ", e[32:48])
            for e in entries if e[32:48] != bytes(16)}


def settle_inode_times(ctx: Context, disk: Path) -> None:
    """mke2fs -d copies each file's change and access times from the build tree, where the
    clock kept running: set them to the build time, so two builds give the same bytes."""
    parts = gpt_partitions(disk)
    root, data = parts[slot_name(ctx.version)], parts["data"]
    state = ctx.tree / "var/lib/appliance"
    for first, top in ((root[0], ctx.tree), (data[0], state)):
        lines = []
        for path in [top, *sorted(top.rglob("*"))]:
            if top == ctx.tree and state in path.parents:
                continue  # on the data partition
            rel = "/" + path.relative_to(top).as_posix() if path != top else "/"
            if '"' in rel or "\n" in rel:  # debugfs cannot quote these
                ctx.log(f"  note: {rel!r} keeps the build host's inode times (not reproducible)")
                continue
            lines += [f'sif "{rel}" ctime @{ctx.epoch}', f'sif "{rel}" atime @{ctx.epoch}']
        for field in ("ctime", "atime", "mtime", "crtime"):
            lines.append(f'sif "/lost+found" {field} @{ctx.epoch}')  # made by mke2fs itself
        lines += [f"ssv lastcheck @{ctx.epoch}", f"ssv mkfs_time @{ctx.epoch}"]
        script = ctx.work / f"inode-times-{first}.debugfs"
        script.write_text("\n".join(lines) + "\n")
        run(ctx, "debugfs", "-w", "-f", script, f"{disk}?offset={first * 512}")


def write_flash_kit(ctx: Context) -> None:
    """NAME-flash.sh (drives NVIDIA's tools on the owner's host) and NAME-README.txt."""
    t = ctx.target
    assert t.board is not None
    script = ctx.out / f"{t.name}-flash.sh"
    script.write_text(jetsonflash.flash_script(artifact=f"{t.name}.tar", board=t.board,
                                               flash_target=t.flash_target or "internal",
                                               name=t.name))
    script.chmod(0o755)
    (ctx.out / f"{t.name}-README.txt").write_text(
        f"{t.description}\n\nsudo ./{t.name}-flash.sh /path/to/Linux_for_Tegra\n\n"
        + jetsonflash.OWNER_INPUTS)
    ctx.log(jetsonflash.OWNER_INPUTS.rstrip())


def clamp_mtimes(folder: Path, epoch: int) -> None:
    """No file newer than the build time: file systems record mtimes (reproducible builds)."""
    for path in [folder, *folder.rglob("*")]:
        if path.lstat().st_mtime > epoch:
            os.utime(path, (epoch, epoch), follow_symlinks=False)


def list_tree(ctx: Context) -> None:
    """NAME.files: every path of the tree with its sha256 (or link target), for comparing
    two builds file by file."""
    lines = []
    for path in sorted(ctx.tree.rglob("*")):
        rel = path.relative_to(ctx.tree).as_posix()
        if path.is_symlink():
            lines.append(f"link {os.readlink(path)}  {rel}")
        elif path.is_file():
            lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {rel}")
    (ctx.out / f"{ctx.target.name}.files").write_text("\n".join(lines) + "\n")


def compare(a: Path, b: Path) -> list[str]:
    """Differences between two builds of one target (folders holding NAME.files/.manifest)."""
    out = []
    ma, mb = (json.loads(next(d.glob("*.manifest.json")).read_text()) for d in (a, b))
    out.append("image identical" if ma["sha256"] == mb["sha256"] else
               f"image differs: {ma['sha256'][:16]} vs {mb['sha256'][:16]}")
    for key in ("packages", "wheels", "bundle", "system_update"):
        if ma.get(key) != mb.get(key):
            out.append(f"{key} differ")
    fa, fb = ({line.split("  ", 1)[1]: line.split("  ", 1)[0]
               for line in next(d.glob("*.files")).read_text().splitlines() if "  " in line}
              for d in (a, b))
    for path in sorted(set(fa) | set(fb)):
        if fa.get(path) != fb.get(path):
            out.append(f"file differs: {path}")
    return out


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(ctx: Context) -> None:
    t = ctx.target
    artifact = ctx.out / f"{t.name}.{t.format.extension()}"
    digest = sha256_of(artifact)
    (ctx.out / f"{artifact.name}.sha256").write_text(f"{digest}  {artifact.name}\n")
    manifest = {"target": t.name, "architecture": t.architecture.value,
                "source_date_epoch": ctx.epoch, "artifact": artifact.name,
                "sha256": digest, "size": artifact.stat().st_size, **ctx.inputs}
    (ctx.out / f"{t.name}.manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


STEPS = [check_host, build_bundle, install_base_tree, build_wheels, install_python_env,
         install_units, install_system_slots, install_network, install_ssh, install_config,
         preload_bundle, make_disk, make_system_update, write_manifest]


def build(target: Target, out: Path, cache: Path, log: Log,
          signing_key: Path | None = None, api_keys: Path | None = None,
          llama_wheel: Path | None = None, version: int | None = None,
          system_update: bool = True) -> Path:
    """Run every step for `target`; return the image (or rootfs tarball)."""
    if os.geteuid() != 0:
        raise UsageError("building an image needs root (mmdebstrap --mode=root, chroot)")
    if target.stack is not Stack.CPU:
        log(f"note: {target.name} uses {target.stack.value}; its GPU stack is only checked, "
            "not exercised, on a machine without that hardware")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"image-{target.name}-", dir=cache))
    ctx = Context(target, out, work, cache, log, signing_key, api_keys=api_keys,
                  llama_wheel=llama_wheel, system_update=system_update)
    ctx.version = version or ctx.epoch  # the build time only grows, and is reproducible
    started = time.monotonic()
    try:
        for i, step in enumerate(STEPS, start=1):
            ctx.step = step.__name__
            log(f"[{i}/{len(STEPS)}] {ctx.step}")
            begun = time.monotonic()
            step(ctx)
            took = time.monotonic() - begun
            if took >= 10:  # where a slow build's time went
                log(f"  {ctx.step} took {took:.0f} s")
    finally:
        if ctx.tree.exists():
            shutil.rmtree(ctx.tree, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    log(f"built {target.name} in {time.monotonic() - started:.0f} s")
    return out / f"{target.name}.{target.format.extension()}"
