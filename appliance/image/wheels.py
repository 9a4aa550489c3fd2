"""Wheels for the image's Python, whatever the build host runs.

The image's venv is installed offline from one folder of wheels made here:
- the appliance itself (pure Python, built from this checkout);
- llama-cpp-python, which PyPI has only as source: compiled for the target's CPU/GPU flags,
  natively or with Debian's cross compilers for a foreign architecture. Its Python code loads
  the libraries through ctypes, so a cross-built wheel only needs the right platform tag;
- systemd-python, also source only and a C extension against the target's own Python and
  libsystemd: compiled in a small build tree of the target's distribution (under qemu-user for
  a foreign architecture), never in the image itself;
- everything else as binary wheels from PyPI for the target's platform and Python version.
The two slow builds are cached in pip's cache folder, keyed by everything that shapes them.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

from appliance.image.context import PROJECT, Context, ImageError, run, wheel_cache
from appliance.image.target import Architecture

LLAMA_VERSION = "0.3.36"
SYSTEMD_PYTHON = "systemd-python==235"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
CROSS = {  # Debian's cross toolchains, by target architecture
    Architecture.ARM64: ("gcc-aarch64-linux-gnu g++-aarch64-linux-gnu",
                         ["-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
                          "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc",
                          "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++"]),
}


def platform_tags(arch: Architecture, glibc: tuple[int, int]) -> list[str]:
    """Every wheel platform the image's C library can load, newest first."""
    machine = arch.uname()
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(glibc[1], 16, -1)]
    return [*tags, f"manylinux2014_{machine}", f"linux_{machine}"]


def retag(wheel: Path, platform: str) -> Path:
    """Rename a cross-built `py3-none-linux_<host>` wheel to the target platform, rewriting
    its WHEEL file and that file's line in RECORD so pip accepts it."""
    name, version, py, abi, _ = wheel.stem.split("-")
    out = wheel.with_name(f"{name}-{version}-{py}-{abi}-{platform}.whl")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        infos = src.infolist()
        wheel_meta = next(i.filename for i in infos if i.filename.endswith(".dist-info/WHEEL"))
        meta = re.sub(r"(?m)^Tag: .*$", f"Tag: {py}-{abi}-{platform}",
                      src.read(wheel_meta).decode())
        digest = base64.urlsafe_b64encode(hashlib.sha256(meta.encode()).digest()).rstrip(b"=")
        for info in infos:
            data = src.read(info.filename)
            if info.filename == wheel_meta:
                data = meta.encode()
            elif info.filename.endswith(".dist-info/RECORD"):
                data = re.sub(rf"(?m)^{re.escape(wheel_meta)},.*$",
                              f"{wheel_meta},sha256={digest.decode()},{len(meta.encode())}",
                              data.decode()).encode()
            dst.writestr(info, data)
    wheel.unlink()
    return out


def target_python(ctx: Context) -> tuple[str, tuple[int, int]]:
    """The image Python's version ("3.11") and its glibc (2, 36), asked of the base tree."""
    out = run(ctx, "chroot", ctx.tree, ctx.target.python, "-c",
              "import platform, sys; print('%d.%d' % sys.version_info[:2], "
              "platform.libc_ver()[1])").split()
    major, minor = out[1].split(".")[:2]
    return out[0], (int(major), int(minor))


def llama_wheel(ctx: Context) -> Path:
    """llama-cpp-python for the target: built once per (version, architecture, flags)."""
    t = ctx.target
    if ctx.llama_wheel is not None:
        ctx.log(f"  llama-cpp-python: using the given wheel {ctx.llama_wheel.name}")
        return ctx.llama_wheel
    flags = list(t.llama_cmake_args)
    foreign = t.architecture.uname() != os.uname().machine
    if foreign:
        packages, toolchain = CROSS[t.architecture]
        compiler = toolchain[2].split("=", 1)[1]
        if shutil.which(compiler) is None:
            raise ImageError(f"cross-compiling llama.cpp for {t.architecture} needs {compiler}",
                             hint=f"apt-get install {packages}")
        flags = toolchain + flags
    # (the architecture is in the cross-compiler flags)
    key = hashlib.sha256(f"{LLAMA_VERSION} {' '.join(flags)}".encode())
    cached = wheel_cache() / f"llama-image-{LLAMA_VERSION}-{key.hexdigest()[:12]}"
    if not list(cached.glob("llama_cpp_python-*.whl")):
        how = "cross-compiling" if foreign else "building"
        ctx.log(f"  {how} llama-cpp-python {LLAMA_VERSION} for {t.name} (5 to 10 minutes, "
                "once; cached)")
        tmp = cached.with_name(cached.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        # --no-cache-dir: pip's wheel cache is keyed by the sdist, not by CMAKE_ARGS, and would
        # hand back a wheel built for another CPU
        run(ctx, *PIP, "wheel", "-q", "--no-cache-dir", "--no-deps", "--no-binary",
            "llama-cpp-python", "-w", tmp, f"llama-cpp-python=={LLAMA_VERSION}",
            env={"CMAKE_ARGS": " ".join(flags)})
        if foreign:
            for wheel in tmp.glob("*.whl"):
                retag(wheel, f"linux_{t.architecture.uname()}")
        tmp.rename(cached)
    return next(cached.glob("llama_cpp_python-*.whl"))


def systemd_wheel(ctx: Context, version: str) -> Path:
    """systemd-python compiled in a throwaway build tree of the target's distribution."""
    t = ctx.target
    key = f"{t.distribution}-{t.release}-{t.architecture}-py{version}"
    cached = wheel_cache() / f"systemd-python-235-{key}"
    if found := list(cached.glob("systemd_python-*.whl")):
        return found[0]
    ctx.log(f"  building systemd-python for {key} in a build tree (once; cached)")
    sources = ctx.work / "sdists"
    run(ctx, *PIP, "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", sources,
        SYSTEMD_PYTHON)
    # Python 3.12 and later make venvs without setuptools: the build backend comes along
    run(ctx, *PIP, "download", "-q", "--no-deps", "--only-binary", ":all:", "-d", sources,
        "wheel==0.45.1", "setuptools==75.8.0")
    tree = ctx.work / "build-tree"
    py = t.python
    try:  # the build tree goes, whether the build worked or not
        run(ctx, "mmdebstrap", "--mode=root", "--variant=apt",
            f"--architectures={t.architecture}", f"--components={','.join(t.components)}",
            f"--include=gcc,libc6-dev,pkg-config,libsystemd-dev,{py}-dev,{py}-venv",
            *ctx.mirror_options, *[f"--setup-hook={hook}" for hook in ctx.setup_hooks],
            t.release, tree, *ctx.mirrors)
        shutil.copytree(sources, tree / "src")
        run(ctx, "chroot", tree, py, "-m", "venv", "/b")
        run(ctx, "chroot", tree, "/b/bin/pip", "install", "-q", "--no-index", "--find-links",
            "/src", "wheel", "setuptools")
        run(ctx, "chroot", tree, "/b/bin/pip", "wheel", "-q", "--no-index", "--no-deps",
            "--no-build-isolation", "--find-links", "/src", "-w", "/out", SYSTEMD_PYTHON)
        tmp = cached.with_name(cached.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tree / "out", tmp)
        tmp.rename(cached)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return next(cached.glob("systemd_python-*.whl"))


def collect(ctx: Context) -> list[str]:
    """Fill ctx.wheels with every wheel the image's venv needs; return their names."""
    t = ctx.target
    version, glibc = target_python(ctx)
    ctx.log(f"  image Python {version}, glibc {glibc[0]}.{glibc[1]}, {t.architecture}")
    ctx.wheels.mkdir(parents=True)
    run(ctx, *PIP, "wheel", "-q", "--no-deps", "-w", ctx.wheels, PROJECT)
    for wheel in (llama_wheel(ctx), systemd_wheel(ctx, version)):
        shutil.copy(wheel, ctx.wheels)
    abi = "cp" + version.replace(".", "")
    platforms = [arg for tag in platform_tags(t.architecture, glibc)
                 for arg in ("--platform", tag)]
    # the local wheels satisfy the source-only packages; PyPI gives the rest as binaries
    run(ctx, *PIP, "download", "-q", "--only-binary", ":all:", *platforms,
        "--python-version", version, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
        "--abi", "none", "--find-links", ctx.wheels, "-d", ctx.wheels,
        "appliance", "llama-cpp-python")
    return sorted(w.name for w in ctx.wheels.glob("*.whl"))
