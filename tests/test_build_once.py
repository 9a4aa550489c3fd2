"""Cache entries of the bundle builder (fetched sources, assembled parts, converted models) are
made once and seen whole, even when two builds share the cache at the same time, as `make test`
lets the Jetson flow run beside the x86 image (`appliance/fsutil.py: build_once`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from appliance.fsutil import build_once


def test_two_builders_at_once_leave_one_whole_entry(tmp_path: Path) -> None:
    final = tmp_path / "cache" / "entry"
    started = threading.Barrier(2)
    seen: list[list[str]] = []
    results: list[Path] = []

    def fill(into: Path) -> None:
        started.wait()  # both are inside fill before either renames
        (into / "a").write_text(threading.current_thread().name)
        time.sleep(0.05)
        (into / "b").write_text("b")
        if final.exists():  # a reader meanwhile: the entry is whole or absent
            seen.append(sorted(p.name for p in final.iterdir()))

    def build() -> None:
        results.append(build_once(final, fill))

    threads = [threading.Thread(target=build, name=f"builder-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [final, final]
    assert sorted(p.name for p in final.iterdir()) == [".complete", "a", "b"]
    assert all(names == [".complete", "a", "b"] for names in seen)
    assert [p.name for p in final.parent.iterdir()] == ["entry"]  # the loser's copy is gone


def test_a_complete_entry_is_not_made_again(tmp_path: Path) -> None:
    final = tmp_path / "entry"
    build_once(final, lambda into: (into / "a").write_text("first"))
    build_once(final, lambda into: (into / "a").write_text("second"))
    assert (final / "a").read_text() == "first"


def test_a_half_made_entry_is_replaced(tmp_path: Path) -> None:
    """The layout before build_once wrote in place: a crash left an entry without its marker."""
    final = tmp_path / "entry"
    final.mkdir()
    (final / "partial").write_text("half")
    build_once(final, lambda into: (into / "a").write_text("whole"))
    assert sorted(p.name for p in final.iterdir()) == [".complete", "a"]


def test_a_failed_fill_leaves_nothing(tmp_path: Path) -> None:
    def fail(into: Path) -> None:
        (into / "a").write_text("half")
        raise ValueError("conversion drifted")

    with pytest.raises(ValueError, match="drifted"):
        build_once(tmp_path / "entry", fail)
    assert list(tmp_path.iterdir()) == []
