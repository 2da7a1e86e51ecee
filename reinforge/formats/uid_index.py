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

Speed. Indexing reads tar headers and the json members only, seeking over image bytes (shard_spans.py);
the json members are parsed together by pyarrow (falling back to json.loads wherever that would decide
differently). pool_reader.PoolReader fetches a sample back from its range.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from reinforge.formats import tarscan
from reinforge.formats.shard_spans import open_buffer, scan_plain, scan_tarfile
from reinforge.formats.subset import UID_OK, parse_hex_uids
from reinforge.formats.wds import ShardReadError
from reinforge.io.fingerprint import MISSING, file_versions
from reinforge.io.storage import filesystem, write_bytes

INDEX_STATUS = {1: "no_json", 2: "no_uid_field", 3: "malformed_uid", 4: "bad_json"}
_META_KEY = b"reinforge.uid_index"


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


def index_shard(url: str, uid_field: str = "uid") -> pa.Table:
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            buf, close = open_buffer(fs, path, f)
            try:
                keys, starts, ends, where = scan_plain(buf)
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
        keys, starts, ends, members = scan_tarfile(fs, path)
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


def load_or_build(url: str, size: int, version: str, index_dir: str, uid_field: str,
                  columns: list[str] | None = None) -> pa.Table:
    """The index of one pool shard, from `index_dir` when an entry for this very shard version is there,
    else built and stored (atomically: concurrent runs write the same bytes under the same name).
    `columns`: only these (a cached entry is then read only in part)."""
    if (size, version) == MISSING:
        raise ShardReadError(f"pool shard {url} not found")
    key = index_key(url, size, version, uid_field)
    target = f"{index_dir.rstrip('/')}/{key}.parquet"
    identity = {"url": url, "size": size, "version": version, "uid_field": uid_field, "format": INDEX_FORMAT}
    try:
        fs, path = filesystem(target)
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read(columns)  # not read_table: its dataset layer imports pandas (~0.4 s)
        if json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}")) == identity:
            return table
    except (OSError, ValueError, pa.ArrowException):  # absent, or unreadable: index again
        pass
    table = index_shard(url, uid_field)
    if file_versions([url])[url] == (size, version):  # not rewritten while we read it: keep it
        table = table.replace_schema_metadata({_META_KEY: json.dumps(identity, sort_keys=True).encode()})
        buf = pa.BufferOutputStream()  # pyarrow wants a real stream; index files are small
        pq.write_table(table, buf)
        write_bytes(target, buf.getvalue().to_pybytes())
    return table if columns is None else table.select(columns)
