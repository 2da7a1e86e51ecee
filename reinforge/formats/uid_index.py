"""Where a DataComp pool's samples are, by uid, and reading one back from its byte range (the
resharder's and join's first pass and their task reads).

One small Parquet per pool shard version, columns
  uid_hi, uid_lo  uint64   the sample's uid (from its json member); 0 where status != 0
  offset, length  int64    byte range of the sample's tar members (headers included) in the shard
  position        int32    sample index within the shard
  status          int8     0 ok, 1 no json member, 2 json without the uid field, 3 malformed uid, 4 bad json
  key             string   the sample's key in the pool shard
plus file metadata {"url", "size", "version", "uid_field", "format"} of the shard it describes.

Cache. The files are named by a digest of (format, url, size, version, uid_field), the version being
what fingerprint.file_versions reads (mtime_ns locally; ETag / generation / modification time on object
stores), and kept in a cache shared by every run: $REINFORGE_INDEX_CACHE, default
$XDG_CACHE_HOME/reinforge/uid-index (~/.cache/reinforge/uid-index); with REINFORGE_INDEX_CACHE=off, in
the run's own folder (RUN/index/). A shard rewritten in place gets a new name, so it is indexed again;
old entries are never read again (delete the folder to reclaim space). Entries are written atomically
(storage.write_bytes) with deterministic bytes, so concurrent runs indexing the same shard are safe.

Speed. Indexing reads tar headers and the json members only, seeking over image bytes: one tight
Python loop walks the headers, then checksums, member names and the grouping into samples are
computed for the whole shard with numpy, and the json members are parsed together by pyarrow (each
falls back to tarscan/tarfile and json.loads wherever those would decide differently).
PoolReader fetches a sample back from its range.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from reinforge.io.fingerprint import MISSING, file_versions
from reinforge.io.manifest import Task
from reinforge.io.storage import filesystem, write_bytes
from reinforge.formats import tarscan
from reinforge.formats.limits import Limits
from reinforge.formats.subset import UID_OK, parse_hex_uids
from reinforge.formats.wds import ShardReadError, iter_samples, split_member_name, unsafe_name

INDEX_STATUS = {1: "no_json", 2: "no_uid_field", 3: "malformed_uid", 4: "bad_json"}
_META_KEY = b"reinforge.uid_index"


SPARSE_HEADERS = 32 << 10  # mean bytes per member above which a shard is read by pread, not mapped


def _open_buffer(fs, path: str, f):
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


def _scan_plain(buf) -> tuple[list, list, list, list]:
    """Samples of a plain ustar shard from its headers: (key bytes, first header offset, end, json
    member (data offset, size) or None) per sample. Headers are walked in one tight loop; checksums,
    types, names and the grouping into samples are then computed for all of them at once with numpy,
    exactly as tarscan.parse_header and split_member_name would one by one. Raises tarscan.Unsupported
    for a header but a regular file or a directory, or a ustar name prefix (the caller falls back to
    tarfile), tarscan.Corrupt for a damaged header."""
    headers, sizes = _walk_headers(buf)
    if not headers:
        return [], [], [], []
    h = np.frombuffer(b"".join(headers), np.uint8).reshape(-1, tarscan.BLOCK)
    _verify_checksums(h, headers)
    flag = h[:, 156]
    odd = ~np.isin(flag, (48, 0, 53))  # "0", NUL (regular file), "5" (directory)
    if odd.any():
        raise tarscan.Unsupported(f"tar header type {bytes([flag[np.argmax(odd)]])!r}")
    if ((h[:, 345] != 0) & (h[:, 257:262] == np.frombuffer(b"ustar", np.uint8)).all(axis=1)).any():
        raise tarscan.Unsupported("ustar name prefix")
    sizes = np.asarray(sizes, np.int64)
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


def _verify_checksums(h: np.ndarray, headers: list[bytes]) -> None:
    """tarscan.parse_header's check for every header at once: the unsigned sum of the block with the
    checksum field read as spaces equals the field. The field is compared in tarfile's form
    ("%06o\\0 "); any other form is parsed one by one."""
    lanes = h.view("<u8")  # bytes summed in four 16-bit lanes per word (64 words x 510 < 2**16: no carry)
    mask = np.uint64(0x00FF00FF00FF00FF)
    lanes = ((lanes & mask) + ((lanes >> np.uint64(8)) & mask)).sum(axis=1, dtype=np.uint64)
    sums = sum(((lanes >> np.uint64(s)) & np.uint64(0xFFFF)).astype(np.int64) for s in (0, 16, 32, 48))
    sums = sums - h[:, 148:156].sum(axis=1, dtype=np.int64) + 256
    digits = ((sums[:, None] >> np.arange(15, -1, -3)) & 7) + 48
    canonical = (h[:, 148:154] == digits).all(axis=1) & (h[:, 154] == 0) & (h[:, 155] == 32)
    for i in np.flatnonzero(~canonical):
        if _number(headers[i][148:156]) != sums[i]:
            raise tarscan.Corrupt("header checksum mismatch")


def _uid_texts(members: list, uid_field: str) -> tuple[list, np.ndarray]:
    """(uid text or None, status) per sample from its json member's bytes (None: no json member).

    The members are parsed together by pyarrow's JSON reader (one line each) where that gives exactly
    what json.loads would: any line pyarrow refuses, and every sample it cannot vouch for (no member,
    a member with line breaks or blank, invalid UTF-8, a missing or null uid), is parsed on its own."""
    status = np.ones(len(members), np.int8)  # 1: no json member
    texts: list = [None] * len(members)
    batch = [i for i, m in enumerate(members) if m is not None and m.strip() and b"\n" not in m and b"\r" not in m]
    alone = set(i for i, m in enumerate(members) if m is not None) - set(batch)
    if batch:
        joined = b"\n".join(members[i] for i in batch)
        column = None
        try:
            joined.decode("utf-8")  # pyarrow lets invalid UTF-8 through in fields it skips; json.loads does not
            options = pa_json.ParseOptions(explicit_schema=pa.schema([(uid_field, pa.string())]),
                                           unexpected_field_behavior="ignore")
            table = pa_json.read_json(io.BytesIO(joined), parse_options=options)
            if table.num_rows == len(batch):  # no member was split into two rows
                column = table.column(0).to_pylist()
        except (UnicodeDecodeError, pa.ArrowInvalid):
            pass
        if column is None:
            alone.update(batch)
        else:
            for i, text in zip(batch, column):
                if text is None:  # missing and null differ in status: json.loads tells them apart
                    alone.add(i)
                else:
                    texts[i], status[i] = text, 0
    for i in alone:
        texts[i], status[i] = _uid_from_json(members[i], uid_field)
    return texts, status


def _table(keys: list[str], starts: list[int], ends: list[int], uid_text: list, status: np.ndarray) -> pa.Table:
    hi, lo, ustatus = parse_hex_uids(pa.array(uid_text, pa.string()))
    st = np.asarray(status, np.int8)
    st[(st == 0) & (ustatus != UID_OK)] = 3
    hi[st != 0] = lo[st != 0] = 0
    offsets = np.asarray(starts, np.int64)
    return pa.table({"uid_hi": hi, "uid_lo": lo, "offset": offsets, "length": np.asarray(ends, np.int64) - offsets,
                     "position": np.arange(len(keys), dtype=np.int32), "status": st,
                     "key": pa.array(keys, pa.string())})


def _scan_tarfile(fs, path: str) -> tuple[list, list, list, list]:
    """_scan_plain's lists through tarfile, for the headers it refuses (pax, GNU long names, links)."""
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


def index_shard(url: str, uid_field: str = "uid") -> pa.Table:
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            buf, close = _open_buffer(fs, path, f)
            try:
                keys, starts, ends, where = _scan_plain(buf)
                members = [None if w is None else buf[w[0]:w[0] + w[1]] for w in where]
            finally:
                close()
        keys = [k.decode("utf-8", "surrogateescape") for k in keys]
        return _table(keys, starts, ends, *_uid_texts(members, uid_field))
    except tarscan.Unsupported:
        pass
    except tarscan.Corrupt as exc:
        raise ShardReadError(f"cannot index pool shard {url}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise ShardReadError(f"cannot index pool shard {url}: {type(exc).__name__}: {exc}") from exc
    try:
        keys, starts, ends, members = _scan_tarfile(fs, path)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardReadError(f"cannot index pool shard {url}: {type(exc).__name__}: {exc}") from exc
    return _table(keys, starts, ends, *_uid_texts(members, uid_field))


def _uid_from_json(data: bytes, uid_field: str) -> tuple:
    try:
        meta = json.loads(data)
    except ValueError:
        return None, 4
    if not isinstance(meta, dict) or uid_field not in meta:
        return None, 2
    value = meta[uid_field]
    return (value if isinstance(value, str) else None), 0


INDEX_CACHE_ENV = "REINFORGE_INDEX_CACHE"
INDEX_FORMAT = 1  # bump when index_shard's output changes: old cache entries are then never read


def index_cache_dir() -> str | None:
    """Where shard indexes are kept across runs: $REINFORGE_INDEX_CACHE (a local folder or any fsspec
    URL; "off" or "" = no shared cache), else $XDG_CACHE_HOME/reinforge/uid-index (~/.cache/...)."""
    configured = os.environ.get(INDEX_CACHE_ENV)
    if configured is not None:
        return None if configured.strip().lower() in ("", "off", "none", "0") else configured.rstrip("/")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "reinforge", "uid-index")


def index_key(url: str, size: int, version: str, uid_field: str) -> str:
    """The cache entry's name: a digest of everything the index depends on. A shard rewritten in place
    has another size or version (mtime_ns locally, ETag / generation on object stores: see
    fingerprint.file_versions), so it gets another entry and is indexed again."""
    identity = json.dumps([INDEX_FORMAT, url, size, version, uid_field], separators=(",", ":"))
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def load_or_build(url: str, size: int, version: str, index_dir: str, uid_field: str) -> pa.Table:
    """The index of one pool shard, from `index_dir` when an entry for this very shard version is there,
    else built and stored (atomically: concurrent runs write the same bytes under the same name)."""
    if (size, version) == MISSING:
        raise ShardReadError(f"pool shard {url} not found")
    key = index_key(url, size, version, uid_field)
    target = f"{index_dir.rstrip('/')}/{key}.parquet"
    identity = {"url": url, "size": size, "version": version, "uid_field": uid_field, "format": INDEX_FORMAT}
    try:
        fs, path = filesystem(target)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        if json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}")) == identity:
            return table
    except (OSError, ValueError, pa.ArrowException):  # absent, or unreadable: index again
        pass
    table = index_shard(url, uid_field)
    if file_versions([url])[url] != (size, version):  # rewritten while we read it: do not keep this one
        return table
    table = table.replace_schema_metadata({_META_KEY: json.dumps(identity, sort_keys=True).encode()})
    buf = pa.BufferOutputStream()  # pyarrow wants a real stream; index files are small
    pq.write_table(table, buf)
    write_bytes(target, buf.getvalue().to_pybytes())
    return table


def build_index(tasks: list[Task], run_index_dir: str, uid_field: str, threads: int = 8):
    """Index tables in shard order (task.inputs[0] per shard). Entries live in index_cache_dir(), shared
    by every run on this machine, or in `run_index_dir` when the shared cache is off. Shards are
    versioned in one batch (a stat each, or one listing per folder), then read on a few threads."""
    index_dir = index_cache_dir() or run_index_dir
    urls = [t.inputs[0] for t in tasks]
    versions = file_versions(urls)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(tasks)))) as pool:
        yield from pool.map(lambda u: load_or_build(u, *versions[u], index_dir, uid_field), urls)


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
