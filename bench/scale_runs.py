"""bench/scale.py's tools that run over many samples: `filter score` on metadata Parquet and `validate` of a
finished reshard run (issue #16), plus the reshard runs (pool, RUN_CHILD) that `runner`/`status` share.

Inputs per size n, generated once and not timed:
  score      DataComp-like metadata (bench/filters.py's generator: uid, text of 3-14 words in five languages,
             original_width/height, clip_b32/l14 similarity scores) in one Parquet file of 128k-row groups.
             score_metadata (what `reinforge filter score` calls), no --clusters, unit_rows = one row group,
             so every size runs several units as tasks: on this machine's worker processes (TaskMap; each
             unit writes its own part of the scores), or on an embedded local Ray in trees before that
             (whose driver RSS includes the Ray client and the units' tables in flight). Imports (numpy,
             pyarrow, pandas, ray, the scores module) and the driver's word lists (synset lemmas, WordNet
             offsets, read once after scoring) are loaded before the baseline RSS.
             CPU: the driver's own, and its descendants' (worker processes, or raylet, GCS and Ray workers:
             utime + stime read from /proc every 0.5 s while the call runs, the last reading per process
             kept, so only the last half second of each is missed).
  validate   a pool of n tiny samples (RUN_CHILD's pool: 100 tars, 256-byte jpg + txt + json) resharded
             whole (subset = every uid, samples_per_shard 10,000: n / 10,000 tasks, local runner); then
             validate_run (what `reinforge validate RUN` calls) with workers = the CPU count (what the CLI's
             default picks for runs of 1 GiB or more; fixed here so every size checks on worker processes).
             CPU: the driver's own and its worker processes' (RUSAGE_CHILDREN: they are reaped by then).
Each cell runs in a fresh process and reports the base RSS after imports, VmHWM after the call, wall and CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUNS_TOOLS = {"score", "validate"}
ROW_GROUP = 128 * 1024
VALIDATE_PER_SHARD = 10_000

# A child runs one recipe: wall time of run_recipe, and its task loop alone (RunSummary.seconds).
RUN_CHILD = r"""
import json, sys, time
from reinforge.products.registry import parse_recipe
from reinforge.runtime.runner import run_recipe
recipe = parse_recipe(json.loads(sys.argv[1]))
start = time.perf_counter()
s = run_recipe(recipe, progress=False)
wall = time.perf_counter() - start
print(json.dumps({"wall": wall, "loop": s.seconds, "tasks": s.tasks, "done": s.done, "failed": len(s.failed)}))
"""

# A child measures one call of score_metadata or validate_run: base RSS after imports, VmHWM after the call.
RUNS_CHILD = r"""
import json, os, resource, sys, threading, time
import numpy as np, pyarrow, pyarrow.parquet
import pandas
tool, args = sys.argv[1], json.loads(sys.argv[2])
if tool == "score":
    import ray
    from reinforge.curation.filters.scores import ScoreOptions, score_metadata
    from reinforge.curation.filters.text import synset_lemmas
    from reinforge.curation.filters.wordnet import imagenet21k_offsets
    import reinforge.runtime.ray_session
    synset_lemmas(), imagenet21k_offsets()  # cached word lists the report reads: loaded once, like imports
    call = lambda: score_metadata(args["inputs"], args["out"], ScoreOptions(), args["unit_rows"])
else:
    from reinforge.ops.rundir import validate_run
    call = lambda: validate_run(args["run"], args["workers"])
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
descendants, running = {}, True
def watch():  # CPU seconds of every descendant process (Ray's are not reaped by this process)
    tick = os.sysconf("SC_CLK_TCK")
    while running:
        parents, cpu = {}, {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            parents[int(pid)] = int(fields[1])
            cpu[int(pid)] = (int(fields[11]) + int(fields[12])) / tick
        for pid in cpu:
            p = pid
            while p in parents and p != os.getpid():
                p = parents[p]
            if p == os.getpid() and pid != p:
                descendants[pid] = max(descendants.get(pid, 0), cpu[pid])
        time.sleep(0.5)
base = rss()
watcher = threading.Thread(target=watch, daemon=True)
if tool == "score":
    watcher.start()
cpu0 = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
result = call()
seconds = time.perf_counter() - start
cpu1 = resource.getrusage(resource.RUSAGE_SELF)
running = False
cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
if tool == "score":
    watcher.join()
    cpu_workers, samples, problems = sum(descendants.values()), result["scored"], []
else:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_workers = kids.ru_utime + kids.ru_stime
    samples, problems = result
with open("/proc/self/status") as f:
    peak = int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024
import reinforge
print(json.dumps({"base": base, "peak": peak, "seconds": seconds, "cpu": cpu, "cpu_workers": cpu_workers,
                  "samples": samples, "problems": problems[:5], "tree": os.path.dirname(reinforge.__file__)}))
"""


def child_env(tree: str, tmp: str) -> dict:
    return dict(os.environ, PYTHONPATH=tree, HF_HUB_OFFLINE="1", REINFORGE_INDEX_CACHE=os.path.join(tmp, "cache"))


def make_reshard_pool(tmp: str, samples: int, shards: int = 100, payload: int = 256) -> tuple[str, np.ndarray]:
    """A DataComp-style pool of `samples` tiny samples in `shards` tars; returns its glob and sorted uids."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)
    from pool_gen import random_uids, write_pool_shards

    from reinforge.formats.subset import make_subset, uid_order
    strings, hi, lo = random_uids(samples, np.random.default_rng(7))
    folder = os.path.join(tmp, "tiny-pool")  # not "pool": reshard-plan's placeholder pool may share tmp
    write_pool_shards(folder, strings.to_pylist(), -(-samples // shards), payload=payload)
    uids = make_subset(hi, lo)
    return os.path.join(folder, "*.tar"), uids[uid_order(uids["f0"], uids["f1"])]


def run_reshard(tree: str, tmp: str, pool: str, uids: np.ndarray, count: int, runner: str,
                samples_per_shard: int = 1) -> dict:
    """Reshard `count` uids spread over the pool in shards of `samples_per_shard`, in a fresh process."""
    from reinforge.formats.subset import write_subset
    tasks = -(-count // samples_per_shard)
    subset = os.path.join(tmp, f"subset-{count}.npy")
    write_subset(subset, uids[np.linspace(0, len(uids) - 1, count).astype(np.int64)])
    out = os.path.join(tmp, f"run-{runner}-{count}")
    recipe = {"product": "reshard", "output": out, "subset": subset, "input": {"path": pool},
              "samples_per_shard": samples_per_shard, "resources": {"runner": runner}}
    proc = subprocess.run([sys.executable, "-c", RUN_CHILD, json.dumps(recipe)], env=child_env(tree, tmp),
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise SystemExit(f"reshard run failed: {proc.stderr[-2000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if r["done"] != tasks or r["failed"]:
        raise SystemExit(f"expected {tasks} done tasks, got {r}")
    return {**r, "out": out}


def make_runs_inputs(tree: str, tmp: str, n: int, tools: set) -> None:
    """score: the metadata file; validate: the pool and its finished reshard run."""
    if "score" in tools:
        import pyarrow.parquet as pq
        sys.path.insert(0, HERE)
        from filters import metadata
        os.makedirs(os.path.join(tmp, "score-metadata"))
        pq.write_table(metadata(n, np.random.default_rng(3)),
                       os.path.join(tmp, "score-metadata", "00000000.parquet"), row_group_size=ROW_GROUP)
    if "validate" in tools:
        pool, uids = make_reshard_pool(tmp, n)
        r = run_reshard(tree, tmp, pool, uids, n, "local", VALIDATE_PER_SHARD)
        print(f"  reshard of {n:,} samples into {r['tasks']:,} tasks: {r['wall']:.1f} s", flush=True)


def runs_cases(tmp: str, n: int) -> list[tuple[str, str, dict]]:
    return [("score", "filter score (no clusters, units of 128k rows)",
             {"inputs": [os.path.join(tmp, "score-metadata")], "out": os.path.join(tmp, "scores-out"),
              "unit_rows": ROW_GROUP}),
            ("validate", "validate (reshard run, 10k samples/task)",
             {"run": os.path.join(tmp, f"run-local-{n}"), "workers": os.cpu_count() or 1})]


def measure_runs(tree: str, tmp: str, tool: str, args: dict, n: int) -> dict:
    import shutil
    proc = subprocess.run([sys.executable, "-c", RUNS_CHILD, tool, json.dumps(args)], env=child_env(tree, tmp),
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise SystemExit(f"{tool} failed: {proc.stderr[-3000:]}")
    if "out" in args:
        shutil.rmtree(args["out"], ignore_errors=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if r["samples"] != n or r["problems"]:
        raise SystemExit(f"{tool}: expected {n:,} samples and no problems, got {r['samples']:,}, {r['problems']}")
    return r
