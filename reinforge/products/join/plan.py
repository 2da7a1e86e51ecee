"""Join's plan, made as reshard's is (reshard/partitions.py), in passes of tasks over partitions, so the
driver holds counts per partition and never an array per sample:
1. every reinforcement shard's readable uids, and every pool shard's samples, routed to uid buckets (equal
   slices of the uid space: uids are hashes);
2. per uid bucket: the bucket's distinct reinforcement uids located in its pool rows (the first occurrence
   in pool shard order wins), and each reinforcement row that was found, with its pool location, routed
   to the group of reinforcement shards it belongs to;
3. per group of reinforcement shards: each shard's locations file, its rows in the shard's order.
Files: plan/<task>.parquet (uid, shard, offset, length) and plan/plan.json (the counts and the files'
fingerprint; written last, it commits them). A rerun with the same inputs (plan/inputs.json) plans
nothing; one whose inputs changed plans again and rewrites nothing when every file's bytes are the same.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from reinforge.formats.subset import first_occurrence, make_subset, uid_hex, uid_order
from reinforge.formats.uid_index import index_cache_dir, load_or_build
from reinforge.io.manifest import RunLayout, Task
from reinforge.io.parts import bucket_of, read_parts, write_parts
from reinforge.io.storage import exists, remove, write_bytes
from reinforge.products.reshard.assignment import lexsort_nonnegative
from reinforge.products.reshard.partitions import (POOL_COLUMNS, commit_file, duplicate_examples, first_in_pool,
                                                   plan_table_bytes, pool_to_buckets)
from reinforge.products.reshard.pool import SAMPLE
from reinforge.products.reshard.subset_file import SHARD_SAMPLES, partition_size
from reinforge.runtime.ray_session import TaskMap, where_to_map

ROW_COLUMNS = {"hi": np.uint64, "lo": np.uint64, "task": np.int32, "row": np.int64}  # a reinforcement row
FOUND_COLUMNS = {**ROW_COLUMNS, "shard": np.int32, "offset": np.int64, "length": np.int64}
SHARDS_PER_GROUP = 64  # shards per bucketing task, and reinforcement shards per writing task
SHARDS_PER_BUCKET = None  # reinforcement shards per uid bucket; None: partition_size of 10,000 per shard


def locations_url(layout: RunLayout, task_id: str) -> str:
    """The pool locations of one reinforcement shard's uids, as prepare() found them."""
    return layout.plan_file(f"{task_id}.parquet")


def uid_strings(hi: np.ndarray, lo: np.ndarray) -> pa.StringArray:
    """uid_hex of every row, as one Arrow string array made from a single hex buffer (no str per row)."""
    raw = np.empty((len(hi), 2), ">u8")
    raw[:, 0], raw[:, 1] = hi, lo
    offsets = np.arange(0, 32 * len(hi) + 1, 32, dtype=np.int32)
    return pa.StringArray.from_buffers(len(hi), pa.py_buffer(offsets.tobytes()),
                                       pa.py_buffer(raw.tobytes().hex().encode()))


def even_bounds(buckets: int) -> np.ndarray:
    """The first uid of each bucket but the first: equal slices of the uid space."""
    return make_subset(np.array([(b << 64) // buckets for b in range(1, buckets)], np.uint64),
                       np.zeros(buckets - 1, np.uint64))


def reinforcement_to_buckets(shards: list[tuple[int, str, int, str]], out_url: str, index_dir: str,
                             bounds: np.ndarray) -> dict:
    """Pass 1 for reinforcement shards (number, URL, size, version): their readable uids by uid bucket."""
    parts, samples = [], 0
    for number, url, size, version in shards:
        table = load_or_build(url, size, version, index_dir, "uid", ["uid_hi", "uid_lo", "status"])
        samples += table.num_rows
        ok = table.column("status").to_numpy() == 0
        hi, lo = table.column("uid_hi").to_numpy()[ok], table.column("uid_lo").to_numpy()[ok]
        parts.append({"hi": hi, "lo": lo, "task": np.full(len(hi), number, np.int32),
                      "row": np.arange(len(hi), dtype=np.int64)})
    rows = {name: np.concatenate([p[name] for p in parts] or [np.zeros(0, t)]) for name, t in ROW_COLUMNS.items()}
    counts = write_parts(out_url, rows, bucket_of(rows["hi"], rows["lo"], bounds), len(bounds) + 1)
    return {"samples": samples, "readable": len(rows["hi"]), "counts": counts}


def match_bucket(rows_parts: list, pool_parts: list, out_url: str, groups: int, shards_per_group: int) -> dict:
    """Pass 2: the bucket's reinforcement rows located in its pool rows (first occurrence in pool order);
    the found rows, with their locations, by group of reinforcement shards."""
    rows = read_parts(rows_parts, ROW_COLUMNS)
    pool = read_parts(pool_parts, POOL_COLUMNS)
    order = uid_order(rows["hi"], rows["lo"])
    distinct = first_occurrence(rows["hi"][order], rows["lo"][order])
    wanted = make_subset(rows["hi"][order][distinct], rows["lo"][order][distinct])  # sorted, unique
    which = np.empty(len(order), np.int64)  # per reinforcement row: its uid's place in wanted
    which[order] = np.cumsum(distinct) - 1
    source, repeats = first_in_pool(pool, wanted)  # per wanted uid: its pool row
    at = source[which]
    found = at >= 0
    out = {**{name: values[found] for name, values in rows.items()},
           **{name: pool[name][at[found]] for name in ("shard", "offset", "length")}}
    per_group = write_parts(out_url, out, out["task"] // shards_per_group, groups)
    missing = wanted[source < 0]
    return {"uids": len(wanted), "in_pool": int((source >= 0).sum()), "per_group": per_group,
            "missing_sample": [uid_hex(*u) for u in missing[:SAMPLE].tolist()], "duplicates": len(repeats),
            "duplicate_sample": duplicate_examples(pool, repeats)}


def write_group(first: int, parts: list, task_urls: list[str], urls: list[str], write: bool) -> dict:
    """Pass 3: the locations files of reinforcement shards first.. (as many as task_urls), each with its
    found rows in the shard's order."""
    rows = read_parts(parts, FOUND_COLUMNS)
    url_array = pa.array(urls, pa.string())
    order = lexsort_nonnegative((rows["row"], rows["task"]))
    rows = {name: values[order] for name, values in rows.items()}
    ends = np.searchsorted(rows["task"], np.arange(first, first + len(task_urls) + 1))
    files = {}
    for i, url in enumerate(task_urls):
        a, b = ends[i], ends[i + 1]
        table = pa.table({"uid": uid_strings(rows["hi"][a:b], rows["lo"][a:b]),
                          "shard": url_array.take(rows["shard"][a:b]),
                          "offset": rows["offset"][a:b], "length": rows["length"][a:b]})
        files[first + i] = commit_file(url, plan_table_bytes(table), write)
    return files


@dataclass
class JoinPlan:
    summary: dict  # plan.json without its fingerprint
    found_files: list[str]  # per uid bucket: its found reinforcement rows, grouped by group of shards
    found_counts: np.ndarray  # found rows per (uid bucket, group of reinforcement shards)
    pool_urls: list[str]
    tasks: TaskMap


def plan_join(tasks: list[Task], pool: list[Task], layout: RunLayout, work: str, uid_field: str,
              versions: dict[str, tuple[int, str]], where: str | None = None) -> JoinPlan:
    """Passes 1 and 2; raises nothing on uids absent from the pool (the caller decides). `versions`: the
    shards' file_versions, as the plan's inputs digest recorded them."""
    urls = [t.inputs[0] for t in pool]
    rein_urls = [t.inputs[0] for t in tasks]
    index_dir = index_cache_dir()
    per_bucket = SHARDS_PER_BUCKET or max(1, partition_size(SHARD_SAMPLES * len(tasks)) // SHARD_SAMPLES)
    buckets = max(1, -(-len(tasks) // per_bucket))
    bounds = even_bounds(buckets)
    run = TaskMap(where or where_to_map(SHARD_SAMPLES * max(len(tasks), len(pool))))
    try:
        def groups_of(shard_urls):
            return [[(n, shard_urls[n], *versions[shard_urls[n]])
                     for n in range(a, min(a + SHARDS_PER_GROUP, len(shard_urls)))]
                    for a in range(0, len(shard_urls), SHARDS_PER_GROUP)]
        rein_files = [f"{work}/reinforcement-{g:06d}.bin" for g in range(len(groups_of(rein_urls)))]
        rein = list(run(reinforcement_to_buckets, list(zip(groups_of(rein_urls), rein_files)),
                        (index_dir or layout.index_dir("reinforcement"), bounds)))
        pool_files = [f"{work}/pool-{g:06d}.bin" for g in range(len(groups_of(urls)))]
        scans = list(run(pool_to_buckets, list(zip(groups_of(urls), pool_files)),
                         (index_dir or layout.index_dir("images"), uid_field, bounds)))
        groups = max(1, -(-len(tasks) // SHARDS_PER_GROUP))
        found_files = [f"{work}/found-{b:06d}.bin" for b in range(buckets)]
        matched = list(run(match_bucket, ((_slices(rein_files, rein, b), _slices(pool_files, scans, b), found_files[b])
                                          for b in range(buckets)), (groups, SHARDS_PER_GROUP)))
    except BaseException:
        run.close()
        raise
    per_group = np.array([m["per_group"] for m in matched]).reshape(buckets, groups)
    bad, bad_sample = {}, []
    for scan in scans:
        for name, n in scan["bad"].items():
            bad[name] = bad.get(name, 0) + n
        bad_sample.extend(scan["bad_sample"][:SAMPLE - len(bad_sample)])
    samples, readable = sum(s["samples"] for s in rein), sum(s["readable"] for s in rein)
    uids, in_pool = sum(m["uids"] for m in matched), sum(m["in_pool"] for m in matched)
    duplicates = sorted(d for m in matched for d in m["duplicate_sample"])[:SAMPLE]
    summary = {"format": "reinforge.join/1", "reinforcement_shards": len(tasks), "reinforcement_samples": samples,
               "samples_without_uid": samples - readable, "uids": uids, "uids_in_pool": in_pool,
               "uids_not_in_pool": uids - in_pool,
               "not_in_pool_sample": [u for m in matched for u in m["missing_sample"]][:SAMPLE],
               "pool": {"shards": len(urls), "samples_indexed": sum(s["samples"] for s in scans),
                        "samples_without_uid": bad, "duplicate_uids": sum(m["duplicates"] for m in matched),
                        "duplicate_sample": [u for _, _, u in duplicates],
                        "duplicate_policy": "first occurrence (pool shard order, then position) is used"}}
    return JoinPlan(summary, found_files, per_group, urls, run)


def _slices(files: list[str], results: list[dict], bucket: int) -> list[tuple[str, int, int]]:
    """Bucket `bucket`'s rows in each pass-1 file: (file, first row, end row), in file order."""
    out = []
    for url, result in zip(files, results):
        ends = np.cumsum(result["counts"])
        out.append((url, int(ends[bucket] - result["counts"][bucket]), int(ends[bucket])))
    return out


def commit_plan(layout: RunLayout, tasks: list[Task], plan: JoinPlan) -> None:
    """Write every task's locations file, then plan/plan.json (the summary and the files' fingerprint;
    written last, it commits them), unless the committed files have the same bytes: then nothing."""
    task_urls = [locations_url(layout, t.id) for t in tasks]

    def write_all(write: bool) -> list[tuple[str, bool]]:
        files = {}
        firsts = np.cumsum(plan.found_counts, axis=1) - plan.found_counts  # a group's first row per bucket file
        per_group = ((g * SHARDS_PER_GROUP, [(url, int(firsts[b, g]), int(firsts[b, g] + plan.found_counts[b, g]))
                                             for b, url in enumerate(plan.found_files)],
                      task_urls[g * SHARDS_PER_GROUP:(g + 1) * SHARDS_PER_GROUP])
                     for g in range(plan.found_counts.shape[1]) if g * SHARDS_PER_GROUP < len(tasks))
        for done in plan.tasks(write_group, per_group, (plan.pool_urls, write)):
            files.update(done)
        return [files[i] for i in range(len(tasks))]

    def fingerprint(files: list[tuple[str, bool]]) -> str:
        digest = hashlib.sha256()
        for url, (sha, _) in sorted(zip(task_urls, files)):
            digest.update(f"{layout.relative(url)}\0{sha}\n".encode())
        return digest.hexdigest()

    if exists(layout.plan_record):  # as reshard decides it: the files there against the new ones, byte for byte
        if all(same for _, same in write_all(write=False)):
            return
        remove(layout.plan_record)  # uncommitted while the locations are rewritten
    files = write_all(write=True)
    write_bytes(layout.plan_record, json.dumps({**plan.summary, "fingerprint": fingerprint(files)}, indent=1).encode())
