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
Face boxes and class ids (extras.py) ride along: the blur metadata is routed to the uid buckets by a pass of
its own, and from pass 2 on each copy carries its uid's box count and class id (the box values in a part
file beside its copies', grouped the same way), which pass 3 writes as the face_bboxes and cls columns.
Work files (part files, parts.py) live in plan/work/ (the run's storage, so tasks on any node see them) and are removed once
the plan is committed.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reinforge.formats.subset import UidLookup, locate, make_subset, stable_argsort, uid_hex
from reinforge.formats.uid_index import INDEX_STATUS, load_or_build
from reinforge.io.parts import bucket_of, read_parts, write_parts
from reinforge.io.storage import exists, read_bytes, write_bytes
from reinforge.products.reshard import extras
from reinforge.products.reshard.assignment import copy_keys, order_inside
from reinforge.products.reshard.pool import SAMPLE
from reinforge.products.reshard.subset_file import SubsetFile

# columns of the part files (parts.py) the passes hand on: pool rows, copies (+ face boxes, class ids: extras.py)
POOL_COLUMNS = {"hi": np.uint64, "lo": np.uint64, "offset": np.int64, "length": np.int64, "shard": np.int32}
COPY_COLUMNS = {"key": np.float64, "row": np.int64, "copy": np.int32, "shard": np.int32, "offset": np.int64,
                "length": np.int64, "hi": np.uint64, "lo": np.uint64}


def copy_columns(boxes: bool, cls: bool) -> dict[str, type]:
    """The copies' columns: with face boxes, their count per copy (the values in a part file of their own)."""
    return {**COPY_COLUMNS, **({"boxes": np.int32} if boxes else {}), **({"cls": np.int64} if cls else {})}


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


def match_bucket(start: int, stop: int, pool_parts: list[tuple[str, int, int]], extra_parts: dict, out_url: str,
                 missing_url: str, subset: SubsetFile, seed: int, ranges: int) -> dict:
    """Subset rows start..stop-1 against their pool rows (`pool_parts`: group file, first row, end row, in
    pool shard order). Writes the found uids' copies grouped by key range (with their uid's face boxes
    and class id from `extra_parts`, extras.bucket_extras), and the missing uids."""
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
    found = extras.bucket_extras(uids, counts, source >= 0, extra_parts)
    of_copy, per_range_values = rows[copies.index], None
    if found.boxes is not None:  # the columns in copy_columns' order
        out["boxes"] = found.boxes[of_copy]
        n = 4 * np.maximum(out["boxes"], 0)
        per_range_values = write_parts(extras.values_url(out_url),
                                       {"v": found.values[extras.ragged_take(found.starts[of_copy], n)]},
                                       np.repeat(part, n), ranges)
    if found.cls is not None:
        out["cls"] = found.cls[of_copy]
    per_range = write_parts(out_url, out, part, ranges)
    return {"uids": len(uids), "samples": int(counts.sum()), "per_range": per_range,
            "per_range_values": per_range_values, "extras": found.facts,
            "missing": len(missing), "missing_samples": int(counts[missing].sum()),
            "missing_sample": [uid_hex(*u) for u in uids[missing[:SAMPLE]].tolist()],
            "duplicates": len(repeats), "duplicate_sample": duplicate_examples(pool, repeats)}


# ---------------------------------------------------------------- 3. a key range: output order, task files

def task_file(rows: dict[str, np.ndarray], urls: pa.Array, values: np.ndarray) -> bytes:
    """One output shard's assignment file, its copies put in the order they are written
    (assignment.order_inside): shard (URL), offset, length, uid_hi, uid_lo, copy (+ face_bboxes, whose
    values start at rows["start"] in `values`; + cls)."""
    rows = order_inside(rows)
    columns = {"shard": urls.take(rows["shard"]), "offset": rows["offset"], "length": rows["length"],
               "uid_hi": rows["hi"], "uid_lo": rows["lo"], "copy": rows["copy"]}
    if "boxes" in rows:
        columns["face_bboxes"] = extras.boxes_column(rows["boxes"], rows["start"], values)
    if "cls" in rows:
        columns["cls"] = rows["cls"]
    return plan_table_bytes(pa.table(columns))


def plan_table_bytes(table: pa.Table) -> bytes:
    """A plan file's Parquet bytes. Only the pool shard URL column is dictionary-encoded: uids and byte
    offsets are (nearly) all distinct, and trying a dictionary on them took 3/4 of the writing time."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, use_dictionary=["shard"])
    return buf.getvalue().to_pybytes()


def read_copies(parts: list[tuple[str, int, int]], value_parts: list[tuple[str, int, int]],
                columns: dict[str, type]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Copies from part files, and their box values (each copy's start in column "start")."""
    rows = read_parts(parts, columns)
    if "boxes" not in columns:
        return rows, np.zeros(0)
    rows["start"] = extras.value_starts(rows["boxes"])
    return rows, read_parts(value_parts, extras.VALUE_COLUMNS)["v"]


def commit_file(url: str, data: bytes, write: bool) -> tuple[str, bool]:
    """(sha256 of the file the plan keeps, whether the file there holds this plan); written when `write` (no
    comparison then). A file with other bytes but an equal table counts as the same and keeps its bytes:
    plan files written by an older reinforge encode their columns otherwise, and finished tasks read them."""
    digest = hashlib.sha256(data).hexdigest()
    if write:
        write_bytes(url, data)
        return digest, False
    if not exists(url):
        return digest, False
    there = read_bytes(url)
    kept = hashlib.sha256(there).hexdigest()
    if kept == digest:
        return digest, True
    return (kept, True) if _same_table(there, data) else (digest, False)


def _same_table(a: bytes, b: bytes) -> bool:
    try:
        return pq.ParquetFile(pa.BufferReader(a)).read().equals(pq.ParquetFile(pa.BufferReader(b)).read(),
                                                               check_metadata=True)
    except (OSError, ValueError, pa.ArrowException):  # unreadable: not the same
        return False


def write_range(k: int, parts: list[tuple[str, int, int]], value_parts: list[tuple[str, int, int]], start: int,
                stop: int, fragment_url: str, samples_per_shard: int, total: int, urls: list[str],
                task_urls: list[str], write: bool, columns: dict[str, type]) -> dict:
    """Key range k: its copies (`parts`: bucket file, first row, end row, in bucket order; `value_parts`:
    their box values) are output positions start..stop-1. Sorted into output order (by key; ties in subset
    row then copy order, as bucket order is subset row order), then cut at shard boundaries: a shard wholly
    inside is made here (commit_file); the pieces of shards that cross the range's edges go to
    `fragment_url`, for write_crossing. Returns {shard: (sha256, same)} and the pieces: (shard, file, first
    row, end row, first value, end value)."""
    rows, values = read_copies(parts, value_parts, columns)
    order = stable_argsort(np.ascontiguousarray(rows["key"]).view(np.uint64))
    rows = {name: v[order] for name, v in rows.items()}
    url_array, S = pa.array(urls, pa.string()), samples_per_shard
    files, pieces = {}, []
    for j in range(start // S, -(-stop // S)):
        first, end = j * S, min((j + 1) * S, total)  # the shard's output positions
        a, b = max(first, start) - start, min(end, stop) - start  # its rows here
        if first >= start and end <= stop:
            files[j] = commit_file(task_urls[j], task_file({n: v[a:b] for n, v in rows.items()}, url_array, values),
                                   write)
        elif b > a:
            pieces.append((j, a, b))
    if not pieces:
        return {"files": files, "pieces": []}
    lengths = [b - a for _, a, b in pieces]
    kept = {n: np.concatenate([rows[n][a:b] for _, a, b in pieces]) for n in columns}
    part = np.repeat(np.arange(len(pieces)), lengths)
    counts = write_parts(fragment_url, kept, part, len(pieces))
    value_counts = np.zeros(len(pieces), np.int64)
    if "boxes" in columns:
        n = 4 * np.maximum(kept["boxes"], 0)
        starts = np.concatenate([rows["start"][a:b] for _, a, b in pieces])
        value_counts = write_parts(extras.values_url(fragment_url), {"v": values[extras.ragged_take(starts, n)]},
                                   np.repeat(part, n), len(pieces))
    ends, value_ends = np.cumsum(counts).tolist(), np.cumsum(value_counts).tolist()
    return {"files": files, "pieces": [(j, fragment_url, e - n, e, ve - vn, ve) for (j, _, _), n, e, vn, ve
                                       in zip(pieces, counts.tolist(), ends, value_counts.tolist(), value_ends)]}


def write_crossing(j: int, fragments: list[tuple[str, int, int]], value_fragments: list[tuple[str, int, int]],
                   task_url: str, urls: list[str], write: bool, columns: dict[str, type]) -> dict:
    """Shard j, which crosses key ranges: its pieces (in range order, hence output order) joined."""
    rows, values = read_copies(fragments, value_fragments, columns)
    return {"files": {j: commit_file(task_url, task_file(rows, pa.array(urls, pa.string()), values), write)},
            "pieces": []}


def read_missing(urls: list[str]) -> np.ndarray:
    """The missing uids of every bucket, in uid order."""
    empty = make_subset(np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    return np.concatenate([np.frombuffer(read_bytes(u), empty.dtype) for u in urls] or [empty])
