"""What every image build step shares: the Context of one build, and `run()`/`need()`, which
name the step and the tool (and the package to install) when something fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError
from appliance.image.target import Target

Log = Callable[[str], None]
PROJECT = Path(__file__).resolve().parents[2]
UBUNTU_KEYRING = Path("/usr/share/keyrings/ubuntu-archive-keyring.gpg")  # Debian's ubuntu-keyring
TOOLS = {  # binary -> Debian package
    "mmdebstrap": "mmdebstrap", "genimage": "genimage", "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs", "mkdosfs": "dosfstools", "mcopy": "mtools", "systemctl": "systemd",
    "systemd-sysusers": "systemd", "update-binfmts": "binfmt-support",
    "qemu-aarch64-static": "qemu-user-static",
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
    api_keys: Path | None = None  # `name sha256hex` lines, hashes only
    bundle: Path | None = None
    trust_pub: Path | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    llama_wheel: Path | None = None  # a wheel the owner built (e.g. on a Jetson), used as is
    toolkit_missing: ImageError | None = None  # raised by the step that needs the toolkit
    version: int = 0  # the system version (IMAGE_VERSION, the slot's name)
    system_update: bool = True  # also write the version as a `.system` file (about a minute)

    @property
    def mirrors(self) -> list[str]:
        """mmdebstrap's mirror arguments: the base mirror, then the target's repositories."""
        return [self.target.mirror, *self.target.extra_repositories]

    @property
    def mirror_options(self) -> list[str]:
        """mmdebstrap options that file:// repositories need (mounted into the chroot), and
        Ubuntu's archive key, which a Debian host keeps outside apt's default keyrings."""
        options = []
        if any("file://" in m for m in self.mirrors):
            options.append("--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount")
        if self.target.distribution == "ubuntu" and UBUNTU_KEYRING.exists():
            options.append(f"--keyring={UBUNTU_KEYRING}")
        return options

    @property
    def setup_hooks(self) -> list[str]:
        """Marker files that must exist before any package installs (Jetson's L4T packages)."""
        return [f'mkdir -p "$1{Path(m).parent}" && touch "$1{m}"'
                for m in self.target.marker_files]

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
