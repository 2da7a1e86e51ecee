"""Driver memory at scale (issue #16): per tool and pool size, the driver's peak RSS above its import
baseline in bytes per sample, seconds per million rows, and how the peak grows between sizes.

Each measurement runs in a fresh subprocess: it imports what the tool needs, records its RSS, runs the
tool once, and reports its peak RSS (VmHWM; Linux carries ru_maxrss over from the parent across fork+exec,
so a big parent would hide the child's peak) minus that baseline. Inputs are generated once per size (not timed):
  filter apply   the scores as `filter score` writes them (parts of 8 x 128k-row groups, 0.1 % duplicate uids,
                 1 % NaN scores); rule `basic & top(clip_l14, 0.3)` in datacomp and exact semantics
  schedule       four disjoint time splits (sorted u8,u8 .npy, sizes growing 1:2:3:4); cumulative-all,
                 budget = the pool size, independent buffer
  splits         `reinforge splits` (tic buckets, defaults) on DataComp-like metadata: ceil(n / 8M) parquet files
                 of 128k-row groups with a 32-hex uid and int64 epoch-seconds timestamp (2014-2022, volume
                 growing yearly, 1 % null); written a row group at a time
The growth column is log(peak_b/peak_a)/log(n_b/n_a) between consecutive sizes: 1 = linear in samples,
0 = flat; the marginal column is (peak_b - peak_a)/(n_b - n_a), the bytes each extra sample costs (a fixed
cost such as allocator arenas and one batch of columns divides away at scale, a per-sample one does not). Nothing here is asserted; tests check results, this prints costs.

index (bench/scale_index.py): build_index (ivf_pq + fp16 refine) over n synthetic 256-d embeddings; the extra
column hashes index.faiss, uids.npy and index.json without timings (byte-identical before/after).

reshard-plan and join-plan (bench/scale_plan.py): prepare() of a reshard / join run on placeholder pool shards
whose uid indexes are cached; the extra column hashes every output file (byte-identical before/after).

score and validate (bench/scale_runs.py): `filter score` (score_metadata, no --clusters) on DataComp-like metadata
(bench/filters.py's generator, 128k-row groups) cut into units of one row group, so every size runs several
tasks (worker processes; worker CPU = its descendants' read from /proc); `validate` (validate_run, workers = CPU count) of a finished reshard of n tiny samples at 10,000 samples
per task (worker CPU = RUSAGE_CHILDREN). The progress line adds samples per CPU-second (driver + workers).

Two more tools measure the runner and `status` against the task count (--tasks, not --sizes):
  runner         a reshard run (resources.runner: local by default, i.e. worker processes, no Ray start-up;
                 --runners local,ray adds Ray) of a subset of T uids at samples_per_shard 1, so T tasks of
                 one sample each, over one pool of max(T) tiny samples (100 {:08d}.tar shards, jpg + txt +
                 json {"uid"}). tasks/s = tasks / the runner's task loop (RunSummary.seconds: after prepare,
                 planning and pool start, which are reported apart; local worker processes start inside it, a fixed
                 ~2-3 s, so the marginal column (extra tasks / extra loop seconds between sizes) is given too);
                 goal: T=10,000 >= 0.8 x T=1,000.
  status         `reinforge status RUN` in a fresh interpreter on the finished local run, minus
                 `python -c "import reinforge.cli.main"` (best of --repeat each); goal: <= 1 s at 10,000 tasks.
The pool and subsets are built once (not timed); the uid index cache lives in the bench's temp folder.

Run: /work/shared/tools/offline .venv/bin/python bench/scale.py [--sizes 1000000,4000000] [--tools filter,schedule]
     [--out bench/results/scale.md] [--tree DIR]   (DIR: e.g. `git archive <commit> | tar -x -C DIR`, for before/after)
     bench/scale.py --tools reshard-plan,join-plan --sizes 1000000,12800000
     bench/scale.py --tools reshard-plan --blur-metadata 0.2 --sizes 1000000,4000000 --tree DIR_BEFORE,DIR_AFTER
     bench/scale.py --tools index --sizes 500000,1000000,2000000 --tree DIR_BEFORE,DIR_AFTER
     bench/scale.py --tools score,validate --sizes 250000,1000000
     bench/scale.py --tools runner,status [--tasks 1000,10000] [--runners local,ray]
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from scale_index import INDEX_TOOLS, index_cases, make_index_inputs, measure_index
from scale_plan import PLAN_TOOLS, make_plan_inputs, measure_plan, plan_cases
from scale_runs import RUNS_TOOLS, child_env, make_reshard_pool, make_runs_inputs, measure_runs, run_reshard, runs_cases

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ROW_GROUP = 128 * 1024
TREE = ROOT  # the reinforge tree measured (--tree: e.g. an export of an older commit, for before/after)

# A child measures one tool call: RSS after imports (statm), then its peak RSS (VmHWM) after the call.
CHILD = r"""
import json, os, sys, time
import numpy as np, pyarrow, pyarrow.parquet
import pandas  # pyarrow imports it on a column's first to_numpy(): an import, not a per-sample cost
from reinforge.curation.filters.decide import decide
from reinforge.curation.replay import build_schedule
from reinforge.curation.time_splits import SplitOptions, build_splits
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
base = rss()
tool, args = sys.argv[1], json.loads(sys.argv[2])
start = time.perf_counter()
if tool == "filter":
    decide(**args)
elif tool == "schedule":
    build_schedule(**args)
elif tool == "splits":
    build_splits(args["inputs"], args["out_dir"], SplitOptions())
seconds = time.perf_counter() - start
with open("/proc/self/status") as f:  # VmHWM: this process's peak; ru_maxrss would carry the parent's across exec
    peak = int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024
import reinforge
print(json.dumps({"base": base, "peak": peak, "seconds": seconds, "tree": os.path.dirname(reinforge.__file__)}))
"""


def uids(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 2**64, n, np.uint64, endpoint=False), rng.integers(0, 2**64, n, np.uint64, endpoint=False)


def make_scores(folder: str, n: int, seed: int = 0) -> None:
    """A scores dir as `filter score` writes it (a part per unit of 8 row groups, listed in the report),
    generated column by column in row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    sys.path.insert(0, ROOT)
    from reinforge.curation.filters.scores import PARTS, REPORT, _schema
    rng = np.random.default_rng(seed)
    schema = _schema(False)
    os.makedirs(os.path.join(folder, PARTS), exist_ok=True)
    langs = pa.array(["en", "de", "es", "fr"])
    prev_hi = prev_lo = None
    parts, unit = [], 8 * ROW_GROUP  # filter score's default unit (1M rows) in whole row groups
    for first in range(0, n, unit):
        parts.append({"file": f"{PARTS}/{len(parts):06d}.parquet", "row_groups": []})
        with pq.ParquetWriter(os.path.join(folder, parts[-1]["file"]), schema, compression="zstd") as writer:
            for start in range(first, min(n, first + unit), ROW_GROUP):
                m = min(ROW_GROUP, n - start)
                hi, lo = uids(m, rng)
                if prev_hi is not None:  # 0.1 % of rows repeat a uid of the previous group
                    dup = rng.choice(m, max(1, m // 1000), replace=False)
                    src = rng.integers(0, len(prev_hi), len(dup))
                    hi[dup], lo[dup] = prev_hi[src], prev_lo[src]
                prev_hi, prev_lo = hi, lo

                def floats(scale):
                    v = (rng.random(m, np.float32) * scale).astype(np.float32)
                    v[rng.random(m) < 0.01] = np.nan
                    return pa.array(v, pa.float32(), from_pandas=True)
                ints = lambda lo_, hi_: pa.array(rng.integers(lo_, hi_, m, dtype=np.int32))  # noqa: E731
                cols = {"uid_hi": pa.array(hi), "uid_lo": pa.array(lo), "file": pa.array(np.zeros(m, np.int32)),
                        "row": pa.array(np.arange(start, start + m)), "words": ints(0, 15), "chars": ints(0, 80),
                        "lang": pa.DictionaryArray.from_arrays(
                            pa.array(rng.choice(4, m, p=[0.6, 0.2, 0.1, 0.1]).astype(np.int32)), langs),
                        "synset_hits": ints(0, 3), "synset": ints(-1, 1000), "wordnet_hits": ints(0, 3),
                        "ft_words": ints(0, 15), "short_side": floats(1024), "aspect": floats(4),
                        "clip_b32": floats(0.45), "clip_l14": floats(0.5)}
                writer.write_table(pa.table(cols, schema=schema))
                parts[-1]["row_groups"].append(m)
    with open(os.path.join(folder, REPORT), "w") as f:
        json.dump({"rows": n, "scored": n, "malformed_uids": {"rows": 0, "by_reason": {}, "sample": []},
                   "parts": parts}, f)


def make_splits(folder: str, n: int, seed: int = 0) -> None:
    """Four disjoint splits of a pool of n uids (sizes 1:2:3:4), each a sorted u8,u8 .npy."""
    rng = np.random.default_rng(seed + 1)
    os.makedirs(folder, exist_ok=True)
    sizes = [n // 10, 2 * n // 10, 3 * n // 10]
    sizes.append(n - sum(sizes))
    manifest = {"steps": [], "splits": {}}
    for i, size in enumerate(sizes):
        name = f"{2014 + i}"
        arr = np.empty(size, [("f0", "<u8"), ("f1", "<u8")])
        arr["f0"], arr["f1"] = uids(size, rng)
        arr["f0"] = (arr["f0"] & ~np.uint64(3)) | np.uint64(i)  # disjoint by construction
        arr.sort(order=["f0", "f1"])
        np.save(os.path.join(folder, f"{name}.npy"), arr)
        manifest["steps"].append(name)
        manifest["splits"][name] = {"uids": size, "file": f"{name}.npy"}
    with open(os.path.join(folder, "splits.json"), "w") as f:
        json.dump(manifest, f)


def make_metadata(folder: str, n: int, seed: int = 0, per_file: int = 8 << 20) -> None:
    """DataComp-like metadata (uid, timestamp) in parquet files of `per_file` rows, a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from pool_gen import random_uids, skewed_epochs
    rng = np.random.default_rng(seed + 2)
    os.makedirs(folder, exist_ok=True)
    schema = pa.schema([("uid", pa.string()), ("timestamp", pa.int64())])
    for f, first in enumerate(range(0, n, per_file)):
        rows = min(per_file, n - first)
        with pq.ParquetWriter(os.path.join(folder, f"{f:05d}.parquet"), schema, compression="zstd") as writer:
            for start in range(0, rows, ROW_GROUP):
                m = min(ROW_GROUP, rows - start)
                strings, _, _ = random_uids(m, rng)
                ts = pa.array(skewed_epochs(m, rng), pa.int64(), mask=rng.random(m) < 0.01)
                writer.write_table(pa.table({"uid": strings, "timestamp": ts}, schema=schema))


def measure(tool: str, args: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=TREE, HF_HUB_OFFLINE="1")
    # cwd: `python -c` puts the working directory first on sys.path, which would shadow --tree
    out = subprocess.run([sys.executable, "-c", CHILD, tool, json.dumps(args)], env=env, check=True,
                         capture_output=True, text=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_wall(tmp: str, argv: list[str], repeat: int, ok_codes=(0,)) -> float:
    best = math.inf
    for _ in range(repeat):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, *argv], env=child_env(TREE, tmp), capture_output=True, text=True,
                              cwd=tempfile.gettempdir())
        best = min(best, time.perf_counter() - started)
        if proc.returncode not in ok_codes:
            raise SystemExit(f"{argv} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return best


def bench_runner(task_counts: list[int], runners: list[str], tools: set, repeat: int) -> list[str]:
    """The runner and status tables (markdown lines) for each task count."""
    tmp = tempfile.mkdtemp(prefix="reinforge-bench-runner-")
    try:
        started = time.perf_counter()
        pool, uids = make_reshard_pool(tmp, max(task_counts))
        print(f"pool of {len(uids):,} samples generated in {time.perf_counter() - started:.1f} s", flush=True)
        runs: dict[tuple[str, int], dict] = {}
        if "status" in tools and "local" not in runners:  # status reads the finished local runs
            runners = runners + ["local"]
        for runner in runners:
            for tasks in task_counts:
                r = runs[runner, tasks] = run_reshard(TREE, tmp, pool, uids, tasks, runner)
                print(f"  {runner} {tasks:,} tasks: wall {r['wall']:.1f} s, task loop {r['loop']:.1f} s, "
                      f"{tasks / r['loop']:.1f} tasks/s (load {os.getloadavg()[0]:.1f})", flush=True)
        lines = []
        if "runner" in tools:
            lines += ["| runner | tasks | wall s (run_recipe) | prepare + plan + pool start + finish s | task loop s "
                      "| tasks/s (loop) | vs first size (goal >= 0.8) | marginal tasks/s vs previous size |",
                      "|---|---|---|---|---|---|---|---|"]
            for (runner, tasks), r in runs.items():
                rate = tasks / r["loop"]
                first = task_counts[0] / runs[runner, task_counts[0]]["loop"]
                i = task_counts.index(tasks)
                prev = runs[runner, task_counts[i - 1]] if i else None
                # what each extra task costs: the loop's fixed part (worker start-up) divides away
                marginal = f"{(tasks - task_counts[i - 1]) / (r['loop'] - prev['loop']):.1f}" if prev else ""
                lines.append(f"| {runner} | {tasks:,} | {r['wall']:.1f} | {r['wall'] - r['loop']:.1f} | "
                             f"{r['loop']:.1f} | {rate:.1f} | {rate / first:.2f} | {marginal} |")
        if "status" in tools:
            imports = best_wall(tmp, ["-c", "import reinforge.cli.main"], repeat)
            lines += ["", f"`python -c \"import reinforge.cli.main\"`: {imports:.2f} s (best of {repeat})", "",
                      "| run | tasks | `reinforge status` s | above import s (goal <= 1) |", "|---|---|---|---|"]
            for tasks in task_counts:
                seconds = best_wall(tmp, ["-m", "reinforge.cli.main", "status", runs["local", tasks]["out"]], repeat)
                lines.append(f"| local | {tasks:,} | {seconds:.2f} | {seconds - imports:.2f} |")
                print(f"  status {tasks:,} tasks: {seconds:.2f} s, {seconds - imports:.2f} s above imports", flush=True)
        return lines
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cases(tmp: str, n: int) -> list[tuple[str, str, dict]]:
    scores, splits = os.path.join(tmp, "scores"), os.path.join(tmp, "splits")
    rule = "basic & top(clip_l14, 0.3)"
    return [("filter", "filter apply (datacomp)", {"scores_dir": scores, "rule_text": rule,
                                                   "out": os.path.join(tmp, "dc.npy"), "semantics": "datacomp"}),
            ("filter", "filter apply (exact)", {"scores_dir": scores, "rule_text": rule,
                                                "out": os.path.join(tmp, "ex.npy"), "semantics": "exact"}),
            ("schedule", "schedule (cumulative-all)", {"splits_dir": splits, "policy": "cumulative-all",
                                                       "budget": n, "out_dir": os.path.join(tmp, "sched")}),
            ("splits", "splits (tic, from metadata)", {"inputs": [os.path.join(tmp, "metadata")],
                                                       "out_dir": os.path.join(tmp, "tic")})]


@contextlib.contextmanager
def size_folder(n: int):
    """The inputs' folder for size n: a fixed path (the plan files name the pool's paths, so equal outputs need
    equal paths across runs), locked, so a second bench run on the machine waits instead of deleting them."""
    import fcntl
    tmp = os.path.join(tempfile.gettempdir(), f"reinforge-bench-scale-{n}")
    with open(f"{tmp}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000000,4000000", help="comma-separated pool sizes (rows)")
    parser.add_argument("--tools", default="filter,schedule", help="filter, schedule, splits, reshard-plan, join-plan, "
                        "index, score, validate, runner, status")
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    parser.add_argument("--tree", default=ROOT, help="the reinforge source tree to measure (default: this one); "
                        "several, comma-separated, are measured one after the other on the same inputs "
                        "(rows labelled by the tree's folder name)")
    parser.add_argument("--blur-metadata", type=float, default=0.0, help="reshard-plan: also face boxes, from "
                        "generated blur metadata with boxes for this fraction of the uids (e.g. 0.2)")
    parser.add_argument("--tasks", default="1000,10000", help="runner/status: comma-separated task counts")
    parser.add_argument("--runners", default="local", help="runner: local and/or ray")
    parser.add_argument("--repeat", type=int, default=3, help="status: best of this many")
    args = parser.parse_args()
    global TREE
    trees = [os.path.abspath(t) for t in args.tree.split(",")]
    TREE = trees[0]
    sizes = [int(s) for s in args.sizes.split(",")]
    tools = set(args.tools.split(","))
    rows: dict[str, list] = {}
    if tools & {"runner", "status"}:
        lines = bench_runner([int(t) for t in args.tasks.split(",")], args.runners.split(","), tools, args.repeat)
        print("\n".join(lines))
        if args.out:
            with open(args.out, "a") as f:
                f.write("\n".join(lines) + "\n")
    if not tools & {"filter", "schedule", "splits", *PLAN_TOOLS, *INDEX_TOOLS, *RUNS_TOOLS}:
        return
    for n in sizes:
        with size_folder(n) as tmp:
            started = time.perf_counter()
            if "filter" in tools:
                make_scores(os.path.join(tmp, "scores"), n)
            if "schedule" in tools:
                make_splits(os.path.join(tmp, "splits"), n)
            if "splits" in tools:
                make_metadata(os.path.join(tmp, "metadata"), n)
            if tools & PLAN_TOOLS:
                make_plan_inputs(tmp, n, tools, args.blur_metadata)
            if tools & INDEX_TOOLS:
                make_index_inputs(tmp, n)
            if tools & RUNS_TOOLS:
                make_runs_inputs(TREE, tmp, n, tools)
            print(f"{n:,} rows: inputs generated in {time.perf_counter() - started:.1f} s", flush=True)
            all_cases = cases(tmp, n) + plan_cases(tmp, args.blur_metadata) + index_cases(tmp) + runs_cases(tmp, n)
            for (tool, label, kwargs), TREE in itertools.product(all_cases, trees):
                if tool not in tools:
                    continue
                if len(trees) > 1:
                    label = f"{label} [{os.path.basename(TREE)}]"
                if tool in PLAN_TOOLS:
                    r = measure_plan(TREE, tmp, kwargs)
                elif tool in INDEX_TOOLS:
                    r = measure_index(TREE, tmp, kwargs)
                elif tool in RUNS_TOOLS:
                    r = measure_runs(TREE, tmp, tool, kwargs, n)
                else:
                    r = measure(tool, kwargs)
                extra = r["peak"] - r["base"]
                rows.setdefault(label, []).append((n, extra, r["seconds"], r.get("digest", ""), r.get("cpu"),
                                                   r.get("cpu_workers")))
                if not r["tree"].startswith(TREE):
                    raise SystemExit(f"measured {r['tree']}, not {TREE}")
                cpu = f"cpu {r['cpu']:6.1f} s + workers {r.get('cpu_workers') or 0:.1f} s" if "cpu" in r else ""
                if "samples" in r:  # samples per CPU-second, driver and workers together
                    cpu += f" = {n / (r['cpu'] + r['cpu_workers']):,.0f} samples per CPU-s"
                print(f"  {label:28s} {extra / n:7.1f} B/sample  {r['seconds'] / n * 1e6:6.2f} s/M rows "
                      f"{r['seconds']:6.1f} s {cpu} {r.get('digest', '')[:16]} {r.get('recall', '')} "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    lines = ["| tool | rows | driver B/sample above imports | s per M rows | growth vs previous size "
             "| marginal B per extra sample | s | CPU s (driver) | CPU s (worker processes) | outputs sha256 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, results in rows.items():
        for i, (n, extra, seconds, digest, cpu, cpu_workers) in enumerate(results):
            growth = marginal = ""
            if i:
                pn, pe, *_ = results[i - 1]
                growth = f"{math.log(max(extra, 1) / max(pe, 1)) / math.log(n / pn):.2f}"
                marginal = f"{(extra - pe) / (n - pn):.1f}"
            lines.append(f"| {label} | {n:,} | {extra / n:.1f} | {seconds / n * 1e6:.2f} | {growth} | {marginal} "
                         f"| {seconds:.1f} | {'' if cpu is None else f'{cpu:.1f}'} "
                         f"| {'' if cpu_workers is None else f'{cpu_workers:.1f}'} | {digest[:16]} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
