"""bench/scale.py's `index` tool (issue #16): `build_index` (IVF-PQ + fp16 refine, the default ivf_pq) over
n synthetic 256-d embeddings, the driver's peak RSS above its imports.

Inputs per size n, generated once and not timed: n clustered unit vectors (4,096 random centres plus noise)
as reinforge embeddings files (fp16, 100,000 rows a file, random uids). The spec fixes nlist 1,024 and a
50,000-vector training sample so that training stays small on 2 cores; groups: the default, one per 250k
vectors. From 64Ki vectors on, pass 1, the training, the groups and the recall run as tasks on this
machine's worker processes, one group included (the driver holds the sample's keys, 16 bytes a row, and
one slab of the merge); trees before that trained on the driver and built one group there, more on an
embedded Ray. Each cell runs in a fresh process: imports (numpy, pyarrow, faiss, ray, the index
module) before the baseline RSS; build_index timed (wall, the driver's CPU seconds, and its reaped child
processes' CPU seconds: the worker processes, or the embedded Ray's processes that were waited for); then
VmHWM. After that (not timed) the child hashes index.faiss, uids.npy and index.json without its timings
(the `outputs sha256` column: byte-identical before/after).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

INDEX_TOOLS = {"index"}
DIM, PER_FILE, CENTRES = 256, 100_000, 4096
SPEC = {"kind": "ivf_pq", "nlist": 1024, "train_size": 50_000}

INDEX_CHILD = r"""
import hashlib, json, os, resource, sys, time
import numpy as np, pyarrow, pyarrow.parquet, faiss, ray
from reinforge.curation.index import IndexSpec, build_index
import reinforge.runtime.ray_session
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
args = json.loads(sys.argv[1])
spec = IndexSpec(**args["spec"])
base = rss()
cpu0 = resource.getrusage(resource.RUSAGE_SELF)
kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
start = time.perf_counter()
meta = build_index(args["source"], args["out"], spec)
seconds = time.perf_counter() - start
cpu1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu_workers = kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
with open("/proc/self/status") as f:
    peak = int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024
digest = hashlib.sha256()
for name in ("index.faiss", "uids.npy"):
    h = hashlib.sha256()
    with open(os.path.join(args["out"], name), "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    digest.update(f"{name}\0{h.hexdigest()}\n".encode())
for timed in (meta, meta["recall"]):
    timed.pop("seconds")
digest.update(json.dumps(meta, sort_keys=True).encode())
import reinforge
print(json.dumps({"base": base, "peak": peak, "seconds": seconds, "cpu": cpu, "cpu_workers": cpu_workers,
                  "digest": digest.hexdigest(),
                  "tree": os.path.dirname(reinforge.__file__), "recall": meta["recall"]}))
"""


def make_index_inputs(tmp: str, n: int) -> None:
    """n clustered unit vectors of DIM as embeddings files of PER_FILE rows."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from reinforge.formats.embeddings import embeddings_table, table_bytes
    rng = np.random.default_rng(17)
    centres = rng.standard_normal((CENTRES, DIM)).astype(np.float32)
    folder = os.path.join(tmp, "embeddings")
    os.makedirs(folder, exist_ok=True)
    for f, start in enumerate(range(0, n, PER_FILE)):
        m = min(PER_FILE, n - start)
        x = centres[rng.integers(0, CENTRES, m)] + 0.5 * rng.standard_normal((m, DIM), np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        text = rng.bytes(16 * m).hex()
        uids = [text[32 * i:32 * (i + 1)] for i in range(m)]
        with open(os.path.join(folder, f"{f:05d}.parquet"), "wb") as out:
            out.write(table_bytes(embeddings_table(uids, ["0" * 64] * m, x, None, {})))


def index_cases(tmp: str) -> list[tuple[str, str, dict]]:
    return [("index", "index (ivf_pq + fp16 refine, 256 d)",
             {"source": os.path.join(tmp, "embeddings"), "out": os.path.join(tmp, "index-out"), "spec": SPEC})]


def measure_index(tree: str, tmp: str, args: dict) -> dict:
    import shutil
    shutil.rmtree(args["out"], ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=tree, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", INDEX_CHILD, json.dumps(args)], env=env, capture_output=True,
                          text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise SystemExit(f"index build failed: {proc.stderr[-3000:]}")
    shutil.rmtree(args["out"], ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])
