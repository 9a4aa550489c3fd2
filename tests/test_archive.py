"""The one writer of signed archives (bundles, control documents, system updates)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.bundle.tarformat import TarReader
from appliance.errors import StoreError
from appliance.publish.archive import write_signed

CREATED = datetime(2026, 11, 30, tzinfo=UTC)


def test_manifest_signature_then_files(tmp_path: Path) -> None:
    src = tmp_path / "weights.bin"
    src.write_bytes(b"x" * 1000)
    lines: list[str] = []
    out = write_signed(tmp_path / "out" / "a-1.bundle", CREATED, b"m = 1\n", b"sig",
                       [("models/w.bin", 1000, src)], lines.append)
    with out.open("rb") as f:
        reader = TarReader(f)
        got = [(m.name, reader.read_small(m, 2000, m.name)) for m in reader.members()]
    assert got == [("manifest.toml", b"m = 1\n"), ("manifest.sig", b"sig"),
                   ("models/w.bin", b"x" * 1000)]
    assert lines == ["write models/w.bin (100%)"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["a-1.bundle"]


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    """A source that vanished mid-build: one readable error, no temporary file, and an
    archive already there stays as it was."""
    target = tmp_path / "a-1.bundle"
    target.write_bytes(b"the old one")
    with pytest.raises(StoreError, match=r"cannot write .*a-1\.bundle"):
        write_signed(target, CREATED, b"m = 1\n", b"sig", [("w.bin", 10, tmp_path / "gone")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-1.bundle"]
    assert target.read_bytes() == b"the old one"


def test_a_target_folder_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(StoreError, match="cannot write"):
        write_signed(tmp_path / "out" / "a-1.control", CREATED, b"m = 1\n", b"sig")
