"""Time splits and resharding benchmark: prints rates and ratios (never asserted in tests).

1. bucketing: rows/s of `build_splits` (read Parquet, parse uids and timestamps, bucket, sort,
   de-duplicate, write the subset files) on a generated 10M-row metadata table (several row
   groups, epoch-seconds timestamps with exponential growth, missing and out-of-range values).
   Goal: >= 2M rows/s on this machine.
2. resharding: samples/s of a reshard run over a generated pool (every uid requested once) divided
   by the samples/s of a plain streaming read of the same tars in one process. Goal: >= 0.7.
   Reported for the tasks alone (Ray already up, actors warm) and end to end (index pass, plan,
   actor start-up included).

Run: ../shared/tools/offline .venv/bin/python bench/time_splits.py [--rows 10000000] [--iso]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from pool_gen import metadata_table, random_uids, write_metadata, write_pool_shards  # noqa: E402

from reinforge.curation.time_splits import SplitOptions, build_splits  # noqa: E402
from reinforge.formats.subset import first_occurrence, make_subset, uid_order, write_subset  # noqa: E402
from reinforge.formats.wds import iter_samples  # noqa: E402


def bench_bucketing(tmp: str, rows: int, fmt: str) -> None:
    path = os.path.join(tmp, f"meta-{fmt}.parquet")
    started = time.perf_counter()
    write_metadata(path, metadata_table(rows, seed=0, fmt=fmt), row_group_size=1_000_000)
    print(f"[bucketing/{fmt}] generated {rows:,} rows ({os.path.getsize(path) / 2**20:.0f} MiB Parquet, "
          f"{-(-rows // 1_000_000)} row groups) in {time.perf_counter() - started:.1f} s")
    for attempt in range(2):
        out = os.path.join(tmp, f"splits-{fmt}-{attempt}")
        started = time.perf_counter()
        m = build_splits([path], out, SplitOptions(timestamp_format=fmt))
        seconds = time.perf_counter() - started
        print(f"[bucketing/{fmt}] run {attempt + 1}: {seconds:.2f} s = {rows / seconds / 1e6:.2f}M rows/s "
              f"(goal >= 2M); {len(m['steps'])} splits, unknown {m['unknown']['uids']:,}, "
              f"out_of_range {m['out_of_range']['uids']:,}")
        shutil.rmtree(out)


def bench_reshard(tmp: str, shards: int, per_shard: int, payload: int) -> None:
    from reinforge.runtime.ray_session import start_local_ray
    from reinforge.products.reshard.pipeline import ReshardPipeline
    from reinforge.runtime.runner import run_recipe
    from reinforge.products.registry import parse_recipe

    strings, hi, lo = random_uids(shards * per_shard, np.random.default_rng(0))
    paths = write_pool_shards(os.path.join(tmp, "pool"), strings.to_pylist(), per_shard, payload=payload)
    subset = make_subset(hi, lo)
    subset = subset[uid_order(subset["f0"], subset["f1"])]
    subset = subset[first_occurrence(subset["f0"], subset["f1"])]
    write_subset(os.path.join(tmp, "all.npy"), subset)
    total = len(subset)
    mib = sum(os.path.getsize(p) for p in paths) / 2**20
    print(f"[reshard] pool: {shards} shards x {per_shard} samples, {payload} B jpg payload, {mib:.0f} MiB")

    def raw_read() -> float:
        started = time.perf_counter()
        n = 0
        for p in paths:
            with open(p, "rb") as f:
                n += sum(1 for _ in iter_samples(f))
        return n / (time.perf_counter() - started)

    raw_read()  # warm the page cache
    raw = max(raw_read() for _ in range(2))
    print(f"[reshard] raw tar read (one process, iter_samples): {raw:,.0f} samples/s")

    def recipe(out: str):
        return parse_recipe({"product": "reshard", "output": out, "subset": os.path.join(tmp, "all.npy"),
                             "input": {"path": os.path.join(tmp, "pool", "*.tar")}, "samples_per_shard": per_shard,
                             "resources": {"cpus_per_actor": 1}})

    started = time.perf_counter()
    index_only = ReshardPipeline(recipe(os.path.join(tmp, "index-only")))
    index_only.prepare(index_only.layout)
    print(f"[reshard] index pass + plan alone (driver, cold index): {time.perf_counter() - started:.2f} s "
          f"= {total / (time.perf_counter() - started):,.0f} samples/s")
    start_local_ray(object_store_memory_mb=512)
    for attempt in range(2):
        out = os.path.join(tmp, f"reshard-{attempt}")
        started = time.perf_counter()
        summary = run_recipe(recipe(out), progress=False)
        wall = time.perf_counter() - started
        assert summary.ok and summary.samples == total, summary
        print(f"[reshard] run {attempt + 1}: tasks {summary.samples_per_second:,.0f} samples/s "
              f"(ratio {summary.samples_per_second / raw:.2f}, goal >= 0.7); end to end {wall:.1f} s = "
              f"{total / wall:,.0f} samples/s (ratio {total / wall / raw:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--iso", action="store_true", help="also time ISO-8601 string timestamps")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=2000)
    parser.add_argument("--payload", type=int, default=16_384, help="bytes of the fake jpg member")
    parser.add_argument("--skip-reshard", action="store_true")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="reinforge-bench-ts-")
    try:
        bench_bucketing(tmp, args.rows, "epoch")
        if args.iso:
            bench_bucketing(tmp, args.rows, "iso")
        if not args.skip_reshard:
            bench_reshard(tmp, args.shards, args.per_shard, args.payload)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
