"""Crash safety: an import killed with SIGKILL at every checkpoint leaves the old or the new
bundle active, complete and verified, and the next import cleans up."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from conftest import cli_env
from factory import MODEL, Factory

from appliance.device.layout import Layout
from appliance.device.store import Store


def _ctl(root: Path, *args: str, kill_at: int | None = None,
         log: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = cli_env(root)
    if kill_at is not None:
        env["APPLIANCE_KILL_AT"] = str(kill_at)
    if log is not None:
        env["APPLIANCE_CHECKPOINT_LOG"] = str(log)
    return subprocess.run([sys.executable, "-m", "appliance.cli.ctl", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_kill_at_every_checkpoint(installed: Layout, factory: Factory, tmp_path: Path) -> None:
    files = {f"{MODEL}/LICENSE.txt": b"license two",
             f"{MODEL}/weights.gguf": b"GGUF" + bytes(range(256)) * (4 * 4096 + 7),
             f"{MODEL}/extra.gguf": b"GGUF" + b"z" * 1_500_000}
    bundle = factory.bundle(sequence=2, files=files)
    baseline = tmp_path / "baseline"
    shutil.copytree(installed.root, baseline, symlinks=True)

    probe_root, log = tmp_path / "probe", tmp_path / "checkpoints"
    shutil.copytree(baseline, probe_root, symlinks=True)
    assert _ctl(probe_root, "bundle", "import", str(bundle), log=log).returncode == 0
    points = log.read_text().splitlines()
    assert len(points) >= 8, points

    outcomes: dict[str, int] = {}
    for k in range(1, len(points) + 1):
        root = tmp_path / f"kill-{k}"
        shutil.copytree(baseline, root, symlinks=True)
        killed = _ctl(root, "bundle", "import", str(bundle), kill_at=k)
        assert killed.returncode == -signal.SIGKILL, (k, killed.stderr)
        layout = Layout(root)
        store = Store(layout)
        active = store.active("demo")
        assert active in (1, 2), k
        store.check(store.load("demo", active))
        outcomes[f"active {active}"] = outcomes.get(f"active {active}", 0) + 1

        again = _ctl(root, "bundle", "import", str(bundle))
        if again.returncode != 0:
            # killed after the new sequence was renamed into place: it is installed, complete
            # and counts for anti-rollback; activating it is one command away
            assert "sequence 2 is already installed" in again.stderr, again.stderr
            assert _ctl(root, "bundle", "activate", "demo", "2").returncode == 0
        assert store.active("demo") == 2
        store.check(store.load("demo", 2))
        leftovers = [p.name for p in (layout.store / "demo").iterdir() if p.name.startswith(".")]
        assert leftovers == [], (k, leftovers)
    print(f"{len(points)} kill points tried: {outcomes}")
    assert outcomes.get("active 1") and outcomes.get("active 2")
