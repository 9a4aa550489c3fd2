"""The systemd units as systemd itself reads them: `systemd-analyze verify`, the exposure score
of `systemd-analyze security`, and sysusers/tmpfiles applied to a scratch root."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
CTL = Path(sys.executable).parent / "appliance-ctl"
EXPOSURE_LIMIT = 2.0
SYSUPDATE = "/usr/lib/systemd/systemd-sysupdate"

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed")


def _local_copy(unit: str, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's appliance-ctl, since verify checks
    that the command exists (in the image it is /opt/appliance/venv/bin/appliance-ctl)."""
    text = (SYSTEMD / unit).read_text().replace("/opt/appliance/venv/bin/appliance-ctl", str(CTL))
    if not Path(SYSUPDATE).exists():  # a bookworm host has none (trixie: systemd-container);
        text = text.replace(SYSUPDATE, shutil.which("true") or "/bin/true")  # the image has it
    copy = tmp_path / unit
    copy.write_text(text)
    return copy


@pytest.mark.parametrize("unit,instance", [("appliance.service", "appliance.service"),
                                           ("appliance-console-status.service",
                                            "appliance-console-status.service"),
                                           ("appliance-import@.service",
                                            "appliance-import@sdb1.service"),
                                           ("appliance-ssh-hostkey.service",
                                            "appliance-ssh-hostkey.service"),
                                           ("appliance-trial.service",
                                            "appliance-trial.service"),
                                           ("appliance-trial.path", "appliance-trial.path"),
                                           ("appliance-init.service",
                                            "appliance-init.service"),
                                           ("appliance-sysupdate.service",
                                            "appliance-sysupdate.service"),
                                           ("appliance-boot-check.service",
                                            "appliance-boot-check.service"),
                                           ("appliance-system-settle.service",
                                            "appliance-system-settle.service")])
def test_verify(tmp_path: Path, unit: str, instance: str) -> None:
    for other in [*SYSTEMD.glob("*.service"), *SYSTEMD.glob("*.path")]:  # found beside it
        _local_copy(other.name, tmp_path)
    if instance != unit:
        (tmp_path / instance).symlink_to(tmp_path / unit)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / instance)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_security_exposure() -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                             str(SYSTEMD / "appliance.service")], capture_output=True, text=True)
    found = re.search(r"Overall exposure level for appliance.service: ([0-9.]+)", result.stdout)
    assert found, result.stdout + result.stderr
    remaining = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("✗")]
    print(f"exposure {found.group(1)}; remaining: {', '.join(remaining)}")
    assert float(found.group(1)) <= EXPOSURE_LIMIT, remaining


def test_sandbox_keeps_what_the_probe_needs() -> None:
    text = (SYSTEMD / "appliance.service").read_text()
    assert "ProcSubset=pid" not in text.replace("# ProcSubset=pid", "")  # hides /proc/cpuinfo
    assert "After=network.target" in text and "network-online" not in text.replace(
        "network.target, not network-online.target", "")
    assert "IPAddressDeny=any" in text and "Type=notify" in text
    # /run/appliance outlives a crash-restart: it records a model whose load crashed the service
    assert "RuntimeDirectoryPreserve=restart" in text


def test_sysusers_and_tmpfiles(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    sysusers = subprocess.run(["systemd-sysusers", f"--root={tmp_path}",
                               str(SYSTEMD / "appliance.sysusers")], capture_output=True,
                              text=True)
    assert sysusers.returncode == 0, sysusers.stderr
    passwd = (tmp_path / "etc/passwd").read_text()
    assert re.search(r"^appliance:x:\d+:\d+:Offline AI appliance:/var/lib/appliance:"
                     r"/usr/sbin/nologin$", passwd, re.M)
    tmpfiles = subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create",
                               str(SYSTEMD / "appliance.tmpfiles")], capture_output=True,
                              text=True)
    assert tmpfiles.returncode == 0, tmpfiles.stderr
    assert (tmp_path / "var/lib/appliance/store").is_dir()
    assert (tmp_path / "etc/appliance/trust").is_dir()
