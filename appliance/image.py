"""Building an OS image for a target: one readable list of named steps over one Context.

    base tree (mmdebstrap) -> Python environment (wheels built on the host) -> units, users,
    network -> trust keys, settings, API key -> preloaded bundle -> disk (genimage) -> manifest

Every external tool goes through `run()`, which names the step and the tool when it fails, and
`need()` checks for each tool before anything starts, naming the package to install.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import bundle as bundle_mod
from appliance import keys
from appliance.errors import ApplianceError, UsageError
from appliance.install import import_bundle
from appliance.server import hash_key
from appliance.store import Layout
from appliance.target import Architecture, ImageFormat, Stack, Target

Log = Callable[[str], None]
PROJECT = Path(__file__).resolve().parent.parent
LLAMA_VERSION = "0.3.36"
TOOLS = {  # binary -> Debian package
    "mmdebstrap": "mmdebstrap", "genimage": "genimage", "mke2fs": "e2fsprogs",
    "mkdosfs": "dosfstools", "mcopy": "mtools", "systemctl": "systemd",
    "systemd-sysusers": "systemd",
}


class ImageError(ApplianceError):
    exit_code = 9


@dataclass
class Context:
    target: Target
    out: Path
    work: Path
    cache: Path
    log: Log
    signing_key: Path | None
    epoch: int = field(default_factory=lambda: int(os.environ.get("SOURCE_DATE_EPOCH")
                                                   or time.time()))
    step: str = ""
    api_key: str | None = None
    bundle: Path | None = None
    trust_pub: Path | None = None
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def tree(self) -> Path:
        return self.work / "tree"

    @property
    def wheels(self) -> Path:
        return self.work / "wheels"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ImageError(f"the image builder needs {tool}",
                         hint=f"apt-get install {TOOLS.get(tool, tool)}")
    return path


def run(ctx: Context, *args: str | Path, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> str:
    """Run a tool; on failure raise ImageError naming the step, the tool and its last lines."""
    cmd = [str(a) for a in args]
    # every tool sees the build's fixed time (mmdebstrap, pip's .pyc files, tar, genimage)
    fixed = {"SOURCE_DATE_EPOCH": str(ctx.epoch), "E2FSPROGS_FAKE_TIME": str(ctx.epoch)}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd,
                            env={**os.environ, **fixed, **(env or {})})
    (ctx.work / "log").mkdir(exist_ok=True)
    with (ctx.work / "log" / f"{ctx.step}.log").open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{result.stdout}\n{result.stderr}\n")
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        raise ImageError(f"step {ctx.step}: {Path(cmd[0]).name} failed ({result.returncode}):"
                         f"\n{tail}", hint=f"full log: {ctx.work / 'log' / ctx.step}.log")
    return result.stdout


def wheel_cache() -> Path:
    """pip's cache folder (kept across clones, so CI reuses the slow llama.cpp builds)."""
    out = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True,
                         text=True)
    base = Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else (
        PROJECT / ".cache")
    return base / "appliance-wheels"


# --- steps ----------------------------------------------------------------------------------

def check_host(ctx: Context) -> None:
    """Fail before any work when a tool or a host capability is missing."""
    t = ctx.target
    for tool in ("mmdebstrap", "systemctl", "systemd-sysusers"):
        need(tool)
    if t.format is ImageFormat.DISK:
        for tool in ("genimage", "mke2fs", "mkdosfs", "mcopy"):
            need(tool)
    for tool in t.host_tools:
        if shutil.which(tool) is None:
            raise ImageError(
                f"target {t.name} builds llama.cpp with {t.stack.value}, which needs {tool} "
                "on the build host", hint="install NVIDIA's CUDA toolkit, or build x86_64-cpu")
    if t.architecture.uname() != os.uname().machine:
        raise ImageError(f"target {t.name} is {t.architecture.value}; building it on "
                         f"{os.uname().machine} needs qemu-user emulation, not set up here",
                         hint="build it on an arm64 host, or add binfmt_misc + qemu-user-static")


def build_wheels(ctx: Context) -> None:
    """The appliance and every dependency as wheels for the image's Python, plus a
    llama-cpp-python wheel built with the target's flags (cached by those flags)."""
    ctx.wheels.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run(ctx, *pip, "wheel", "-q", "-w", ctx.wheels, PROJECT)
    flags = " ".join(ctx.target.llama_cmake_args)
    key = hashlib.sha256(f"{LLAMA_VERSION} {flags}".encode()).hexdigest()[:12]
    cached = wheel_cache() / f"llama-image-{LLAMA_VERSION}-{key}"
    if not list(cached.glob("llama_cpp_python-*.whl")):
        ctx.log(f"  building llama-cpp-python {LLAMA_VERSION} for {ctx.target.name} "
                "(about 5 minutes, once)")
        tmp = cached.with_name(key + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        # --no-cache-dir: pip's wheel cache is keyed by the sdist, not by CMAKE_ARGS, and would
        # hand back a wheel built for another CPU
        run(ctx, *pip, "wheel", "-q", "--no-cache-dir", "--no-deps", "--no-binary",
            "llama-cpp-python", "-w", tmp,
            f"llama-cpp-python=={LLAMA_VERSION}", env={"CMAKE_ARGS": flags})
        tmp.rename(cached)
    for wheel in cached.glob("*.whl"):
        shutil.copy(wheel, ctx.wheels)
        run(ctx, *pip, "wheel", "-q", "-w", ctx.wheels, ctx.wheels / wheel.name)  # its deps
    ctx.inputs["wheels"] = sorted(w.name for w in ctx.wheels.glob("*.whl"))


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


def install_base_tree(ctx: Context) -> None:
    t = ctx.target
    ctx.log(f"  {t.distribution} {t.release} {t.architecture.value}, {len(t.packages)} packages")
    run(ctx, "mmdebstrap", "--mode=root", "--variant=apt", f"--architectures={t.architecture}",
        f"--components={','.join(t.components)}", f"--include={','.join(t.packages)}",
        "--customize-hook=chroot \"$1\" apt-get clean",
        "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/*",
        t.release, ctx.tree, t.mirror)
    versions = run(ctx, "chroot", ctx.tree, "dpkg-query", "-W", "-f", "${Package} ${Version}\n")
    ctx.inputs["packages"] = versions.strip().splitlines()


def install_python_env(ctx: Context) -> None:
    """A venv with the image's own python3, installed only from the wheels built above."""
    staged = ctx.tree / "tmp" / "wheels"
    shutil.copytree(ctx.wheels, staged)
    run(ctx, "chroot", ctx.tree, "python3", "-m", "venv", "/opt/appliance/venv")
    run(ctx, "chroot", ctx.tree, "/opt/appliance/venv/bin/pip", "install", "-q", "--no-index",
        "--find-links", "/tmp/wheels", "appliance", "llama-cpp-python",
        env={"PIP_CONFIG_FILE": "/dev/null", "PIP_FIND_LINKS": "", "PIP_CONSTRAINT": ""})
    shutil.rmtree(staged)
    shutil.copy(PROJECT / "README.md", ctx.tree / "opt/appliance/README.md")


def install_units(ctx: Context) -> None:
    """Units, the service user, tmpfiles, networking, mounts; firstboot off, no root login."""
    tree, units = ctx.tree, PROJECT / "systemd"
    system = tree / "etc/systemd/system"
    for unit in ("appliance.service", "appliance-import@.service",
                 "appliance-console-status.service"):
        shutil.copy(units / unit, system / unit)
    if ctx.target.devices:
        dropin = system / "appliance.service.d"
        dropin.mkdir()
        allow = "\n".join(f"DeviceAllow={d} rw" for d in ctx.target.devices)
        (dropin / "gpu.conf").write_text(f"[Service]\nPrivateDevices=no\n{allow}\n")
    shutil.copy(units / "90-appliance-usb.rules", tree / "etc/udev/rules.d/")
    shutil.copy(units / "appliance.sysusers", tree / "usr/lib/sysusers.d/appliance.conf")
    shutil.copy(units / "appliance.tmpfiles", tree / "usr/lib/tmpfiles.d/appliance.conf")
    # the root file system is read-only: users exist before first boot
    run(ctx, "systemd-sysusers", f"--root={tree}")
    run(ctx, "systemd-tmpfiles", f"--root={tree}", "--create",
        tree / "usr/lib/tmpfiles.d/appliance.conf")
    network = tree / "etc/systemd/network/20-lan.network"
    network.write_text("[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\nLinkLocalAddressing=yes\n")
    (tree / "etc/hostname").write_text(ctx.target.hostname + "\n")
    (tree / "etc/machine-id").write_text("")  # systemd makes a transient one on a read-only root
    (tree / "etc/fstab").write_text(
        "LABEL=appliance-root / ext4 ro,errors=remount-ro 0 1\n"
        "LABEL=appliance-data /var/lib/appliance ext4 defaults,nosuid,nodev,noexec 0 2\n"
        "tmpfs /tmp tmpfs nosuid,nodev,mode=1777 0 0\n"
        "tmpfs /var/tmp tmpfs nosuid,nodev,mode=1777 0 0\n"
        "tmpfs /var/log tmpfs nosuid,nodev,mode=0755 0 0\n"
        "tmpfs /var/lib/systemd tmpfs nosuid,nodev,mode=0755 0 0\n")
    run(ctx, "systemctl", f"--root={tree}", "enable", "appliance.service",
        "appliance-console-status.service", "systemd-networkd.service")
    run(ctx, "systemctl", f"--root={tree}", "mask", "systemd-firstboot.service",
        "systemd-networkd-wait-online.service")
    run(ctx, "chroot", tree, "passwd", "--lock", "root")
    if ctx.target.ssh_keys:
        raise ImageError("ssh_authorized_keys is set, but this builder does not install an SSH "
                         "server yet", hint="remove the keys from the target")


def install_config(ctx: Context) -> None:
    """Trusted publisher key, service settings, and one API key for LAN clients."""
    t, layout = ctx.target, Layout(ctx.tree)
    assert ctx.trust_pub is not None
    layout.trust.add(ctx.trust_pub)
    hosts = [t.hostname, f"{t.hostname}.local"]
    layout.config.write_text(
        f'[server]\nhost = "{t.listen}"\nport = {t.port}\nallowed_hosts = {json.dumps(hosts)}\n')
    ctx.api_key = ctx.api_key or "sk-appliance-" + secrets.token_urlsafe(32)
    keyfile = ctx.tree / "etc/appliance/api-keys"
    keyfile.write_text(f"image {hash_key(ctx.api_key)}\n")
    gid = int(run(ctx, "chroot", ctx.tree, "getent", "group", "appliance").split(":")[2])
    os.chown(keyfile, 0, gid)
    keyfile.chmod(0o640)
    secret = ctx.out / f"{t.name}.api-key"
    secret.write_text(ctx.api_key + "\n")
    secret.chmod(0o600)


def preload_bundle(ctx: Context) -> None:
    if ctx.bundle is not None:
        inst = import_bundle(ctx.bundle, Layout(ctx.tree))
        ctx.log(f"  preloaded {inst.name} sequence {inst.sequence}")


def make_disk(ctx: Context) -> None:
    """GPT disk: ESP (systemd-boot, kernel, initrd), read-only root, data partition."""
    t = ctx.target
    if t.format is ImageFormat.ROOTFS:
        run(ctx, "tar", "--sort=name", f"--mtime=@{ctx.epoch}", "--numeric-owner", "-C",
            ctx.tree, "-cf", ctx.out / f"{t.name}.tar", ".")
        return
    esp = ctx.work / "esp"
    (esp / "EFI/BOOT").mkdir(parents=True)
    (esp / "loader/entries").mkdir(parents=True)
    efi_name = "BOOTX64.EFI" if t.architecture is Architecture.AMD64 else "BOOTAA64.EFI"
    stub = "x64" if t.architecture is Architecture.AMD64 else "aa64"
    shutil.copy(ctx.tree / f"usr/lib/systemd/boot/efi/systemd-boot{stub}.efi",
                esp / "EFI/BOOT" / efi_name)
    kernel = sorted((ctx.tree / "boot").glob("vmlinuz-*"))[-1]
    initrd = sorted((ctx.tree / "boot").glob("initrd.img-*"))[-1]
    shutil.copy(kernel, esp / "vmlinuz")
    shutil.copy(initrd, esp / "initrd.img")
    console = "ttyS0" if t.architecture is Architecture.AMD64 else "ttyAMA0"
    (esp / "loader/loader.conf").write_text("default appliance.conf\ntimeout 0\n")
    (esp / "loader/entries/appliance.conf").write_text(
        "title appliance\nlinux /vmlinuz\ninitrd /initrd.img\n"
        f"options root=LABEL=appliance-root ro console={console} quiet systemd.show_status=1\n")
    for folder in (ctx.tree, esp):
        clamp_mtimes(folder, ctx.epoch)
    list_tree(ctx)
    # identifiers derived from the target and the build time, not random: two builds of the
    # same inputs can then be compared byte for byte
    ids = {part: uuid.uuid5(uuid.NAMESPACE_URL, f"appliance:{t.name}:{ctx.epoch}:{part}")
           for part in ("disk", "root", "data", "root-seed", "data-seed", "esp-part",
                        "root-part", "data-part")}
    serial = ids["disk"].hex[:8]
    files = [p.relative_to(esp).as_posix() for p in esp.rglob("*") if p.is_file()]
    entries = "\n".join(f'    file "{f}" {{ image = "esp/{f}" }}' for f in files)
    cfg = ctx.work / "genimage.cfg"
    cfg.write_text(f"""
image esp.vfat {{
  vfat {{
    label = "ESP"
    extraargs = "-i {serial}"
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
  partition root {{ image = "root.ext4" partition-type-uuid = "L"
                    partition-uuid = "{ids['root-part']}" }}
  partition data {{ image = "data.ext4" partition-type-uuid = "L"
                    partition-uuid = "{ids['data-part']}" }}
}}
""")
    with tempfile.TemporaryDirectory(dir=ctx.work) as tmp:
        run(ctx, "genimage", "--config", cfg, "--rootpath", ctx.tree, "--inputpath", ctx.work,
            "--outputpath", ctx.out, "--tmppath", Path(tmp) / "genimage")
    for part in ("esp.vfat", "root.ext4", "data.ext4"):
        (ctx.out / part).unlink(missing_ok=True)


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
    for key in ("packages", "wheels", "bundle"):
        if ma.get(key) != mb.get(key):
            out.append(f"{key} differ")
    fa, fb = ({line.split("  ", 1)[1]: line.split("  ", 1)[0]
               for line in next(d.glob("*.files")).read_text().splitlines() if "  " in line}
              for d in (a, b))
    for path in sorted(set(fa) | set(fb)):
        if fa.get(path) != fb.get(path):
            out.append(f"file differs: {path}")
    return out


def write_manifest(ctx: Context) -> None:
    t = ctx.target
    artifact = ctx.out / f"{t.name}.{t.format.extension()}"
    digest = hashlib.sha256()
    with artifact.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    (ctx.out / f"{artifact.name}.sha256").write_text(f"{digest.hexdigest()}  {artifact.name}\n")
    manifest = {"target": t.name, "architecture": t.architecture.value,
                "source_date_epoch": ctx.epoch, "artifact": artifact.name,
                "sha256": digest.hexdigest(), "size": artifact.stat().st_size, **ctx.inputs}
    (ctx.out / f"{t.name}.manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


STEPS = [check_host, build_wheels, build_bundle, install_base_tree, install_python_env,
         install_units, install_config, preload_bundle, make_disk, write_manifest]


def build(target: Target, out: Path, cache: Path, log: Log,
          signing_key: Path | None = None, api_key: str | None = None) -> Path:
    """Run every step for `target`; return the image (or rootfs tarball)."""
    if os.geteuid() != 0:
        raise UsageError("building an image needs root (mmdebstrap --mode=root, chroot)")
    if target.stack is not Stack.CPU:
        log(f"note: {target.name} uses {target.stack.value}; its GPU stack is only checked, "
            "not exercised, on a machine without that hardware")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"image-{target.name}-", dir=cache))
    ctx = Context(target, out, work, cache, log, signing_key, api_key=api_key)
    started = time.monotonic()
    try:
        for i, step in enumerate(STEPS, start=1):
            ctx.step = step.__name__
            log(f"[{i}/{len(STEPS)}] {ctx.step}")
            step(ctx)
    finally:
        if ctx.tree.exists():
            shutil.rmtree(ctx.tree, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    log(f"built {target.name} in {time.monotonic() - started:.0f} s")
    return out / f"{target.name}.{target.format.extension()}"
