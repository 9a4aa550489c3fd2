"""Our ustar writer produces archives that standard tar readers accept, and our reader refuses
what they would accept but we do not want."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from appliance.bundle.tarformat import BLOCK, TarReader, TarWriter, header, parse_header
from appliance.errors import FormatError


def test_roundtrip_with_python_tarfile_and_gnu_tar(tmp_path: Path) -> None:
    long_name = "models/" + "d" * 90 + "/" + "f" * 90 + ".gguf"
    buf = io.BytesIO()
    w = TarWriter(buf, 1_700_000_000)
    w.add_bytes("manifest.toml", b"a = 1\n")
    w.add_bytes(long_name, b"x" * 1000)
    w.close()
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        assert tf.getnames() == ["manifest.toml", long_name]
        member = tf.extractfile(long_name)
        assert member is not None and member.read() == b"x" * 1000
    archive = tmp_path / "a.tar"
    archive.write_bytes(buf.getvalue())
    listing = subprocess.run(["tar", "tf", str(archive)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert listing == ["manifest.toml", long_name]
    reader = TarReader(io.BytesIO(buf.getvalue()))
    names = []
    for m in reader.members():
        names.append(m.name)
        b"".join(reader.read_data(m, m.size))
    assert names == ["manifest.toml", long_name]


def test_base256_size_for_huge_members() -> None:
    size = 9 * 1024**3  # above ustar's 8 GiB octal limit
    block = header("models/big.gguf", size, 0)
    assert parse_header(block).size == size
    info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")
    assert info.size == size


def test_name_that_cannot_be_split() -> None:
    with pytest.raises(FormatError):
        header("x" * 200, 1, 0)


def test_read_data_never_exceeds_limit() -> None:
    buf = io.BytesIO()
    w = TarWriter(buf, 0)
    w.add_bytes("a", b"y" * 5000)
    w.close()
    reader = TarReader(io.BytesIO(buf.getvalue()))
    member = next(reader.members())
    with pytest.raises(FormatError, match="larger than"):
        next(reader.read_data(member, 4999))


def test_lone_zero_block_is_refused() -> None:
    raw = header("a", 0, 0) + bytes(BLOCK) + header("b", 0, 0) + bytes(2 * BLOCK)
    reader = TarReader(io.BytesIO(raw))
    with pytest.raises(FormatError, match="lone zero block"):
        for m in reader.members():
            b"".join(reader.read_data(m, m.size))
