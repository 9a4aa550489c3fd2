"""Image targets (`build/targets/<name>.toml`): what one kind of device gets.

A target names the architecture, the base distribution and its packages, the accelerator stack,
how llama-cpp-python is built for it, the image format and partition sizes, the system settings
baked in, and the bundle to preload. Data only; the image builder turns it into the tools'
configuration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from appliance.errors import StoreError, UsageError
from appliance.strict import Fields, load_toml

TARGETS = Path(__file__).resolve().parents[2] / "build" / "targets"
PACKAGE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,99}")
RELEASE = re.compile(r"[a-z][a-z0-9-]{1,31}")
MIN_ESP_MB = 260  # OVMF ignores a smaller FAT32 ESP


class Architecture(StrEnum):
    AMD64 = "amd64"
    ARM64 = "arm64"

    def qemu_system(self) -> str:
        return {"amd64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}[self.value]

    def uname(self) -> str:
        return {"amd64": "x86_64", "arm64": "aarch64"}[self.value]


class Stack(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    JETSON = "jetson"


class ImageFormat(StrEnum):
    DISK = "disk"  # raw GPT: ESP, read-only root, data partition
    ROOTFS = "rootfs"  # a tarball for a vendor's flashing tools (Jetson)

    def extension(self) -> str:
        return {"disk": "img", "rootfs": "tar"}[self.value]


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    architecture: Architecture
    distribution: str
    release: str
    mirror: str
    components: tuple[str, ...]
    extra_repositories: tuple[str, ...]
    packages: tuple[str, ...]
    python: str
    stack: Stack
    devices: tuple[str, ...]
    marker_files: tuple[str, ...]
    host_tools: tuple[str, ...]
    llama_cmake_args: tuple[str, ...]
    format: ImageFormat
    esp_mb: int
    root_mb: int
    data_mb: int
    board: str | None
    flash_target: str | None
    hostname: str
    listen: str
    port: int
    ssh_keys: tuple[str, ...]
    mdns: bool
    preload: str | None
    path: Path


def load(name: str, folder: Path = TARGETS) -> Target:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,40}", name):
        raise UsageError(f"{name!r} is not a target name")
    path = folder / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.toml")))
        raise UsageError(f"no target {name!r}", hint=f"targets: {known}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
    return parse(data, path)


def _section(doc: Fields, key: str, required: bool = True) -> Fields:
    table = doc.table(key, required=required)
    return table if table is not None else Fields({}, doc.where(key))


def parse(data: bytes, path: Path) -> Target:
    doc = load_toml(data, str(path), 64 * 1024)
    name = doc.req_string("name", pattern=re.compile(r"[a-z0-9][a-z0-9_-]{0,40}"))
    if name != path.stem:
        raise doc.fail("name", f"is {name!r} but the file is {path.name}")
    description = doc.string("description", required=False, default="") or ""
    arch = doc.choice("architecture", Architecture)
    base, acc, llama = _section(doc, "base"), _section(doc, "accelerator"), _section(doc, "llama")
    image, system = _section(doc, "image"), _section(doc, "system")
    bundle = _section(doc, "bundle", required=False)
    fmt = image.choice("format", ImageFormat)
    target = Target(
        name=name, description=description, architecture=arch,
        distribution=base.req_string("distribution", pattern=re.compile(r"debian|ubuntu")),
        release=base.req_string("release", pattern=RELEASE),
        mirror=base.req_string("mirror", pattern=re.compile(r"(https?|file)://\S+")),
        components=tuple(base.strings("components", required=False) or ["main"]),
        extra_repositories=tuple(base.strings("extra_repositories", required=False)),
        packages=tuple(base.strings("packages", pattern=PACKAGE)),
        # the interpreter of the venv; the builder adds it and its -venv package
        python=base.string("python", required=False, default="python3.11",
                           pattern=re.compile(r"python3\.\d{1,2}")) or "python3.11",
        stack=acc.choice("stack", Stack),
        devices=tuple(acc.strings("devices", required=False,
                                  pattern=re.compile(r"/dev/[A-Za-z0-9/_.-]+"))),
        marker_files=tuple(acc.strings("marker_files", required=False,
                                       pattern=re.compile(r"/[A-Za-z0-9/_.-]+"))),
        host_tools=tuple(acc.strings("requires_host_tools", required=False,
                                     pattern=re.compile(r"[A-Za-z0-9_.-]+"))),
        llama_cmake_args=tuple(llama.strings("cmake_args",
                                             pattern=re.compile(r"-D[A-Z0-9_]+=\S+"))),
        format=fmt,
        esp_mb=image.integer("esp_mb", required=fmt is ImageFormat.DISK, lo=MIN_ESP_MB,
                             hi=4096, default=0) or 0,
        root_mb=image.integer("root_mb", required=fmt is ImageFormat.DISK, lo=512, hi=1 << 20,
                              default=0) or 0,
        data_mb=image.integer("data_mb", required=fmt is ImageFormat.DISK, lo=64, hi=1 << 22,
                              default=0) or 0,
        board=image.string("board", required=fmt is ImageFormat.ROOTFS),
        flash_target=image.string("flash_target", required=False,
                                  pattern=re.compile(r"internal|nvme|sdcard")),
        hostname=system.req_string("hostname", pattern=re.compile(r"[a-z0-9][a-z0-9-]{0,62}")),
        listen=system.req_string("listen"),
        port=system.req_integer("port", lo=1, hi=65535),
        ssh_keys=tuple(system.strings("ssh_authorized_keys", required=False,
                                      pattern=re.compile(r"(ssh|ecdsa)-[a-z0-9-]+ [A-Za-z0-9+/=]+"
                                                         r"( \S+)?"))),
        mdns=system.boolean("mdns", default=False),
        preload=bundle.string("preload", required=False),
        path=path,
    )
    for section in (doc, base, acc, llama, image, system, bundle):
        section.done()
    if target.stack is not Stack.CPU and not target.devices:
        raise acc.fail("devices", f"must list the GPU device nodes for a {target.stack} target")
    return target
