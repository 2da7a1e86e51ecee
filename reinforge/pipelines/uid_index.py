"""Where a DataComp pool's samples are, by uid, and reading one back from its byte range (the
resharder's and join's first pass and their task reads).

One small Parquet per pool shard, `<run>/index/<shard id>.parquet`, columns
  uid_hi, uid_lo  uint64   the sample's uid (from its json member); 0 where status != 0
  offset, length  int64    byte range of the sample's tar members (headers included) in the shard
  position        int32    sample index within the shard
  status          int8     0 ok, 1 no json member, 2 json without the uid field, 3 malformed uid, 4 bad json
  key             string   the sample's key in the pool shard
plus file metadata {"url", "size", "mtime"} of the shard it describes. A shard is indexed once; the
file is reused while the shard's size and mtime are unchanged. Indexing reads tar headers and the
json members only, seeking over image bytes. PoolReader fetches a sample back from its range.
"""
from __future__ import annotations

import io
import json
import tarfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reinforge.pipelines.sources import Task
from reinforge.pipelines.storage import exists, filesystem, write_bytes
from reinforge.schemas import tarscan
from reinforge.schemas.limits import Limits
from reinforge.schemas.subset import UID_OK, parse_hex_uids
from reinforge.schemas.wds import ShardReadError, iter_samples, split_member_name, unsafe_name

INDEX_STATUS = {1: "no_json", 2: "no_uid_field", 3: "malformed_uid", 4: "bad_json"}
_META_KEY = b"reinforge.uid_index"


def shard_fingerprint(url: str) -> dict:
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise ShardReadError(f"pool shard {url} not found") from None
    mtime = info.get("mtime", info.get("LastModified", info.get("ETag", info.get("updated"))))
    return {"url": url, "size": int(info.get("size") or 0), "mtime": str(mtime)}


def _open_reader(fs, path: str, f):
    """read_at(pos, n) over a pool shard: mmap for local files (no syscall per header), else seek+read."""
    import mmap

    from reinforge.pipelines.storage import has_rename
    if has_rename(fs):  # local filesystem
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return (lambda pos, n: mm[pos:pos + n]), mm.close
        except (ValueError, OSError, AttributeError):  # empty file, or no real fd
            pass

    def read_at(pos: int, n: int) -> bytes:
        f.seek(pos)
        return f.read(n)
    return read_at, (lambda: None)


def _scan_fast(fs, path: str):
    """(key, header offset, end, json bytes or None) per sample; tarscan.Unsupported for unusual tars."""
    with fs.open(path, "rb") as f:
        read_at, close = _open_reader(fs, path, f)
        try:
            for name, header, data, size in tarscan.scan(read_at):
                yield name, header, data + -(-size // 512) * 512, (lambda d=data, n=size: read_at(d, n))
        finally:
            close()


def _scan_tarfile(fs, path: str):
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            if info.isfile():
                yield (info.name, info.offset, info.offset_data + -(-info.size // 512) * 512,
                       (lambda i=info: tar.extractfile(i).read()))


def index_shard(url: str, uid_field: str = "uid") -> pa.Table:
    fs, path = filesystem(url)
    try:
        return _index_members(_scan_fast(fs, path), uid_field)
    except tarscan.Unsupported:
        pass
    except tarscan.Corrupt as exc:
        raise ShardReadError(f"cannot index pool shard {url}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise ShardReadError(f"cannot index pool shard {url}: {type(exc).__name__}: {exc}") from exc
    try:
        return _index_members(_scan_tarfile(fs, path), uid_field)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardReadError(f"cannot index pool shard {url}: {type(exc).__name__}: {exc}") from exc


def _index_members(members, uid_field: str) -> pa.Table:
    """Group contiguous members by key into samples (webdataset's rule) and read each json member."""
    samples = []  # [key, offset, end, uid text or None, status]
    for name, header, end, read in members:
        key, ext = split_member_name(name)
        if not ext:
            continue
        if not samples or samples[-1][0] != key:
            samples.append([key, header, end, None, 1])
        samples[-1][2] = end
        if ext == "json":
            samples[-1][3], samples[-1][4] = _uid_from_json(read(), uid_field)
    keys, offsets, ends, uid_text, status = (list(c) for c in zip(*samples)) if samples else ([],) * 5
    hi, lo, ustatus = parse_hex_uids(pa.array(uid_text, pa.string()))
    st = np.asarray(status, np.int8)
    st[(st == 0) & (ustatus != UID_OK)] = 3
    hi[st != 0] = lo[st != 0] = 0
    offsets = np.asarray(offsets, np.int64)
    return pa.table({"uid_hi": hi, "uid_lo": lo, "offset": offsets, "length": np.asarray(ends, np.int64) - offsets,
                     "position": np.arange(len(keys), dtype=np.int32), "status": st,
                     "key": pa.array(keys, pa.string())})


def _uid_from_json(data: bytes, uid_field: str) -> tuple:
    try:
        meta = json.loads(data)
    except ValueError:
        return None, 4
    if not isinstance(meta, dict) or uid_field not in meta:
        return None, 2
    value = meta[uid_field]
    return (value if isinstance(value, str) else None), 0


def load_or_build(task: Task, index_dir: str, uid_field: str) -> pa.Table:
    """The index of one pool shard (task.id names the file), rebuilt when the shard changed."""
    url = task.inputs[0]
    target = f"{index_dir.rstrip('/')}/{task.id}.parquet"
    fingerprint = {**shard_fingerprint(url), "uid_field": uid_field}
    if exists(target):
        fs, path = filesystem(target)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        saved = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
        if saved == fingerprint:
            return table
    table = index_shard(url, uid_field)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(fingerprint, sort_keys=True).encode()})
    buf = pa.BufferOutputStream()  # pyarrow wants a real stream; index files are small
    pq.write_table(table, buf)
    write_bytes(target, buf.getvalue().to_pybytes())
    return table


def build_index(tasks: list[Task], index_dir: str, uid_field: str, threads: int = 8):
    """Index tables in shard order; shards are indexed on a few threads (reads release the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(tasks)))) as pool:
        yield from pool.map(lambda t: load_or_build(t, index_dir, uid_field), tasks)


# ---------------------------------------------------------------- reading samples back by byte range

def sample_from_range(data: bytes, length: int, where: str) -> dict:
    """The members of one sample from its byte range: the fast header scan, tarfile for unusual tars."""
    bad = {"__error__": ("bad_range", f"{where} does not hold one sample (pool shard changed since indexing?)")}
    if len(data) != length:
        return bad
    try:
        members = tarscan.members_of(data)
        keys = {split_member_name(name)[0] for name, _ in members}
        sample = {split_member_name(name)[1]: payload for name, payload in members}
    except tarscan.Unsupported:
        try:
            samples = list(iter_samples(io.BytesIO(data)))
        except ShardReadError:
            return bad
        keys, sample = {s["__key__"] for s in samples}, (samples[0] if samples else {})
        sample.pop("__key__", None)
    except tarscan.Corrupt:
        return bad
    if len(keys) != 1:
        return bad
    problem = unsafe_name(next(iter(keys)))
    return {"__error__": ("bad_key", f"{where}: sample key {next(iter(keys))!r} {problem}")} if problem else sample


class PoolReader:
    """Single pool samples by byte range, keeping the last few pool shards open. A range over
    limits.sample (default Limits.for_images()) is refused unread (`member_too_large`)."""

    def __init__(self, open_limit: int = 4, limits: Limits | None = None):
        self.open_limit = open_limit
        self.limits = limits or Limits.for_images()
        self.handles: OrderedDict = OrderedDict()

    def fetch(self, url: str, offset: int, length: int) -> dict:
        if length > self.limits.sample:  # the index took the size from tar headers: not read yet
            return {"__error__": ("member_too_large", f"{url}@{offset}: sample of {length} bytes, over the "
                                                      f"sample bound of {self.limits.sample}")}
        handle = self.handles.pop(url, None)
        if handle is None:
            fs, path = filesystem(url)
            try:
                handle = fs.open(path, "rb")
            except OSError as exc:  # a pool shard gone since planning fails the task, loudly
                raise ShardReadError(f"cannot open pool shard {url}: {exc}") from exc
            if len(self.handles) >= self.open_limit:
                self.handles.popitem(last=False)[1].close()
        self.handles[url] = handle
        handle.seek(offset)
        return sample_from_range(handle.read(length), length, f"{url}@{offset}+{length}")

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()
