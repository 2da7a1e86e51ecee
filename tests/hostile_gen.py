"""Hostile shard content for the security tests and bench/hostile.py: tar members with escaping names,
and compression bombs built small. A bomb is made without ever holding its expansion: deflate of a
zero block after a full flush is the same bytes every time, so the block is repeated, and the CRC is
extended over zeros one MiB at a time."""
from __future__ import annotations

import functools
import io
import struct
import tarfile
import zlib

import numpy as np

MiB = 1 << 20
_ZEROS = bytes(MiB)


@functools.lru_cache(maxsize=None)
def _zero_block() -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    c.compress(_ZEROS)
    c.flush(zlib.Z_FULL_FLUSH)
    return c.compress(_ZEROS) + c.flush(zlib.Z_FULL_FLUSH)  # the state after a full flush is always the same


def deflate(parts: list) -> tuple[bytes, int, int]:
    """(raw deflate, crc32, length) of the concatenation of `parts`: bytes as given, an int n for
    n zero bytes (n a multiple of 1 MiB)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    out, crc, size = [], 0, 0
    for part in parts:
        if isinstance(part, int):
            assert part % MiB == 0
            out.append(c.flush(zlib.Z_FULL_FLUSH))
            out.append(_zero_block() * (part // MiB))
            crc = _zeros_crc(crc, part // MiB)
            size += part
        else:
            out.append(c.compress(part))
            crc, size = zlib.crc32(part, crc), size + len(part)
    out.append(c.flush(zlib.Z_FINISH))
    return b"".join(out), crc, size


@functools.lru_cache(maxsize=None)
def _zeros_crc(crc: int, mebibytes: int) -> int:
    for _ in range(mebibytes):
        crc = zlib.crc32(_ZEROS, crc)
    return crc


def gzip_of(parts: list) -> bytes:
    """A valid gzip file of `parts` (see deflate)."""
    body, crc, size = deflate(parts)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + body + struct.pack("<II", crc, size & 0xFFFFFFFF)


def gzip_bomb(expanded: int) -> bytes:
    """gzip of `expanded` zero bytes: ~1/1000 of that."""
    return gzip_of([expanded])


def npy_header(shape: tuple, dtype: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def zip_of(entries: dict[str, list]) -> bytes:
    """A zip (npz) whose entries hold the concatenation of parts (see deflate), deflated; sizes < 4 GiB."""
    out, central = io.BytesIO(), []
    for name, parts in entries.items():
        body, crc, size = deflate(parts)
        offset, raw = out.tell(), name.encode()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(body), size, len(raw), 0))
        out.write(raw + body)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(body), size,
                                   len(raw), 0, 0, 0, 0, 0o644 << 16, offset) + raw)
    start = out.tell()
    out.write(b"".join(central))
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), out.tell() - start, start, 0))
    return out.getvalue()


def npz_bomb(name: str, expanded: int, dtype: str = "<f4") -> bytes:
    """An npz whose array `name` really holds `expanded` bytes of zeros (its header says so too)."""
    itemsize = np.dtype(dtype).itemsize
    return zip_of({f"{name}.npy": [npy_header((expanded // itemsize,), dtype), expanded]})


def npz_claiming(name: str, shape: tuple, dtype: str = "<f4") -> bytes:
    """A tiny npz whose .npy header claims `shape` (e.g. 4 TiB) over a few bytes of data."""
    return zip_of({f"{name}.npy": [npy_header(shape, dtype) + bytes(16)]})


def tar_members(members: list[tuple[str, bytes | int]]) -> list:
    """The parts (see deflate) of an uncompressed tar of (name, data) members, names as given: nothing
    checks them. data may be an int: that many zero bytes (a multiple of 1 MiB)."""
    parts: list = []
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = data if isinstance(data, int) else len(data)
        info.mode, info.mtime = 0o444, 0
        parts.append(info.tobuf(format=tarfile.USTAR_FORMAT))
        if isinstance(data, int):
            parts.append(data)
        else:
            parts.append(data + bytes(-len(data) % 512))
    parts.append(bytes(1024))  # end of archive
    return parts


def write_raw_tar(path, members: list[tuple[str, bytes]]) -> None:
    """A plain tar with member names exactly as given (ShardWriter refuses the hostile ones)."""
    with open(path, "wb") as f:
        f.write(b"".join(tar_members(members)))


def write_tar_gz(path, members: list[tuple[str, bytes | int]]) -> None:
    """A .tar.gz shard; an int member is that many zero bytes, stored as a bomb."""
    with open(path, "wb") as f:
        f.write(gzip_of(tar_members(members)))


# --------------------------------------------------------------------------- finished runs, rewritten

def split_key(name: str) -> str:
    from reinforge.formats.wds import split_member_name
    return split_member_name(name)[0]


def write_run_shard(run, task: str, members: list[tuple[str, bytes]]) -> None:
    """RUN/shards/<task>.tar with raw members (names unchecked) and its manifest, as if a run wrote it."""
    import hashlib
    import os

    from reinforge.io.manifest import OutputFile, RunLayout, TaskManifest
    layout = RunLayout(str(run))
    for folder in layout.directories:
        os.makedirs(folder, exist_ok=True)
    write_raw_tar(layout.shard(task), members)
    data = open(layout.shard(task), "rb").read()
    samples = len({split_key(name) for name, _ in members})
    manifest = TaskManifest.from_json(open(layout.manifest(task)).read()) if os.path.exists(layout.manifest(task)) \
        else TaskManifest(task_id=task, inputs=[], samples_in=samples, samples_out=samples, outputs=[],
                          config_digest="test", versions={}, stages={}, started_at=0.0, seconds=0.0)
    manifest.outputs = [OutputFile(f"shards/{task}.tar", len(data), hashlib.sha256(data).hexdigest(), samples)]
    with open(layout.manifest(task), "w") as f:
        f.write(manifest.to_json())


def rewrite_shard(run, task: str, edit) -> None:
    """Rewrite a finished run's shard with raw members (edit: [(name, data)] -> [(name, data)]), and its
    manifest to match."""
    from reinforge.io.manifest import RunLayout
    with tarfile.open(RunLayout(str(run)).shard(task)) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    write_run_shard(run, task, edit(members))


def copies_after(members: list, source: str, after: dict[str, list[str]]) -> list:
    """members with copies of sample `source`, renamed to each new key, inserted after sample k for k in
    `after` (members of one sample are contiguous)."""
    body = [(name[len(source):], data) for name, data in members if split_key(name) == source]
    out = []
    for i, (name, data) in enumerate(members):
        out.append((name, data))
        last = i + 1 == len(members) or split_key(members[i + 1][0]) != split_key(name)
        for new in after.get(split_key(name), []) if last else []:
            out += [(new + suffix, payload) for suffix, payload in body]
    return out


def replace_members(members: list, changes: dict[str, dict[str, bytes | None]]) -> list:
    """members with, per sample key, members replaced or added (bytes) or dropped (None)."""
    groups: dict[str, list] = {}
    for name, data in members:  # a sample's members are contiguous; dicts keep the sample order
        groups.setdefault(split_key(name), []).append((name, data))
    out = []
    for key, group in groups.items():
        change = dict(changes.get(key, {}))
        for name, data in group:
            value = change.pop(name[len(key) + 1:], data)
            if value is not None:
                out.append((name, value))
        out += [(f"{key}.{ext}", data) for ext, data in change.items() if data is not None]
    return out
