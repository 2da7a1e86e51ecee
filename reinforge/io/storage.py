"""fsspec I/O with exactly-once commits: write to a temporary name, then move to the final name.

On filesystems with an atomic rename (local, POSIX mounts) that is os.replace; on object stores a
single PUT (or a completed multipart upload) is already all-or-nothing, so the object is written
under its final name directly, and a write that fails is discarded, never completed: nothing appears.
Object stores have no folders, so none are made there (s3fs's makedirs would create a missing bucket).
Listings and existence checks bypass fsspec's listing cache: other processes write the same run.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from contextlib import contextmanager, suppress
from typing import IO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile

from reinforge.io.manifest import TMP_MARKER


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url)


def absolute_url(url: str) -> str:
    """A URL every process reads the same way: a local relative path becomes absolute; URLs stay."""
    return url if "://" in url else os.path.abspath(url)


def has_rename(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


# protocols whose "folders" are key prefixes: nothing to create before a write
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool(OBJECT_STORES.intersection(protocols))


def temp_name(path: str) -> str:
    directory, _, base = path.rpartition("/")
    return f"{directory}/{TMP_MARKER}{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


class HashingWriter:
    """Pass-through writer that counts bytes and, if asked, hashes them as they stream out (sha256 is
    None otherwise: hashing costs ~1 s per GB, which work files and plans have no use for)."""

    def __init__(self, raw: IO[bytes], digest: bool = False):
        self.raw = raw
        self.sha256 = hashlib.sha256() if digest else None
        self.bytes = 0

    def write(self, data) -> int:
        self.raw.write(data)
        if self.sha256 is not None:
            self.sha256.update(data)
        self.bytes += len(data)
        return len(data)

    def tell(self) -> int:
        return self.bytes

    def flush(self) -> None:
        self.raw.flush()


@contextmanager
def atomic_open(url: str, digest: bool = False) -> Iterator[HashingWriter]:
    """Open `url` for writing; it appears under its final name only if the block completes. With
    `digest`, the writer's sha256 hashes what was written."""
    fs, path = filesystem(url)
    if not is_object_store(fs):
        fs.makedirs(path.rpartition("/")[0], exist_ok=True)
    rename = has_rename(fs)
    target = temp_name(path) if rename else path
    raw = fs.open(target, "wb")
    try:
        writer = HashingWriter(raw, digest)
        yield writer
        raw.close()  # an object store's upload completes here, whole, or not at all
        if rename:
            os.replace(target, path)
    except BaseException:
        _abandon(fs, raw, target, rename)
        raise


def _abandon(fs: fsspec.AbstractFileSystem, raw, target: str, rename: bool) -> None:
    """Drop a failed write: the temporary file, or the object store's pending upload (a file object's
    close() would complete it under the final name, so it is discarded instead; an object already
    there, from an earlier run, stays, as a local final file does)."""
    if not rename and isinstance(raw, AbstractBufferedFile):
        with suppress(Exception):  # the write's own error is the one to report
            raw.discard()  # s3fs: abort the multipart upload, drop the buffer; gcsfs: cancel the upload
        raw.closed = True  # not close(): that would upload what was buffered
        return
    try:
        raw.close()
    finally:
        fs.invalidate_cache(target)
        if fs.exists(target):
            fs.rm(target)


def write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url) as f:
        f.write(data)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def read_text(url: str) -> str:
    return read_bytes(url).decode()


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    return fs.exists(path)


def remove(url: str) -> None:
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    if fs.exists(path):
        fs.rm(path)


def remove_tree(url: str) -> None:
    """Remove the folder `url` and everything under it (nothing if it is missing)."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_files(url: str, suffix: str = "") -> list[str]:
    """Full URLs of the files directly under `url` ending in `suffix` (empty if the folder is missing)."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    protocol = url.split("://")[0] + "://" if "://" in url else ""
    names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(suffix))
    return [n if not protocol or n.startswith(protocol) else protocol + n for n in names]
