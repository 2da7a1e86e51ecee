"""The reshard plan as three passes over partitions, each a task (Ray, worker processes or inline), so the
driver holds per-partition counts and never a per-sample array (issue #16).

The subset file is sorted by uid (subset_file.py checks it), so consecutive row ranges of it are uid
ranges: the *uid buckets*.
1. pool_to_buckets (per group of pool shards): index each shard (or read its cached index), route each
   sample's (uid, shard, byte range) to the uid bucket it falls in; one file per group, rows grouped by
   bucket, with the bucket counts returned.
2. match_bucket (per uid bucket): the bucket's subset rows against its pool rows from every group (in pool
   shard order, so the first occurrence wins as in a serial pass), then each found uid's copies with
   their sort keys (assignment.copy_keys), routed to *key ranges* (floor(key * ranges): monotone in the
   key, so key ranges are consecutive runs of the output order); one file per bucket, rows grouped by
   key range.
3. write_range (per key range): its copies from every bucket, put in output order (key, then subset row
   and copy, as one stable sort of the whole subset would); every output shard inside the range is
   ordered inside (assignment.order_inside) and written as plan/tasks/{:08d}.parquet; the pieces of the
   shards that cross its edges are kept for write_crossing, which joins them.
Work files live in plan/work/ (the run's storage, so tasks on any node see them) and are removed once
the plan is committed.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reinforge.formats.subset import UidLookup, locate, make_subset, stable_argsort, uid_hex
from reinforge.formats.uid_index import INDEX_STATUS, load_or_build
from reinforge.io.storage import exists, filesystem, read_bytes, write_bytes
from reinforge.products.reshard.assignment import copy_keys, order_inside
from reinforge.products.reshard.pool import SAMPLE
from reinforge.products.reshard.subset_file import SubsetFile

# ---------------------------------------------------------------- part files: columns, read by row range
# A part file holds rows of fixed columns (POOL_COLUMNS, COPY_COLUMNS) grouped by part: part after part, each
# part its columns one after the other. Rows start..stop of a file are bytes start*width .. stop*width.

POOL_COLUMNS = {"hi": np.uint64, "lo": np.uint64, "offset": np.int64, "length": np.int64, "shard": np.int32}
COPY_COLUMNS = {"key": np.float64, "row": np.int64, "copy": np.int32, "shard": np.int32, "offset": np.int64,
                "length": np.int64, "hi": np.uint64, "lo": np.uint64}


def write_parts(url: str, columns: dict[str, np.ndarray], part: np.ndarray, parts: int) -> np.ndarray:
    """Write the rows grouped by part (stable), and return each part's row count."""
    counts = np.bincount(part, minlength=parts)
    order = np.argsort(part.astype(np.uint16) if parts <= 1 << 16 else part, kind="stable")  # uint16: a radix sort
    grouped = {name: values[order] for name, values in columns.items()}
    ends = np.cumsum(counts)
    pieces = [memoryview(grouped[name][end - n:end]).cast("B") for n, end in zip(counts.tolist(), ends.tolist())
              for name in columns]
    write_bytes(url, b"".join(pieces))
    return counts


def read_parts(parts: list[tuple[str, int, int]], dtypes: dict[str, type]) -> dict[str, np.ndarray]:
    """Rows start..stop-1 of each (file, start, stop), concatenated in the order given."""
    width = sum(np.dtype(t).itemsize for t in dtypes.values())
    out = {name: [] for name in dtypes}
    for url, start, stop in parts:
        if stop <= start:
            continue
        fs, path = filesystem(url)
        with fs.open(path, "rb") as f:
            f.seek(start * width)
            data = f.read((stop - start) * width)
        at = 0
        for name, t in dtypes.items():
            out[name].append(np.frombuffer(data, t, stop - start, at))
            at += (stop - start) * np.dtype(t).itemsize
    return {name: np.concatenate(v) if v else np.zeros(0, dtypes[name]) for name, v in out.items()}


def bucket_of(hi: np.ndarray, lo: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The uid bucket of each uid: how many bucket starts (sorted u8,u8 `bounds`) are <= it."""
    b = np.searchsorted(bounds["f0"], hi, side="right")
    # a start with the same high half counts only if its low half is <= lo: only uids whose high half
    # is some start's need that look (rare: uids are hashes)
    todo = np.flatnonzero(np.searchsorted(bounds["f0"], hi, side="left") != b)
    while len(todo):
        above = (bounds["f0"][b[todo] - 1] == hi[todo]) & (bounds["f1"][b[todo] - 1] > lo[todo])
        todo = todo[above]
        b[todo] -= 1
        todo = todo[b[todo] > 0]
    return b


# ---------------------------------------------------------------- 1. pool shards -> uid buckets

def pool_to_buckets(shards: list[tuple[int, str, int, str]], out_url: str, index_dir: str, uid_field: str,
                    bounds: np.ndarray) -> dict:
    """`shards`: (pool shard number, URL, size, version). Index them (the cache serves indexed ones) and
    route their readable samples to uid buckets; problems counted, the first SAMPLE kept as examples."""
    parts, bad, bad_sample, samples = [], {}, [], 0
    for number, url, size, version in shards:
        table = load_or_build(url, size, version, index_dir, uid_field, ["uid_hi", "uid_lo", "offset", "length",
                                                                         "status"])
        samples += table.num_rows
        status = table.column("status").to_numpy()
        for code, name in INDEX_STATUS.items():
            rows = np.flatnonzero(status == code)
            if len(rows):
                bad[name] = bad.get(name, 0) + len(rows)
            if len(rows) and len(bad_sample) < SAMPLE:  # examples: the keys column, read only for them
                keys = load_or_build(url, size, version, index_dir, uid_field, ["key"]).column("key")
                bad_sample.extend({"shard": url, "key": keys[int(i)].as_py(), "problem": name}
                                  for i in rows[:SAMPLE - len(bad_sample)])
        ok = status == 0
        part = {name: table.column(column).to_numpy()[ok] for name, column in
                (("hi", "uid_hi"), ("lo", "uid_lo"), ("offset", "offset"), ("length", "length"))}
        part["shard"] = np.full(int(ok.sum()), number, np.int32)
        parts.append(part)
    rows = {name: np.concatenate([p[name] for p in parts] or [np.zeros(0, t)]) for name, t in POOL_COLUMNS.items()}
    counts = write_parts(out_url, rows, bucket_of(rows["hi"], rows["lo"], bounds), len(bounds) + 1)
    return {"samples": samples, "bad": bad, "bad_sample": bad_sample, "counts": counts}


# ---------------------------------------------------------------- 2. a uid bucket: match, copies, key ranges

def first_in_pool(pool: dict[str, np.ndarray], uids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per uid of the sorted unique `uids`: the pool row holding it (-1: none), the first in pool order
    where the pool holds it twice; and those repeated pool rows, in pool order."""
    pos = locate(pool["hi"], pool["lo"], UidLookup(uids))
    hit = np.flatnonzero(pos >= 0)
    twice = np.bincount(pos[hit], minlength=len(uids))[pos[hit]] > 1  # hits of uids the pool holds twice
    by_uid = hit[twice][np.argsort(pos[hit[twice]], kind="stable")]  # grouped by uid, pool order inside
    first = np.r_[True, pos[by_uid][1:] != pos[by_uid][:-1]] if len(by_uid) else np.zeros(0, bool)
    chosen = np.concatenate([hit[~twice], by_uid[first]])
    source = np.full(len(uids), -1, np.int64)
    source[pos[chosen]] = chosen
    return source, np.sort(by_uid[~first])


def duplicate_examples(pool: dict[str, np.ndarray], repeats: np.ndarray) -> list[tuple[int, int, str]]:
    """(pool shard, offset, uid) of the first SAMPLE repeated pool rows: merged across buckets by place."""
    return [(int(pool["shard"][i]), int(pool["offset"][i]), uid_hex(pool["hi"][i], pool["lo"][i]))
            for i in repeats[:SAMPLE]]


def match_bucket(start: int, stop: int, pool_parts: list[tuple[str, int, int]], out_url: str, missing_url: str,
                 subset: SubsetFile, seed: int, ranges: int) -> dict:
    """Subset rows start..stop-1 against their pool rows (`pool_parts`: group file, first row, end row, in
    pool shard order). Writes the found uids' copies grouped by key range, and the missing uids."""
    uids, counts = subset.read(start, stop)  # checked when the subset was opened (subset_file.py)
    pool = read_parts(pool_parts, POOL_COLUMNS)
    source, repeats = first_in_pool(pool, uids)
    missing = np.flatnonzero(source < 0)
    write_bytes(missing_url, np.ascontiguousarray(uids[missing]).tobytes())
    rows = np.flatnonzero(source >= 0)
    copies = copy_keys(uids["f0"][rows], uids["f1"][rows], counts[rows], seed)
    at = source[rows][copies.index]
    out = {"key": copies.key, "row": start + rows[copies.index], "copy": copies.copy,
           **{name: pool[name][at] for name in ("shard", "offset", "length", "hi", "lo")}}
    part = np.minimum((copies.key * ranges).astype(np.int64), ranges - 1)
    per_range = write_parts(out_url, out, part, ranges)
    return {"uids": len(uids), "samples": int(counts.sum()), "per_range": per_range,
            "missing": len(missing), "missing_samples": int(counts[missing].sum()),
            "missing_sample": [uid_hex(*u) for u in uids[missing[:SAMPLE]].tolist()],
            "duplicates": len(repeats), "duplicate_sample": duplicate_examples(pool, repeats)}


# ---------------------------------------------------------------- 3. a key range: output order, task files

def task_file(rows: dict[str, np.ndarray], urls: pa.Array, extras) -> bytes:
    """One output shard's assignment file, its copies put in the order they are written
    (assignment.order_inside): shard (URL), offset, length, uid_hi, uid_lo, copy (+ extras)."""
    rows = order_inside(rows)
    columns = {"shard": urls.take(rows["shard"]), "offset": rows["offset"], "length": rows["length"],
               "uid_hi": rows["hi"], "uid_lo": rows["lo"], "copy": rows["copy"]}
    if extras is not None:
        columns.update(extras(rows["row"]))
    return plan_table_bytes(pa.table(columns))


def plan_table_bytes(table: pa.Table) -> bytes:
    """A plan file's Parquet bytes. Only the pool shard URL column is dictionary-encoded: uids and byte
    offsets are (nearly) all distinct, and trying a dictionary on them took 3/4 of the writing time."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, use_dictionary=["shard"])
    return buf.getvalue().to_pybytes()


def commit_file(url: str, data: bytes, write: bool) -> tuple[str, bool]:
    """(sha256, whether the file there has these bytes); written when `write` (no comparison then)."""
    digest = hashlib.sha256(data).hexdigest()
    if write:
        write_bytes(url, data)
        return digest, False
    return digest, exists(url) and hashlib.sha256(read_bytes(url)).hexdigest() == digest


def write_range(k: int, parts: list[tuple[str, int, int]], start: int, stop: int, fragment_url: str,
                samples_per_shard: int, total: int, urls: list[str], task_urls: list[str], write: bool,
                extras=None) -> dict:
    """Key range k: its copies (`parts`: bucket file, first row, end row, in bucket order) are output
    positions start..stop-1. Sorted into output order (by key; ties in subset row then copy order, as
    bucket order is subset row order), then cut at shard boundaries: a shard wholly inside is made here
    (commit_file); the pieces of shards that cross the range's edges go to `fragment_url`, for
    write_crossing. Returns {shard: (sha256, same)} and the pieces: (shard, file, first row, end row)."""
    rows = read_parts(parts, COPY_COLUMNS)
    order = stable_argsort(np.ascontiguousarray(rows["key"]).view(np.uint64))
    rows = {name: values[order] for name, values in rows.items()}
    url_array, S = pa.array(urls, pa.string()), samples_per_shard
    files, pieces = {}, []
    for j in range(start // S, -(-stop // S)):
        first, end = j * S, min((j + 1) * S, total)  # the shard's output positions
        a, b = max(first, start) - start, min(end, stop) - start  # its rows here
        if first >= start and end <= stop:
            files[j] = commit_file(task_urls[j], task_file({n: v[a:b] for n, v in rows.items()}, url_array, extras),
                                   write)
        elif b > a:
            pieces.append((j, a, b))
    if not pieces:
        return {"files": files, "pieces": []}
    lengths = [b - a for _, a, b in pieces]
    counts = write_parts(fragment_url, {n: np.concatenate([v[a:b] for _, a, b in pieces]) for n, v in rows.items()},
                         np.repeat(np.arange(len(pieces)), lengths), len(pieces))
    ends = np.cumsum(counts).tolist()
    return {"files": files, "pieces": [(j, fragment_url, e - n, e) for (j, _, _), n, e in zip(pieces, lengths, ends)]}


def write_crossing(j: int, fragments: list[tuple[str, int, int]], task_url: str, urls: list[str], write: bool,
                   extras=None) -> dict:
    """Shard j, which crosses key ranges: its pieces (in range order, hence output order) joined."""
    rows = read_parts(fragments, COPY_COLUMNS)
    return {"files": {j: commit_file(task_url, task_file(rows, pa.array(urls, pa.string()), extras), write)},
            "pieces": []}


def read_missing(urls: list[str]) -> np.ndarray:
    """The missing uids of every bucket, in uid order."""
    empty = make_subset(np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    return np.concatenate([np.frombuffer(read_bytes(u), empty.dtype) for u in urls] or [empty])
