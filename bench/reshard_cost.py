"""What resharding costs besides copying: start-up, uid indexing, planning, and the runner (issue #13 "Cost",
issue #16 indexing and per-task plan reads). Prints ratios measured in one run; never asserted in tests.

1. small pool (--small samples, default 4,000, in 4 shards): `reinforge reshard` of every uid, as a user
   runs it (a fresh process each time): wall time, the tasks' own copy time (from their manifests), and
   the overhead = wall - copy (interpreter, imports, indexing, planning, runner). Cold index cache, warm
   cache, the same with Ray forced (--runner ray), and run_recipe called in the bench's own process (the
   imports already paid). With --before TREE (e.g. /work/main), the same command from that tree (in 2.
   too, with --runner local). With --datacomp-python, DataComp's resharder.py (/work/ref/datacomp) on
   the same pool, run unchanged (only img2dataset's package __init__ is bypassed, it imports a
   downloader stack the resharder never uses). Goal: overhead <= 2 s.
2. large pool (--samples, default 100,000; small images, --payload bytes): a single-process sequential
   tar reader of the same tars (reinforge.formats.wds.iter_samples, best of 2, page cache warm) against
   `reinforge reshard` end to end (cold index cache) with the default runner (Ray for many tasks) and with
   --runner local (worker processes, no Ray). Goal: end-to-end samples/s >= 2x the reader.
3. uid indexing throughput per core (CPU time of index_shard over the large pool). Goal: >= 100k samples/s.
4. per-task plan read: reading one task's plan with 1,000 and with 10,000 tasks in the run (the cost
   must not grow with the task count).

Run: ../shared/tools/offline .venv/bin/python bench/reshard_cost.py [--samples 100000] [--before /work/main]
     [--datacomp-python /tmp/dcvenv/bin/python] [--results bench/results/reshard_cost.md]
The machine may be shared: every figure is printed with the load average at the time.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)
from pool_gen import random_uids, write_pool_shards  # noqa: E402

from reinforge.formats.subset import first_occurrence, make_subset, uid_order, write_subset  # noqa: E402

LINES: list[str] = []

DATACOMP_SHIM = """import runpy, sys, types, importlib.util
spec = importlib.util.find_spec("img2dataset")
pkg = types.ModuleType("img2dataset"); pkg.__path__ = list(spec.submodule_search_locations)
sys.modules["img2dataset"] = pkg  # only img2dataset.blurrer is needed by the resharder
sys.argv = ["resharder.py"] + sys.argv[1:]
runpy.run_path("/work/ref/datacomp/resharder.py", run_name="__main__")
"""


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def load() -> str:
    return "load %.1f" % os.getloadavg()[0]


def make_pool(folder: str, samples: int, per_shard: int, payload: int, seed: int) -> tuple[list[str], str]:
    strings, hi, lo = random_uids(samples, np.random.default_rng(seed))
    paths = write_pool_shards(os.path.join(folder, "pool"), strings.to_pylist(), per_shard, payload=payload, seed=seed)
    for i, path in enumerate(paths):  # what DataComp's resharder reads for shard sizes
        n = min(per_shard, samples - i * per_shard)
        with open(path[:-4] + "_stats.json", "w") as f:
            json.dump({"successes": n, "count": n}, f)
    subset = make_subset(hi, lo)
    subset = subset[uid_order(subset["f0"], subset["f1"])]
    subset = subset[first_occurrence(subset["f0"], subset["f1"])]
    write_subset(os.path.join(folder, "all.npy"), subset)
    return paths, os.path.join(folder, "all.npy")


def reshard_cli(tree: str, subset: str, pool: str, out: str, cache: str, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": tree, "REINFORGE_INDEX_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "reinforge.cli.main", "reshard", subset, "--pool", pool,
                           "--output", out, "--no-progress", *extra], env=env, capture_output=True, text=True,
                          cwd=tree)  # `python -m` puts the working directory first on sys.path
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the CLI and its worker processes (not Ray's daemons)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"reshard failed ({tree}): {proc.stderr[-2000:]}")
    manifests = glob.glob(os.path.join(out, "manifests", "*.json"))
    copy = sum(json.load(open(m))["seconds"] for m in manifests)
    samples = sum(json.load(open(m))["samples_out"] for m in manifests)
    return {"wall": wall, "copy": copy, "samples": samples, "tasks": len(manifests), "cpu": cpu}


def datacomp(python: str, folder: str, subset: str, out: str, workers: int) -> float:
    shim = os.path.join(folder, "run_datacomp.py")
    with open(shim, "w") as f:
        f.write(DATACOMP_SHIM)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    proc = subprocess.run([python, shim, "-i", os.path.join(folder, "pool"), "-o", out, "-s", subset,
                           "-j", str(workers), "--shard-size", "10000", "-q"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"DataComp resharder failed: {proc.stderr[-2000:]}")
    return wall


def sequential_read(paths: list[str]) -> tuple[float, float]:
    """Samples per second of wall time and of CPU time."""
    from reinforge.formats.wds import iter_samples
    started, cpu = time.perf_counter(), time.process_time()
    n = 0
    for p in paths:
        with open(p, "rb") as f:
            n += sum(1 for _ in iter_samples(f))
    return n / (time.perf_counter() - started), n / (time.process_time() - cpu)


def bench_small(tmp: str, args) -> None:
    folder = os.path.join(tmp, "small")
    paths, subset = make_pool(folder, args.small, -(-args.small // 4), args.payload, seed=1)
    pool = os.path.join(folder, "pool", "*.tar")
    say(f"## 1. Start-up + indexing overhead, {args.small:,} samples ({len(paths)} shards, {args.payload} B images)")
    say()
    say("| run | wall s | copy s (tasks) | overhead s (wall - copy) | tasks | |")
    say("|---|---|---|---|---|---|")
    cache = os.path.join(tmp, "cache-small")
    runs = [("reinforge, cold index cache", ROOT, ()), ("reinforge, warm index cache", ROOT, ()),
            ("reinforge, warm cache, --runner ray", ROOT, ("--runner", "ray"))]
    if args.before:
        runs.append((f"before ({args.before}), cold", args.before, ()))
    for i, (label, tree, extra) in enumerate(runs):
        r = reshard_cli(tree, subset, pool, os.path.join(folder, f"out{i}"), cache, *extra)
        say(f"| {label} | {r['wall']:.2f} | {r['copy']:.2f} | **{r['wall'] - r['copy']:.2f}** | {r['tasks']} | {load()} |")
    if args.datacomp_python:
        wall = datacomp(args.datacomp_python, folder, subset, os.path.join(folder, "datacomp"), 2)
        say(f"| DataComp resharder.py -j 2 | {wall:.2f} | | | | {load()} |")
    # the same in this process, imports paid: what a Python caller or a long-lived driver sees
    from reinforge.runtime.runner import run_recipe
    from reinforge.formats.uid_index import INDEX_CACHE_ENV
    from reinforge.products.registry import parse_recipe
    os.environ[INDEX_CACHE_ENV] = os.path.join(tmp, "cache-small-in-process")
    for label in ("cold", "warm"):
        out = os.path.join(folder, f"in-process-{label}")
        started = time.perf_counter()
        summary = run_recipe(parse_recipe({"product": "reshard", "output": out, "subset": subset,
                                           "input": {"path": pool}}), progress=False)
        wall = time.perf_counter() - started
        copy = sum(json.load(open(m))["seconds"] for m in glob.glob(os.path.join(out, "manifests", "*.json")))
        say(f"| run_recipe in this process (imports paid), {label} index cache | {wall:.2f} | {copy:.2f} | "
            f"**{wall - copy:.2f}** | {summary.tasks} | {load()} |")
    del os.environ[INDEX_CACHE_ENV]
    say()


def bench_large(tmp: str, args) -> None:
    folder = os.path.join(tmp, "large")
    started = time.perf_counter()
    paths, subset = make_pool(folder, args.samples, args.per_shard, args.payload, seed=2)
    mib = sum(os.path.getsize(p) for p in paths) / 2**20
    say(f"## 2. End to end, {args.samples:,} samples ({len(paths)} shards x {args.per_shard:,}, {args.payload} B "
        f"images, {mib:.0f} MiB; generated in {time.perf_counter() - started:.1f} s)")
    say()
    sequential_read(paths)  # page cache warm
    reader, reader_cpu = max(sequential_read(paths) for _ in range(2))
    say(f"single-process sequential tar reader (iter_samples): **{reader:,.0f} samples/s** ({reader_cpu:,.0f} per "
        f"CPU second; {load()})")
    say()
    say("CPU s: of the CLI and its worker processes (Ray's own processes are not counted); ÷ reader, CPU: samples "
        "per CPU second ÷ the reader's, what the ratio would be with no parallelism at all")
    say()
    say("| run | wall s | samples/s | ÷ reader | CPU s | ÷ reader, CPU | tasks | |")
    say("|---|---|---|---|---|---|---|---|")
    pool = os.path.join(folder, "pool", "*.tar")
    runs = [("reinforge --runner local (worker processes), cold index", ROOT, ("--runner", "local")),
            ("reinforge default runner (Ray: many tasks), cold index", ROOT, ())]
    if args.before:
        runs.append((f"before ({args.before}) --runner local, cold index", args.before, ("--runner", "local")))
    for i, (label, tree, extra) in enumerate(runs):
        r = reshard_cli(tree, subset, pool, os.path.join(folder, f"out{i}"), os.path.join(tmp, f"cache-large{i}"), *extra)
        rate = r["samples"] / r["wall"]
        cpu_ratio = f"{r['samples'] / r['cpu'] / reader_cpu:.2f}" if "ray" not in label.lower() else "–"
        say(f"| {label} | {r['wall']:.2f} | {rate:,.0f} | **{rate / reader:.2f}** | {r['cpu']:.2f} | {cpu_ratio} | "
            f"{r['tasks']} | {load()} |")
    if args.datacomp_python:
        wall = datacomp(args.datacomp_python, folder, subset, os.path.join(folder, "datacomp"), 2)
        rate = args.samples / wall
        say(f"| DataComp resharder.py -j 2 | {wall:.2f} | {rate:,.0f} | {rate / reader:.2f} | | | | {load()} |")
    say()
    from reinforge.formats.uid_index import index_shard
    index_shard(paths[0])  # imports and first-touch costs out of the measurement
    cpu = time.process_time()
    wall = time.perf_counter()
    for p in paths:
        index_shard(p)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    say(f"## 3. uid indexing: {args.samples / cpu:,.0f} samples/s per core (CPU time; wall {args.samples / wall:,.0f}/s, "
        f"{load()}); goal >= 100,000")
    say()


def bench_task_plans(tmp: str) -> None:
    from reinforge.products.reshard.pipeline import ReshardPipeline
    from reinforge.products.registry import parse_recipe
    folder = os.path.join(tmp, "plans")
    _, subset = make_pool(folder, 20_000, 5_000, 64, seed=3)
    say("## 4. Per-task plan read (20,000 samples)")
    say()
    say("| tasks in the run | plan written s | read one task's plan, ms (mean of 200) |")
    say("|---|---|---|")
    for per_shard in (20, 2):
        recipe = parse_recipe({"product": "reshard", "output": os.path.join(folder, f"run{per_shard}"), "subset": subset,
                               "input": {"path": os.path.join(folder, "pool", "*.tar")}, "samples_per_shard": per_shard})
        pipeline = ReshardPipeline(recipe)
        started = time.perf_counter()
        pipeline.prepare(pipeline.layout)
        tasks = pipeline.tasks()
        written = time.perf_counter() - started
        picks = tasks[:: max(1, len(tasks) // 200)][:200]
        import pyarrow.parquet as pq
        started = time.perf_counter()
        for t in picks:
            pq.read_table(t.inputs[0])
        say(f"| {len(tasks):,} | {written:.2f} | {(time.perf_counter() - started) / len(picks) * 1e3:.2f} |")
    say()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=4000)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--per-shard", type=int, default=10_000)
    parser.add_argument("--payload", type=int, default=1024, help="bytes of the (random) jpg member")
    parser.add_argument("--before", default=None, help="another reinforge tree to time the same CLI runs with (small pool; large pool, --runner local)")
    parser.add_argument("--datacomp-python", default=None, help="a Python with DataComp's resharder dependencies")
    parser.add_argument("--results", default=None, help="also write the tables to this markdown file")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="reinforge-bench-cost-")
    say(f"# bench/reshard_cost.py ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, {load()} at start)")
    say()
    try:
        bench_small(tmp, args)
        bench_large(tmp, args)
        bench_task_plans(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.results:
        with open(args.results, "w") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
