"""A fast reader for the plain ustar headers that WebDataset shards use, for the resharder's hot loops.

`tarfile` costs ~30 us per member, more than copying a 16 KB image; parsing the 512-byte header
directly is ~10x cheaper. Only regular files and directories with ustar/v7 headers are handled; any
other header (pax 'x'/'g', GNU long names 'L'/'K', links, ...) raises Unsupported and the callers
fall back to `tarfile`, so unusual archives stay correct, just slower.
"""
from __future__ import annotations

from typing import Callable, Iterator

BLOCK = 512
_ZERO = bytes(BLOCK)


class Unsupported(Exception):
    """A header this scanner does not handle; use tarfile instead."""


class Corrupt(Exception):
    """Not a tar header (bad checksum / truncated)."""


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def parse_header(block: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, typeflag) of one header block; None for an end-of-archive zero block."""
    if len(block) < BLOCK:
        raise Corrupt("truncated header")
    if block == _ZERO:
        return None
    try:
        checksum = _number(block[148:156])
    except ValueError:
        raise Corrupt("bad checksum field") from None
    if checksum != sum(block) - sum(block[148:156]) + 256:  # the field counted as 8 spaces
        raise Corrupt("header checksum mismatch")
    typeflag = block[156:157]
    if typeflag not in (b"0", b"\0", b"5"):
        raise Unsupported(f"tar header type {typeflag!r}")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape"), _number(block[124:136]), typeflag


def scan(read_at: Callable[[int, int], bytes], start: int = 0, end: int | None = None
         ) -> Iterator[tuple[str, int, int, int]]:
    """(name, header offset, data offset, size) of each regular file, reading headers only."""
    pos = start
    while end is None or pos < end:
        header = read_at(pos, BLOCK)
        if not header and end is None:
            return
        parsed = parse_header(header)
        if parsed is None:
            return
        name, size, typeflag = parsed
        if typeflag != b"5":
            yield name, pos, pos + BLOCK, size
        pos += BLOCK + -(-size // BLOCK) * BLOCK


def members_of(chunk: bytes) -> list[tuple[str, bytes]]:
    """(name, data) of every regular file in a byte range that starts at a header."""
    view = memoryview(chunk)
    return [(name, bytes(view[data:data + size]))
            for name, _, data, size in scan(lambda p, n: chunk[p:p + n], 0, len(chunk))
            if data + size <= len(chunk) or _raise(Corrupt("member runs past the byte range"))]


def _raise(exc: Exception):
    raise exc
