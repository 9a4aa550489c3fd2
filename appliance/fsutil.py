"""Durable file operations: the store's crash safety rests on these few calls."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_symlink(target: str, link: Path) -> None:
    """Point `link` at `target` with one rename(2): readers see the old or the new target."""
    tmp = link.with_name(f".{link.name}.new")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def build_once(final: Path, fill: Callable[[Path], None]) -> Path:
    """A cache entry made once, even by builders running at the same time: `fill` writes into
    a private folder beside `final`, which is then renamed into place with a `.complete`
    marker. A reader sees a whole entry or none; of two builders, the second keeps the first
    one's entry and drops its own. A half-made `final` without the marker (an older layout,
    or a folder touched by hand) is replaced."""
    if (final / ".complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        fill(tmp)
        (tmp / ".complete").touch()
        tmp.chmod(0o755)  # as a plain mkdir would have made it (mkdtemp: 0700)
        try:
            os.rename(tmp, final)  # onto a missing or empty folder only
        except OSError:
            if not (final / ".complete").exists():  # half-made, not another builder's
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; else the loser's copy
    return final
