"""WebDataset tar shards: deterministic writing and member grouping on read.

A sample is the run of contiguous members sharing a key; the key is the member's path up to the
first dot of its basename, the extension everything after it (webdataset's convention). Writing is
byte-deterministic: fixed mtime/owner/mode, members in the order given.

Shards are untrusted: a key that is absolute or climbs with `..` would make `tar -x` or
tarfile.extractall write outside the target folder, so such samples are refused on read (`bad_key`)
and such names are never written. Reading is bounded by formats.limits: a member or sample over its
bound is refused (`member_too_large`) without being read, also inside a compressed `.tar.gz` stream.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zlib
from typing import IO, Iterator

from reinforge.formats.limits import SLACK, Limits

SampleMembers = dict[str, bytes]  # extension -> bytes, plus "__key__" -> key (str)
# tarfile reads a pax or GNU long-name header's payload into memory whole; real ones are < 4 KiB
MAX_HEADER_BYTES = SLACK
_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                 tarfile.GNUTYPE_LONGLINK)


class ShardReadError(Exception):
    """The tar itself is unreadable (corrupt or truncated): fails the whole task that reads it."""


def split_member_name(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext if dot else ""


def unsafe_name(name: str) -> str | None:
    """Why a member name or key could land outside the folder a tar is extracted into, or None.
    `sub/dir/name` is a legal WebDataset key; `/abs`, `..` parts (also with Windows' backslash) and
    NUL are not."""
    if "\0" in name:
        return "contains NUL"
    if name.startswith(("/", "\\")):
        return "is absolute"
    if ".." in name.replace("\\", "/").split("/"):
        return "has a '..' component"
    return None


class _BoundedTarInfo(tarfile.TarInfo):
    def _proc_member(self, tar):  # tarfile's dispatch per header type; the one place to check first
        if self.type in _HEADER_TYPES and self.size > MAX_HEADER_BYTES:
            raise tarfile.SubsequentHeaderError(  # tarfile turns it into ReadError wherever it occurs
                f"extended header of {self.size} bytes (over {MAX_HEADER_BYTES}) at offset {self.offset}")
        return super()._proc_member(tar)


class _Prefixed:
    """A read-only stream with `head` (already read from `raw`) put back in front."""

    def __init__(self, head: bytes, raw):
        self.head, self.raw = head, raw

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.raw.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.raw.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data if len(data) == size else data + self.raw.read(size - len(data))


# tarfile's own stream decompression ("r|*") copies its whole inflated buffer on every small read:
# passing over a member that inflates 1000x is quadratic (a 1 GiB bomb: 84 s, against 6.5 s here).
# Python's file decompressors inflate at most what is asked for, linearly.
_DECOMPRESSORS = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")), (b"BZh", bz2.BZ2File),
                  (b"\xfd7zXZ\x00", lzma.LZMAFile))


def _tar_stream(fileobj):
    """The uncompressed tar bytes of a plain, gzip, bzip2 or xz shard, as a stream."""
    head = fileobj.read(6)
    stream = _Prefixed(head, fileobj)
    for magic, opener in _DECOMPRESSORS:
        if head.startswith(magic):
            return opener(stream)
    return stream


def iter_samples(fileobj: IO[bytes], limits: Limits | None = None) -> Iterator[dict]:
    """Yield {"__key__": key, ext: bytes, ...} per sample, streaming. A sample that cannot be used keeps
    its key and gets "__error__": (reason, message) instead of vanishing, its members unread:
    unreadable_member (a link, device, ...), bad_key (unsafe_name), member_too_large (a member over
    limits.bound(its extension), or the sample over limits.sample; default Limits.default())."""
    limits = limits or Limits.default()
    current: dict | None = None
    size = 0
    try:
        with tarfile.open(fileobj=_tar_stream(fileobj), mode="r|", tarinfo=_BoundedTarInfo) as tar:
            for member in tar:
                tar.members = []  # a stream reader needs no index; keeping it grows with the shard
                if member.isdir():
                    continue
                key, ext = split_member_name(member.name)
                if not ext:
                    continue
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current, size = {"__key__": key}, 0
                    problem = unsafe_name(key)
                    if problem:
                        current["__error__"] = ("bad_key", f"sample key {key!r} {problem}")
                if "__error__" in current:
                    continue  # refused already: its other members are passed over unread
                refusal = _refusal(member, ext, size, limits)
                if refusal:
                    current = {"__key__": key, "__error__": refusal}  # drop what was read of it
                    continue
                current[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
                size += member.size
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as exc:  # truncated / corrupt
        raise ShardReadError(f"unreadable tar: {type(exc).__name__}: {exc}") from exc
    if current is not None:
        yield current


def _refusal(member: tarfile.TarInfo, ext: str, sample_size: int, limits: Limits) -> tuple[str, str] | None:
    if not member.isfile():
        return "unreadable_member", f"{member.name} is not a regular file"
    if member.size > limits.bound(ext):
        return "member_too_large", f"{member.name}: {member.size} bytes, over the bound of {limits.bound(ext)}"
    if sample_size + member.size > limits.sample:
        return "member_too_large", (f"{member.name}: the sample's members reach {sample_size + member.size} bytes, "
                                    f"over the sample bound of {limits.sample}")
    return None


_FAST_NAME_BYTES = 100  # names that fit ustar's name field whole; longer ones need its prefix field
_MAX_OCTAL_SIZE = 8 ** 11  # ustar's size field; larger members go through tarfile (which refuses them)


def _ustar_header(name: str, size: int) -> bytes:
    """The 512-byte header tarfile writes for a regular file `name` of `size` bytes with ShardWriter's
    fixed metadata."""
    raw = name.encode(tarfile.ENCODING, "surrogateescape")
    if len(raw) >= _FAST_NAME_BYTES or size >= _MAX_OCTAL_SIZE or "\0" in name:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
        return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    size_field = b"%011o\0" % size
    # tarfile's checksum: the block's byte sum with 8 spaces in the checksum field, as in the template
    checksum = _TEMPLATE_SUM + sum(raw) + sum(size_field) - _TEMPLATE_SIZE_SUM
    return b"".join((raw.ljust(_FAST_NAME_BYTES, b"\0"), _MODE_TO_SIZE, size_field, _MTIME, b"%06o\0 " % checksum,
                     _AFTER_CHECKSUM))


def _template() -> bytes:
    info = tarfile.TarInfo("")
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0, 0o444, 0, 0, "", ""
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape"))
    block[148:156] = b" " * 8
    return bytes(block)


_HEADER_TEMPLATE = _template()
_TEMPLATE_SUM, _TEMPLATE_SIZE_SUM = sum(_HEADER_TEMPLATE), sum(_HEADER_TEMPLATE[124:136])
# the template's fields around the name, size and checksum fields
_MODE_TO_SIZE, _MTIME, _AFTER_CHECKSUM = _HEADER_TEMPLATE[100:124], _HEADER_TEMPLATE[136:148], _HEADER_TEMPLATE[156:]
_PADDING = [bytes(n) for n in range(tarfile.BLOCKSIZE)]
FLUSH_BYTES = 1 << 20  # the writer hands samples to its stream in chunks of about this size


class ShardWriter:
    """Writes samples to a tar stream with fixed metadata so identical samples give identical bytes.
    Refuses (ValueError) any member name that could escape the folder the shard is extracted into.

    The bytes are exactly what `tarfile.open(mode="w", format=USTAR_FORMAT)` writes for these members
    (mtime 0, mode 0o444, uid/gid 0, empty owner names): headers of short names are built here from a
    template (tarfile spends ~50 us per member on them, more than copying a small image), any other
    name goes through tarfile.TarInfo.tobuf; a test compares both with tarfile byte for byte."""

    def __init__(self, fileobj: IO[bytes]):
        self._out = fileobj
        self._offset = fileobj.tell()  # as tarfile counts it: the end record pads the whole stream
        self._pending: list[bytes] = []  # samples not yet handed to the stream, and their size
        self._pending_bytes = 0
        self.samples = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key.rpartition("/")[2]:
            raise ValueError(f"sample key {key!r} contains a dot")
        names = [f"{key}.{ext}" for ext in members]
        joined = "/".join(names)  # no NUL, no "..", not absolute: every name is safe, no need to look closer
        if "\0" in joined or ".." in joined or joined.startswith(("/", "\\")):
            for name in names:  # checked before anything is written: no half-written sample
                problem = unsafe_name(name)
                if problem:
                    raise ValueError(f"member name {name!r} {problem}: refusing to write it")
        parts = []
        for name, data in zip(names, members.values()):
            parts += (_ustar_header(name, len(data)), data, _PADDING[-len(data) % tarfile.BLOCKSIZE])
        self._pending += parts
        self._pending_bytes += sum(map(len, parts))
        self.samples += 1
        if self._pending_bytes >= FLUSH_BYTES:  # few large writes: each write costs more than a small member
            self._flush()

    def _flush(self) -> None:
        self._out.write(b"".join(self._pending))
        self._offset += self._pending_bytes
        self._pending, self._pending_bytes = [], 0

    def close(self) -> None:
        """tarfile's end of archive: two zero blocks, then zeros up to a whole record (20 blocks)."""
        self._flush()
        end = self._offset + 2 * tarfile.BLOCKSIZE
        self._out.write(bytes(2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        self._offset = end + (-end % tarfile.RECORDSIZE)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
