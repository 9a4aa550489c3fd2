"""A deliberately small POSIX ustar writer and strict streaming reader.

Bundles are uncompressed ustar archives so that a device can verify them while it streams them off
a slow USB stick. Python's tarfile accepts far more than we want (pax headers of any size, GNU
long names, links, devices, sparse files); this reader accepts regular files only, checks every
header checksum, and never reads a member's data unless the caller asks for it, in bounded chunks.
Sizes of 8 GiB and more use the base-256 size field that GNU tar and Python's tarfile read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from appliance.errors import FormatError

BLOCK = 512
CHUNK = 1024 * 1024
MAX_TRAILER = 1024 * 1024  # zero padding allowed after the end-of-archive marker
_TYPE_NAMES = {
    b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device",
    b"5": "directory", b"6": "FIFO", b"7": "contiguous file", b"x": "pax header",
    b"g": "pax global header", b"L": "GNU long name", b"K": "GNU long link", b"S": "sparse file",
}


def _pad(size: int) -> int:
    return -size % BLOCK


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\0"


def _size_field(size: int) -> bytes:
    if size < 8**11:
        return _octal(size, 12)
    return bytes([0x80]) + size.to_bytes(11, "big")  # base-256, as GNU tar writes it


def header(name: str, size: int, mtime: int, mode: int = 0o644) -> bytes:
    """One ustar header block for a regular file owned by root."""
    raw = name.encode()
    prefix = b""
    if len(raw) > 100:
        cut = raw.rfind(b"/", 0, 156)
        if cut <= 0 or len(raw) - cut - 1 > 100:
            raise FormatError(f"path {name!r} cannot be stored in a ustar header")
        prefix, raw = raw[:cut], raw[cut + 1 :]
    block = bytearray(BLOCK)
    block[0:100] = raw.ljust(100, b"\0")
    block[100:108] = _octal(mode, 8)
    block[108:116] = _octal(0, 8)
    block[116:124] = _octal(0, 8)
    block[124:136] = _size_field(size)
    block[136:148] = _octal(mtime, 12)
    block[148:156] = b" " * 8
    block[156:157] = b"0"
    block[257:265] = b"ustar\x0000"
    block[265:297] = b"root".ljust(32, b"\0")
    block[297:329] = b"root".ljust(32, b"\0")
    block[345:500] = prefix.ljust(155, b"\0")
    block[148:156] = f"{sum(block):06o}".encode() + b"\0 "
    return bytes(block)


class TarWriter:
    """Appends regular files to a ustar stream; `close()` writes the end-of-archive marker."""

    def __init__(self, out: BinaryIO, mtime: int) -> None:
        self._out = out
        self._mtime = mtime

    def add_bytes(self, name: str, data: bytes) -> None:
        self._out.write(header(name, len(data), self._mtime))
        self._out.write(data + b"\0" * _pad(len(data)))

    def add_stream(self, name: str, size: int, src: BinaryIO) -> None:
        self._out.write(header(name, size, self._mtime))
        left = size
        while left:
            chunk = src.read(min(CHUNK, left))
            if not chunk:
                raise FormatError(f"{name} shrank while it was being written")
            self._out.write(chunk)
            left -= len(chunk)
        self._out.write(b"\0" * _pad(size))

    def close(self) -> None:
        self._out.write(b"\0" * (2 * BLOCK))


@dataclass(frozen=True)
class Member:
    name: str
    size: int


def _field_str(raw: bytes, what: str) -> str:
    value, _, rest = raw.partition(b"\0")
    if rest.strip(b"\0"):
        raise FormatError(f"tar header {what} has bytes after its terminator")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"tar header {what} is not UTF-8") from None


def _parse_number(raw: bytes, what: str) -> int:
    if raw[0] & 0x80:
        if raw[0] != 0x80:
            raise FormatError(f"tar header {what} is negative")
        return int.from_bytes(raw[1:], "big")
    text = raw.rstrip(b"\0 ").lstrip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise FormatError(f"tar header {what} is not an octal number") from None


def parse_header(block: bytes) -> Member:
    """Decode one header block, refusing everything but a checksummed ustar regular file."""
    stored = _parse_number(block[148:156], "checksum")
    if stored != sum(block[:148]) + 256 + sum(block[156:]):
        raise FormatError("tar header checksum mismatch (damaged or not a bundle)")
    if block[257:265] != b"ustar\x0000":
        raise FormatError("member is not a POSIX ustar header")
    kind = block[156:157]
    if kind not in (b"0", b"\0"):
        described = _TYPE_NAMES.get(kind, f"type {kind!r}")
        raise FormatError(f"bundle member is a {described}; only regular files are allowed")
    name = _field_str(block[0:100], "name")
    prefix = _field_str(block[345:500], "prefix")
    if prefix:
        name = f"{prefix}/{name}"
    return Member(name, _parse_number(block[124:136], "size"))


class TarReader:
    """Walks a ustar stream one member at a time. Call `read_data` or `skip` for each member."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self._pending = 0  # data + padding of the current member not yet consumed

    def _read_exact(self, n: int) -> bytes:
        data = self._src.read(n)
        if len(data) != n:
            raise FormatError("the bundle is truncated")
        return data

    def members(self) -> Iterator[Member]:
        while True:
            if self._pending:
                raise RuntimeError("previous member was not consumed")
            block = self._read_exact(BLOCK)
            if block == bytes(BLOCK):
                if self._read_exact(BLOCK) != bytes(BLOCK):
                    raise FormatError("a lone zero block inside the bundle")
                tail = self._src.read(MAX_TRAILER + 1)
                if len(tail) > MAX_TRAILER or tail.strip(b"\0"):
                    raise FormatError("data follows the end of the bundle")
                return
            member = parse_header(block)
            self._pending = member.size + _pad(member.size)
            yield member

    def read_data(self, member: Member, limit: int) -> Iterator[bytes]:
        """Yield the member's data in chunks, never more than `limit` bytes in all.

        The caller checks member.size against what it expects before calling; `limit` is a
        second fence so that a lying header can never make us read past a declared size.
        """
        if member.size > limit:
            raise FormatError(f"{member.name[:80]!r} is larger than the {limit} bytes allowed")
        left = member.size
        while left:
            chunk = self._read_exact(min(CHUNK, left))
            left -= len(chunk)
            yield chunk
        self._pending = 0
        self._read_exact(_pad(member.size))

    def read_small(self, member: Member, limit: int, what: str) -> bytes:
        if member.size > limit:
            raise FormatError(f"{what} is larger than {limit} bytes")
        return b"".join(self.read_data(member, limit))
