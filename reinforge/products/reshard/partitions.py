"""The reshard plan as three passes over partitions, each a task (Ray, worker processes or inline), so the
driver holds per-partition counts and never a per-sample array (issue #16).

The subset file is sorted by uid, so consecutive row ranges of it are uid ranges: the *uid buckets*.
1. pool_to_buckets (per group of pool shards): index each shard (or read its cached index), route each
   sample's (uid, shard, byte range) to the uid bucket it falls in; one file per group, rows grouped by
   bucket, with the bucket counts returned.
2. match_bucket (per uid bucket): the bucket's subset rows against its pool rows from every group (in pool
   shard order, so the first occurrence wins as in a serial pass), then each found uid's copies with
   their sort keys (assignment.copy_keys), routed to *key ranges* (floor(key * ranges): monotone in the
   key, so key ranges are consecutive runs of the output order); one file per bucket, rows grouped by
   key range.
3. write_range (per key range): its copies from every bucket, put in output order (key, then subset row
   and copy, as one stable sort of the whole subset would); every output shard that starts in the range
   is cut, ordered inside (assignment.order_inside) and written as plan/tasks/{:08d}.parquet. A shard
   that runs past the range takes the first copies of the next ranges.
Work files live in plan/work/ (the run's storage, so tasks on any node see them) and are removed once
the plan is committed.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reinforge.formats.subset import UidLookup, is_sorted_unique, locate, make_subset, stable_argsort, uid_hex
from reinforge.formats.uid_index import INDEX_STATUS, load_or_build
from reinforge.io.storage import exists, filesystem, read_bytes, write_bytes
from reinforge.products.reshard.assignment import copy_keys, order_inside

SAMPLE = 10  # examples kept of each kind of problem
POOL_ROW = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("offset", "<i8"), ("length", "<i8"), ("shard", "<i4")])
COPY_ROW = np.dtype([("key", "<f8"), ("row", "<i8"), ("copy", "<i4"), ("shard", "<i4"), ("offset", "<i8"),
                     ("length", "<i8"), ("hi", "<u8"), ("lo", "<u8")])


class SubsetNotSorted(ValueError):
    """A bucket of the subset file is not sorted ascending and unique (not DataComp's format)."""


# ---------------------------------------------------------------- the subset file, read by row range

def npy_layout(url: str) -> tuple[int, np.dtype, int]:
    """(rows, dtype, header bytes) of a .npy file, from its header alone."""
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        header = f.tell()
    if fortran and len(shape) > 1:
        raise ValueError(f"{url}: a Fortran-ordered array")
    return int(np.prod(shape, dtype=np.int64)), dtype, header


def read_rows(url: str, dtype: np.dtype, header: int, start: int, stop: int) -> np.ndarray:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        f.seek(header + start * dtype.itemsize)
        data = f.read((stop - start) * dtype.itemsize)
    return np.frombuffer(data, dtype)


def subset_rows(subset: dict, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows start..stop-1 of the subset file as u8,u8 uids, and their counts (int64; ones without a file)."""
    raw = read_rows(subset["url"], np.dtype(subset["dtype"]), subset["header"], start, stop)
    names = raw.dtype.names
    uids = make_subset(raw[names[0]].astype("<u8"), raw[names[1]].astype("<u8"))
    if subset["counts_url"] is None:
        return uids, np.ones(len(uids), np.int64)
    counts = read_rows(subset["counts_url"], np.dtype(subset["counts_dtype"]), subset["counts_header"], start, stop)
    return uids, counts.astype(np.int64)


# ---------------------------------------------------------------- record files, read by row range

def write_records(url: str, rows: np.ndarray) -> None:
    write_bytes(url, np.ascontiguousarray(rows).tobytes())


def read_records(url: str, dtype: np.dtype, start: int, stop: int) -> np.ndarray:
    if stop <= start:
        return np.zeros(0, dtype)
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        f.seek(start * dtype.itemsize)
        return np.frombuffer(f.read((stop - start) * dtype.itemsize), dtype)


def group_by(rows: np.ndarray, part: np.ndarray, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """rows reordered so each part's rows are together (stable), and each part's row count."""
    counts = np.bincount(part, minlength=parts)
    return rows[np.argsort(part, kind="stable")], counts


def bucket_of(hi: np.ndarray, lo: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The uid bucket of each uid: how many bucket starts (sorted u8,u8 `bounds`) are <= it."""
    b = np.searchsorted(bounds["f0"], hi, side="right")
    todo = np.flatnonzero(b > 0)
    while len(todo):  # a start with the same high half counts only if its low half is <= lo
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
        table = load_or_build(url, size, version, index_dir, uid_field)
        samples += table.num_rows
        status = table.column("status").to_numpy()
        for code, name in INDEX_STATUS.items():
            rows = np.flatnonzero(status == code)
            if len(rows):
                bad[name] = bad.get(name, 0) + len(rows)
                keys = table.column("key")
                bad_sample.extend({"shard": url, "key": keys[int(i)].as_py(), "problem": name}
                                  for i in rows[:max(0, SAMPLE - len(bad_sample))])
        ok = status == 0
        part = np.empty(int(ok.sum()), POOL_ROW)
        for name in ("uid_hi", "uid_lo", "offset", "length"):
            part[{"uid_hi": "hi", "uid_lo": "lo"}.get(name, name)] = table.column(name).to_numpy()[ok]
        part["shard"] = number
        parts.append(part)
    rows = np.concatenate(parts) if parts else np.zeros(0, POOL_ROW)
    rows, counts = group_by(rows, bucket_of(rows["hi"], rows["lo"], bounds), len(bounds) + 1)
    write_records(out_url, rows)
    return {"samples": samples, "bad": bad, "bad_sample": bad_sample, "counts": counts}


# ---------------------------------------------------------------- 2. a uid bucket: match, copies, key ranges

def match_bucket(start: int, stop: int, pool_parts: list[tuple[str, int, int]], out_url: str, missing_url: str,
                 subset: dict, seed: int, ranges: int) -> dict:
    """Subset rows start..stop-1 against their pool rows (`pool_parts`: group file, first row, end row, in
    pool shard order). Writes the found uids' copies grouped by key range, and the missing uids."""
    lo_row = max(0, start - 1)  # the row before: the bucket must sort after it
    uids, counts = subset_rows(subset, lo_row, stop)
    if not is_sorted_unique(uids):
        raise SubsetNotSorted(f"rows {lo_row}..{stop - 1}")
    uids, counts = uids[start - lo_row:], counts[start - lo_row:]
    if len(counts) and (counts.min() < 1 or counts.max() > np.iinfo(np.uint32).max):
        raise ValueError(f"{subset['counts_url']}: counts must be >= 1 and fit uint32 (rows {start}..{stop - 1})")
    pool = np.concatenate([read_records(url, POOL_ROW, a, b) for url, a, b in pool_parts] or [np.zeros(0, POOL_ROW)])
    pos = locate(pool["hi"], pool["lo"], UidLookup(uids))
    hit = np.flatnonzero(pos >= 0)
    by_uid = hit[np.argsort(pos[hit], kind="stable")]  # hits grouped by subset row, in pool order inside
    first = np.r_[True, pos[by_uid][1:] != pos[by_uid][:-1]] if len(by_uid) else np.zeros(0, bool)
    chosen, repeats = by_uid[first], np.sort(by_uid[~first])
    found = np.zeros(len(uids), bool)
    found[pos[chosen]] = True
    where = np.empty(len(uids), POOL_ROW)
    where[pos[chosen]] = pool[chosen]
    missing = np.flatnonzero(~found)
    write_bytes(missing_url, np.ascontiguousarray(uids[missing]).tobytes())
    rows = np.flatnonzero(found)
    copies = copy_keys(uids["f0"][rows], uids["f1"][rows], counts[rows], seed)
    out = np.empty(len(copies.key), COPY_ROW)
    out["key"], out["copy"] = copies.key, copies.copy
    at = rows[copies.index]
    out["row"] = start + at
    for name in ("shard", "offset", "length", "hi", "lo"):
        out[name] = where[name][at]
    part = np.minimum((copies.key * ranges).astype(np.int64), ranges - 1)
    out, per_range = group_by(out, part, ranges)
    write_records(out_url, out)
    dup = pool[repeats[:SAMPLE]]
    return {"uids": len(uids), "samples": int(counts.sum()), "per_range": per_range,
            "missing": len(missing), "missing_samples": int(counts[missing].sum()),
            "missing_sample": [uid_hex(*u) for u in uids[missing[:SAMPLE]].tolist()],
            "duplicates": len(repeats),
            "duplicate_sample": [(int(r["shard"]), int(r["offset"]), uid_hex(r["hi"], r["lo"])) for r in dup]}


# ---------------------------------------------------------------- 3. a key range: output order, task files

def range_rows(parts: list[tuple[str, int, int]], take: int | None = None) -> np.ndarray:
    """A key range's copies from every bucket (`parts`: file, first row, end row, in bucket order) in
    output order: by key, ties in subset row then copy order (bucket order is subset row order). With
    `take`, only the first `take` of them."""
    rows = np.concatenate([read_records(url, COPY_ROW, a, b) for url, a, b in parts] or [np.zeros(0, COPY_ROW)])
    keys = rows["key"].view(np.uint64)
    if take is not None and take < len(rows):  # the first `take` in order: all keys below the take-th, sorted
        cut = np.partition(keys, take - 1)[take - 1]
        rows, keys = rows[keys <= cut], keys[keys <= cut]
    rows = rows[stable_argsort(np.ascontiguousarray(keys))]
    return rows if take is None else rows[:take]


def task_table(rows: np.ndarray, urls: pa.Array, extras) -> pa.Table:
    """One output shard's assignment file: shard (URL), offset, length, uid_hi, uid_lo, copy (+ extras)."""
    columns = {"shard": urls.take(rows["shard"]), "offset": rows["offset"], "length": rows["length"],
               "uid_hi": rows["hi"], "uid_lo": rows["lo"], "copy": rows["copy"]}
    if extras is not None:
        columns.update(extras(rows["row"]))
    return pa.table(columns)


def write_range(first_shard: int, last_shard: int, start: int, parts: list[list[tuple[str, int, int]]],
                samples_per_shard: int, total: int, urls: list[str], task_urls: list[str], write: bool,
                extras=None) -> dict[int, tuple[str, bool]]:
    """Output shards first_shard..last_shard-1 (they start in the key range whose copies are parts[0],
    at output position `start`; parts[1:] are the following ranges, read only as far as a shard runs
    past its range). Per shard: sha256 of its file, and whether the file already there has those bytes;
    `write`: write the ones that differ."""
    url_array = pa.array(urls, pa.string())
    rows = range_rows(parts[0])
    need = min(last_shard * samples_per_shard, total) - start  # up to the end of the last shard
    for more in parts[1:]:  # its tail, from the next ranges
        if len(rows) >= need:
            break
        rows = np.concatenate([rows, range_rows(more, need - len(rows))])
    out = {}
    for j in range(first_shard, last_shard):
        a = j * samples_per_shard - start
        block = order_inside(rows[a:min(a + samples_per_shard, total - start)].copy())
        buf = pa.BufferOutputStream()
        pq.write_table(task_table(block, url_array, extras), buf)
        data = buf.getvalue().to_pybytes()
        digest = hashlib.sha256(data).hexdigest()
        same = exists(task_urls[j]) and hashlib.sha256(read_bytes(task_urls[j])).hexdigest() == digest
        if write and not same:
            write_bytes(task_urls[j], data)
        out[j] = (digest, same)
    return out


def read_missing(urls: list[str]) -> np.ndarray:
    """The missing uids of every bucket, in uid order."""
    return np.concatenate([np.frombuffer(read_bytes(u), make_subset(np.zeros(0), np.zeros(0)).dtype) for u in urls]
                          or [make_subset(np.zeros(0, np.uint64), np.zeros(0, np.uint64))])

