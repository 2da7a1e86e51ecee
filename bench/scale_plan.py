"""bench/scale.py's planning tools (issue #16): `reshard` and `join` planning, i.e. pipeline.prepare(layout),
everything up to and including committing plan/ (and the files beside the shards), with a cached uid index.

Inputs per size n, generated once and not timed:
  pool           n samples in ceil(n / 10,000) `{:08d}.tar` files that are sparse placeholders (a size and an
                 mtime, no bytes): their uid indexes are written straight into the index cache
                 ($REINFORGE_INDEX_CACHE) under the key load_or_build looks up, so planning reads the cached
                 index as it would for a real pool indexed before (img2dataset keys, offsets of ~3 KB samples)
  reshard plan   subset = every pool uid once (n output samples in 10,000-sample shards, seed 0)
  join plan      reinforcement shards = the same n uids shuffled into ceil(n / 10,000) other placeholder shards
                 (their indexes cached too), every one found in the pool
  face boxes     (--blur-metadata F) the reshard plan also reads blur metadata: every pool uid once, shuffled, in
                 ceil(n / 1M) parquet files of 128k-row groups (uid, face_bboxes), a fraction F of the rows with
                 1-3 boxes and the rest empty lists; the plan writes the boxes into the task files
                 (inject_blur_metadata)
Each cell runs in a fresh process: imports (numpy, pyarrow, pandas, the product's pipeline) and the recipe
parsed before the baseline RSS; then prepare() timed (wall, and CPU seconds of all its threads: on a shared,
loaded machine the CPU time says more than the wall time); then VmHWM. After that (not timed) the child hashes every
file the run folder holds (plan/, shards/ run files, dr_config.json), so a before/after pair shows whether the
outputs stayed byte-identical (the `outputs sha256` column).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

PER_SHARD = 10_000
PLAN_TOOLS = {"reshard-plan", "join-plan"}

PLAN_CHILD = r"""
import hashlib, json, os, resource, sys, time
import numpy as np, pyarrow, pyarrow.parquet
import pandas
from reinforge.io.manifest import RunLayout
from reinforge.products.registry import parse_recipe
from reinforge.runtime.pipeline import build_pipeline
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
recipe = parse_recipe(json.loads(sys.argv[1]))
pipeline = build_pipeline(recipe)
layout = RunLayout(recipe.output.rstrip("/"))
base = rss()
cpu0 = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
pipeline.prepare(layout)
seconds = time.perf_counter() - start
cpu1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime  # every thread's: robust to a loaded machine
kids = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu_workers = kids.ru_utime + kids.ru_stime  # worker processes prepare() ran its passes on (reaped by now)
with open("/proc/self/status") as f:
    peak = int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024
digest = hashlib.sha256()
for folder, dirs, files in sorted(os.walk(recipe.output)):
    dirs.sort()
    for name in sorted(files):
        path = os.path.join(folder, name)
        relative = os.path.relpath(path, recipe.output)
        if relative == "plan/inputs.json":  # the versions (mtimes) of the files read: differs run to run
            continue
        with open(path, "rb") as f:
            data = f.read()
        if relative == "plan/plan.json":  # compared without its fingerprint, whose definition changed in #16
            data = json.dumps({k: v for k, v in json.loads(data).items() if k != "fingerprint"}).encode()
        digest.update(f"{relative}\0{hashlib.sha256(data).hexdigest()}\n".encode())
import reinforge
print(json.dumps({"base": base, "peak": peak, "seconds": seconds, "cpu": cpu, "cpu_workers": cpu_workers, "digest": digest.hexdigest(),
                  "tree": os.path.dirname(reinforge.__file__)}))
"""


def _keys(first: int, m: int):
    """img2dataset's keys: 9 digits, shard number then position."""
    import pyarrow as pa
    numbers = np.arange(first, first + m, dtype=np.int64)
    digits = (numbers[:, None] // 10 ** np.arange(8, -1, -1)) % 10
    text = (digits + ord("0")).astype(np.uint8).tobytes()
    return pa.StringArray.from_buffers(m, pa.py_buffer(np.arange(0, 9 * m + 1, 9, dtype=np.int32).tobytes()),
                                       pa.py_buffer(text))


def write_cached_shards(folder: str, cache: str, hi: np.ndarray, lo: np.ndarray, seed: int) -> str:
    """Placeholder pool shards of PER_SHARD samples each and their uid indexes in the cache; returns the glob."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from reinforge.formats.uid_index import _META_KEY, INDEX_FORMAT, index_key
    from reinforge.io.fingerprint import file_versions
    os.makedirs(folder, exist_ok=True)
    os.makedirs(cache, exist_ok=True)
    rng = np.random.default_rng(seed)
    starts = range(0, len(hi), PER_SHARD)
    urls = [os.path.join(folder, f"{s:08d}.tar") for s in range(len(starts))]
    lengths = {}
    for url, start in zip(urls, starts):
        m = min(PER_SHARD, len(hi) - start)
        lengths[url] = rng.integers(2048, 4096, m).astype(np.int64)
        with open(url, "wb") as f:
            f.truncate(int(lengths[url].sum()) + 1024)  # sparse: the size a real shard would have
    versions = file_versions(urls)
    for s, (url, start) in enumerate(zip(urls, starts)):
        m = len(lengths[url])
        size, version = versions[url]
        identity = {"url": url, "size": size, "version": version, "uid_field": "uid", "format": INDEX_FORMAT}
        offsets = np.r_[0, np.cumsum(lengths[url])[:-1]]
        table = pa.table({"uid_hi": hi[start:start + m], "uid_lo": lo[start:start + m], "offset": offsets,
                          "length": lengths[url], "position": np.arange(m, dtype=np.int32),
                          "status": np.zeros(m, np.int8), "key": _keys(s * 10_000, m)})
        table = table.replace_schema_metadata({_META_KEY: json.dumps(identity, sort_keys=True).encode()})
        pq.write_table(table, os.path.join(cache, f"{index_key(url, size, version, 'uid')}.parquet"))
    return os.path.join(folder, "*.tar")


def write_blur_metadata(folder: str, hi: np.ndarray, lo: np.ndarray, fraction: float, seed: int = 5) -> None:
    """DataComp-like blur metadata for the given uids (shuffled): a `fraction` of them with 1-3 face boxes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(hi))
    per_file = 1 << 20
    for f, start in enumerate(range(0, len(hi), per_file)):
        rows = order[start:start + per_file]
        text = np.stack([hi[rows], lo[rows]], axis=1).astype(">u8").tobytes().hex().encode()
        uids = pa.StringArray.from_buffers(len(rows), pa.py_buffer(np.arange(0, 32 * len(rows) + 1, 32,
                                                                             dtype=np.int32).tobytes()),
                                           pa.py_buffer(text))
        boxes = np.where(rng.random(len(rows)) < fraction, rng.integers(1, 4, len(rows)), 0)
        corners = np.sort(rng.random((int(boxes.sum()), 2, 2)), axis=1).reshape(-1)  # x0, y0, x1, y1
        inner = pa.ListArray.from_arrays(pa.array(np.arange(0, len(corners) + 1, 4, dtype=np.int32)), pa.array(corners))
        column = pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(boxes)].astype(np.int32)), inner)
        pq.write_table(pa.table({"uid": uids, "face_bboxes": column}), os.path.join(folder, f"{f:05d}.parquet"),
                       row_group_size=128 << 10)


def make_plan_inputs(tmp: str, n: int, tools: set, blur: float = 0.0) -> None:
    """The pool (and, for join, reinforcement shards and a trainer config) of n uids, indexes cached; with
    `blur`, blur metadata for the pool's uids."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from reinforge.formats.subset import make_subset, uid_order, write_subset
    rng = np.random.default_rng(11)
    hi, lo = (rng.integers(0, 2**64, n, np.uint64, endpoint=False) for _ in range(2))
    cache = os.path.join(tmp, "cache")
    write_cached_shards(os.path.join(tmp, "pool"), cache, hi, lo, 1)
    if "reshard-plan" in tools:
        uids = make_subset(hi, lo)
        write_subset(os.path.join(tmp, "subset.npy"), uids[uid_order(hi, lo)])
        if blur:
            write_blur_metadata(os.path.join(tmp, "blur-metadata"), hi, lo, blur)
    if "join-plan" in tools:
        perm = rng.permutation(n)
        write_cached_shards(os.path.join(tmp, "reinforcement"), cache, hi[perm], lo[perm], 2)
        with open(os.path.join(tmp, "dr_config.json"), "w") as f:
            json.dump({"reinforce": {"image_augmentation": {}}}, f)


def plan_cases(tmp: str, blur: float = 0.0) -> list[tuple[str, str, dict]]:
    pool = os.path.join(tmp, "pool", "*.tar")
    boxes = {"blur_metadata": [os.path.join(tmp, "blur-metadata")], "inject_blur_metadata": True} if blur else {}
    return [("reshard-plan", f"reshard planning (subset = pool{f', face boxes {blur:.0%}' if blur else ''})",
             {"product": "reshard", "output": os.path.join(tmp, "reshard-out"),
              "subset": os.path.join(tmp, "subset.npy"), "input": {"path": pool}, **boxes}),
            ("join-plan", "join planning",
             {"product": "join", "output": os.path.join(tmp, "join-out"),
              "input": {"path": os.path.join(tmp, "reinforcement", "*.tar"),
                        "dr_config": os.path.join(tmp, "dr_config.json")}, "images": {"path": pool}})]


def measure_plan(tree: str, tmp: str, recipe: dict) -> dict:
    import shutil
    shutil.rmtree(recipe["output"], ignore_errors=True)  # a fresh run each time: prepare writes everything
    env = dict(os.environ, PYTHONPATH=tree, HF_HUB_OFFLINE="1", REINFORGE_INDEX_CACHE=os.path.join(tmp, "cache"))
    proc = subprocess.run([sys.executable, "-c", PLAN_CHILD, json.dumps(recipe)], env=env, capture_output=True,
                          text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise SystemExit(f"{recipe['product']} planning failed: {proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(recipe["output"], ignore_errors=True)
    return result
