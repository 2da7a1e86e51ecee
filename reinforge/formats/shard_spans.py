"""Where each sample of a WebDataset shard lies, read from its tar headers alone (the uid index's scan).

scan_plain reads tar headers and the json members only, seeking over image bytes: one tight Python
loop walks the headers, then checksums, member names and the grouping into samples are computed for
the whole shard with numpy, exactly as tarscan and wds.split_member_name would one by one. Headers it
does not handle raise tarscan.Unsupported, and scan_tarfile gives the same lists through tarfile.
"""
from __future__ import annotations

import os
import tarfile

import numpy as np

from reinforge.formats import tarscan
from reinforge.formats.wds import split_member_name

SPARSE_HEADERS = 32 << 10  # mean bytes per member above which a shard is read by pread, not mapped


def open_buffer(fs, path: str, f):
    """A sliceable view of a pool shard. Local files: a memory map where headers are dense (small
    members: no syscall per header), pread where they are sparse (large images: a mapping would take a
    page fault per header, ~2x the cost of a pread); other stores: seek + read."""
    import mmap

    from reinforge.io.storage import has_rename
    if has_rename(fs):  # local filesystem
        try:
            fd = f.fileno()
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError, AttributeError):  # empty file, or no real fd
            return _SeekSlices(f), (lambda: None)
        if _mean_member_bytes(mm) <= SPARSE_HEADERS:
            return mm, mm.close
        mm.close()
        return _PreadSlices(fd), (lambda: None)
    return _SeekSlices(f), (lambda: None)


def _mean_member_bytes(buf, probes: int = 32) -> float:
    """Mean bytes per member over the first few headers (a performance guess; never affects results)."""
    pos = n = 0
    while n < probes and len(block := buf[pos:pos + tarscan.BLOCK]) == tarscan.BLOCK:
        try:
            size = tarscan._number(block[124:136])
        except ValueError:
            break
        pos += tarscan.BLOCK + ((size + 511) & -512)
        n += 1
    return pos / max(n, 1)


class _PreadSlices:
    def __init__(self, fd: int):
        self.fd = fd

    def __getitem__(self, span: slice) -> bytes:
        return os.pread(self.fd, span.stop - span.start, span.start)


class _SeekSlices:
    """buf[a:b] over a file object by seek + read (fsspec's read-ahead keeps a forward scan sequential)."""

    def __init__(self, f):
        self.f = f

    def __getitem__(self, span: slice) -> bytes:
        self.f.seek(span.start)
        return self.f.read(span.stop - span.start)


def _number(field: bytes) -> int:
    try:
        return tarscan._number(field)
    except ValueError:
        raise tarscan.Corrupt("bad number field in a tar header") from None


def _walk_headers(buf) -> tuple[list[bytes], list[int]]:
    """Every header block of a plain tar and its member's size, in order, reading nothing else: the one
    Python loop per member."""
    block_size, zero = tarscan.BLOCK, tarscan._ZERO
    headers, sizes = [], []
    pos = 0
    while True:
        try:
            block = buf[pos:pos + block_size]
        except OverflowError:  # a garbage size field sent us past any file: its checksum tells below
            break
        if len(block) < block_size:
            if not block:
                break  # no end-of-archive blocks: tarscan.scan accepts that too
            raise tarscan.Corrupt("truncated header")
        if block == zero:
            break
        headers.append(block)
        try:  # tarfile's "%011o\0"; anything else goes through the general parser
            size = int(block[124:135], 8) if block[135] == 0 else _number(block[124:136])
        except ValueError:
            size = _number(block[124:136])
        sizes.append(size)
        pos += block_size + ((size + 511) & -512)
    return headers, sizes


def _header_rows(buf) -> tuple[np.ndarray, np.ndarray]:
    """_walk_headers' headers as the rows of an (n, 512) array, and their sizes."""
    chain = _ustar_chain(buf)
    if chain is not None:
        return chain
    headers, sizes = _walk_headers(buf)
    return (np.frombuffer(b"".join(headers), np.uint8).reshape(-1, tarscan.BLOCK), np.asarray(sizes, np.int64))


_USTAR = np.frombuffer(b"ustar", np.uint8)
_OCTAL = 8 ** np.arange(10, -1, -1, dtype=np.int64)


def _ustar_chain(buf) -> tuple[np.ndarray, np.ndarray] | None:
    """_walk_headers for a shard in memory (a mapped file), without a Python step per member: the
    512-byte blocks with the ustar magic are taken as headers if each one's size (in tarfile's form)
    leads exactly to the next, the first is at 0 and the last leads to a zero block or the end of the
    file. Then they are the very headers the walk visits; None otherwise (member bytes that look like a
    header, other header formats or size fields, a damaged tar), and the walk decides."""
    try:
        data = np.frombuffer(buf, np.uint8)
    except (TypeError, ValueError):  # not a buffer (pread or seek slices), or an empty map
        return None
    n = len(data) // tarscan.BLOCK
    blocks = data[:n * tarscan.BLOCK].reshape(n, tarscan.BLOCK)
    at = np.flatnonzero(blocks[:, 257] == _USTAR[0])
    at = at[(blocks[at, 257:262] == _USTAR).all(axis=1)]
    if not len(at) or at[0] != 0:
        return None
    h = blocks[at]  # a copy: nothing keeps the map exported once this returns
    digits = h[:, 124:135].astype(np.int64) - 48
    if (h[:, 135] != 0).any() or ((digits < 0) | (digits > 7)).any():
        return None
    sizes = digits @ _OCTAL
    following = at + 1 + (sizes + 511) // tarscan.BLOCK  # the block after each member
    if (following[:-1] != at[1:]).any():
        return None
    end = int(following[-1])
    if end * tarscan.BLOCK < len(data) and (end >= n or blocks[end].any()):  # a short or non-zero block follows
        return None
    return h, sizes


def scan_plain(buf) -> tuple[list, list, list, list]:
    """Samples of a plain ustar shard from its headers: (key bytes, first header offset, end, json
    member (data offset, size) or None) per sample. Headers are walked in one tight loop; checksums,
    types, names and the grouping into samples are then computed for all of them at once with numpy,
    exactly as tarscan.parse_header and split_member_name would one by one. Raises tarscan.Unsupported
    for a header but a regular file or a directory, or a ustar name prefix (the caller falls back to
    tarfile), tarscan.Corrupt for a damaged header."""
    h, sizes = _header_rows(buf)
    if not len(h):
        return [], [], [], []
    _verify_checksums(h)
    flag = h[:, 156]
    odd = ~np.isin(flag, (48, 0, 53))  # "0", NUL (regular file), "5" (directory)
    if odd.any():
        raise tarscan.Unsupported(f"tar header type {bytes([flag[np.argmax(odd)]])!r}")
    if ((h[:, 345] != 0) & (h[:, 257:262] == np.frombuffer(b"ustar", np.uint8)).all(axis=1)).any():
        raise tarscan.Unsupported("ustar name prefix")
    offsets = np.r_[0, np.cumsum(tarscan.BLOCK + ((sizes + 511) & -512))]
    nul = h[:, :100] == 0
    length = np.where(nul.any(axis=1), nul.argmax(axis=1), 100)
    width = int(length.max())
    names = h[:, :width]  # names are short: work on the columns any of them uses
    cols = np.arange(width)
    inside = cols < length[:, None]
    slashes = ((names == 47) & inside)[:, ::-1]
    slash = np.where(slashes.any(axis=1), width - 1 - slashes.argmax(axis=1), -1)
    dots = (names == 46) & inside & (cols > slash[:, None])
    dot = np.where(dots.any(axis=1), dots.argmax(axis=1), width)
    rows = np.flatnonzero((flag != 53) & (dot < length - 1))  # members with an extension: part of a sample
    if not len(rows):
        return [], [], [], []
    keys = names[rows] * (cols < dot[rows, None])
    new = np.r_[True, (keys[1:] != keys[:-1]).any(axis=1)]
    sample = np.cumsum(new) - 1
    last = np.r_[new[1:], True]
    ext = names[rows[:, None], np.minimum(dot[rows, None] + 1 + np.arange(4), width - 1)]
    is_json = (length[rows] - dot[rows] == 5) & (ext == np.frombuffer(b"json", np.uint8)).all(axis=1)
    json_row = np.full(int(sample[-1]) + 1, -1, np.int64)
    np.maximum.at(json_row, sample[is_json], rows[is_json])  # the sample's last json member, as grouping reads it
    jsons = [None if r < 0 else (int(offsets[r]) + tarscan.BLOCK, int(sizes[r])) for r in json_row.tolist()]
    key_bytes = np.ascontiguousarray(keys[new]).view(f"S{width}").ravel().tolist()  # trailing NULs dropped
    return key_bytes, offsets[rows[new]].tolist(), (offsets[rows[last] + 1]).tolist(), jsons


def _verify_checksums(h: np.ndarray) -> None:
    """tarscan.parse_header's check for every header at once; a header whose checksum field is not in
    tarfile's form is parsed one by one."""
    for i in np.flatnonzero(~checksums_ok(h)):
        if _number(h[i, 148:156].tobytes()) != _byte_sums(h[i:i + 1])[0]:
            raise tarscan.Corrupt("header checksum mismatch")


def checksums_ok(h: np.ndarray) -> np.ndarray:
    """Per header block (rows of h): whether its checksum field, in tarfile's form ("%06o\\0 "), equals
    the unsigned sum of the block with the field read as spaces. False also for a field in any other
    form (which tarscan.parse_header may still accept)."""
    sums = _byte_sums(h)
    digits = ((sums[:, None] >> np.arange(15, -1, -3)) & 7) + 48
    return (h[:, 148:154] == digits).all(axis=1) & (h[:, 154] == 0) & (h[:, 155] == 32)


def _byte_sums(h: np.ndarray) -> np.ndarray:
    """The header checksum of each row: its byte sum with the checksum field counted as 8 spaces."""
    lanes = h.view("<u8")  # bytes summed in four 16-bit lanes per word (64 words x 510 < 2**16: no carry)
    mask = np.uint64(0x00FF00FF00FF00FF)
    lanes = ((lanes & mask) + ((lanes >> np.uint64(8)) & mask)).sum(axis=1, dtype=np.uint64)
    sums = sum(((lanes >> np.uint64(s)) & np.uint64(0xFFFF)).astype(np.int64) for s in (0, 16, 32, 48))
    return sums - h[:, 148:156].sum(axis=1, dtype=np.int64) + 256


def scan_tarfile(fs, path: str) -> tuple[list, list, list, list]:
    """scan_plain's lists through tarfile, for the headers it refuses (pax, GNU long names, links)."""
    keys, starts, ends, jsons = [], [], [], []
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = split_member_name(info.name)
            if not ext:
                continue
            if not keys or keys[-1] != key:
                keys.append(key)
                starts.append(info.offset)
                ends.append(0)
                jsons.append(None)
            ends[-1] = info.offset_data + -(-info.size // 512) * 512
            if ext == "json":
                jsons[-1] = tar.extractfile(info).read()
    return keys, starts, ends, jsons
