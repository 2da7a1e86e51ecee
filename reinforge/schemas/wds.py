"""WebDataset tar shards: deterministic writing and member grouping on read.

A sample is the run of contiguous members sharing a key; the key is the member's path up to the
first dot of its basename, the extension everything after it (webdataset's convention). Writing is
byte-deterministic: fixed mtime/owner/mode, members in the order given.
"""
from __future__ import annotations

import io
import tarfile
from typing import IO, Iterator

SampleMembers = dict[str, bytes]  # extension -> bytes, plus "__key__" -> key (str)


class ShardReadError(Exception):
    """The tar itself is unreadable (corrupt or truncated): fails the whole task that reads it."""


def split_member_name(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext if dot else ""


def iter_samples(fileobj: IO[bytes]) -> Iterator[dict]:
    """Yield {"__key__": key, ext: bytes, ...} per sample, streaming. A member that is not a regular
    file (link, device, ...) marks its sample with "__error__": (reason, message) instead of vanishing."""
    current: dict | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                key, ext = split_member_name(member.name)
                if not ext:
                    continue
                if member.isfile():
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                else:
                    data = None
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                if data is None:
                    current["__error__"] = ("unreadable_member", f"{member.name} is not a regular file")
                else:
                    current[ext] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:  # truncated / corrupt archive
        raise ShardReadError(f"unreadable tar: {type(exc).__name__}: {exc}") from exc
    if current is not None:
        yield current


class ShardWriter:
    """Writes samples to a tar stream with fixed metadata so identical samples give identical bytes."""

    def __init__(self, fileobj: IO[bytes]):
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key.rpartition("/")[2]:
            raise ValueError(f"sample key {key!r} contains a dot")
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
