"""A parallel index build streams its groups' parts into the files a one-group build writes, byte for byte."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from reinforge.curation.index import IndexSpec, build_index, load_index
from reinforge.curation.index_sample import complete, fold_samples, key_bound, sample_group
from reinforge.formats.embeddings import embeddings_table, resolve_paths, table_bytes
from reinforge.io.manifest import TMP_MARKER

pytestmark = pytest.mark.ray
DIM = 32


def write_pool(folder, files: int, rows: int, distinct: int | None = None, seed: int = 0, padding: int = 0) -> str:
    """Clustered unit vectors in `files` embeddings files; `distinct`: only that many different vectors;
    `padding`: that many zero vectors (unusable rows, uids of their own) after each row."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((12, DIM))
    os.makedirs(folder)
    for f in range(files):
        x = centers[rng.integers(0, len(centers), rows)] + 0.4 * rng.standard_normal((rows, DIM))
        if distinct:
            x = x[rng.integers(0, distinct, rows) % rows]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        uids = [hashlib.md5(f"{seed}-{f}-{i}".encode()).hexdigest() for i in range(rows)]
        if padding:
            x = np.concatenate([x[:, None], np.zeros((rows, padding, DIM))], axis=1).reshape(-1, DIM)
            pads = [[hashlib.md5(f"pad-{seed}-{f}-{i}-{j}".encode()).hexdigest() for j in range(padding)]
                    for i in range(rows)]
            uids = [u for uid, pad in zip(uids, pads) for u in [uid] + pad]
        with open(os.path.join(folder, f"{f:03d}.parquet"), "wb") as out:
            out.write(table_bytes(embeddings_table(uids, ["0" * 64] * len(uids), x, None, {})))
    return str(folder)


def outputs(folder) -> tuple[bytes, bytes, dict]:
    meta = json.loads((folder / "index.json").read_text())
    for timed in (meta, meta["recall"]):
        timed.pop("seconds")
    meta.pop("groups")
    meta["config"].pop("groups")
    return (folder / "index.faiss").read_bytes(), (folder / "uids.npy").read_bytes(), meta


@pytest.fixture(scope="module")
def pools(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("index-merge")
    return {"clustered": write_pool(root / "clustered", 5, 700),
            # 6 different vectors: most of 64 lists stay empty, so faiss stores the sizes as sparse pairs
            "duplicates": write_pool(root / "duplicates", 4, 200, distinct=6, seed=1)}


@pytest.mark.parametrize("pool, spec", [
    ("clustered", {"kind": "ivf_pq"}),  # + fp16 refine (the default)
    ("clustered", {"kind": "ivf_pq", "refine": None}),
    ("clustered", {"kind": "ivf_flat"}),
    ("clustered", {"kind": "flat"}),
    ("duplicates", {"kind": "ivf_flat", "nlist": 64, "train_size": 256}),
])
def test_parallel_build_writes_the_one_group_bytes(pools, tmp_path, pool, spec):
    one = tmp_path / "one"
    build_index(pools[pool], str(one), IndexSpec(groups=1, **spec))
    three = tmp_path / "three"
    meta = build_index(pools[pool], str(three), IndexSpec(groups=3, **spec))
    assert meta["groups"] == 3
    assert outputs(three) == outputs(one)  # index.faiss, uids.npy, index.json (recall included) but timings
    assert sorted(os.listdir(three)) == ["index.faiss", "index.json", "uids.npy"]  # the parts are gone
    assert not any(name.startswith(TMP_MARKER) for name in os.listdir(three))
    if spec.get("nlist") == 64:
        assert b"sprs" in (three / "index.faiss").read_bytes()
    a, b = load_index(str(one)), load_index(str(three))
    x = np.random.default_rng(5).standard_normal((20, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for got, want in zip(b.search(x, 5), a.search(x, 5)):
        assert np.array_equal(got, want)


def test_the_bytes_do_not_depend_on_where_the_tasks_run(pools, tmp_path):
    """Inline, on worker processes and on Ray (the training task uses the driver's faiss threads); the small
    sample (350 of 3,500 rows) makes pass 1 keep only the rows under a key bound."""
    spec = IndexSpec(kind="ivf_pq", groups=3, train_size=300, recall_queries=50)
    built = {}
    for where in ("inline", "processes", "ray"):
        build_index(pools["clustered"], str(tmp_path / where), spec, where=where)
        built[where] = outputs(tmp_path / where)
    assert built["processes"] == built["inline"] and built["ray"] == built["inline"]


def sample_is_complete(pool: str, spec: IndexSpec, scratch: str) -> bool:
    """Whether pass 1 under the key bound build_index picks (from the raw rows) finds the whole sample."""
    files, keep = resolve_paths(pool), spec.recall_queries + spec.train_size
    bound = key_bound(keep, sum(pq.ParquetFile(f).metadata.num_rows for f in files))
    assert bound < 1
    return complete(fold_samples([sample_group(files, 0, scratch, None, spec.seed, keep, bound)], files, keep), keep)


def test_a_key_bound_too_tight_falls_back_to_the_unbounded_sample(tmp_path):
    """Nine unusable rows after each usable one: too few rows pass the key bound picked from the raw row
    counts, so pass 1 runs again without it; the index is that of the same usable rows without the padding
    (their keys, hence the sample, do not depend on unusable rows), whose pass 1 kept only rows under the bound."""
    spec = IndexSpec(kind="ivf_pq", nlist=8, train_size=256, recall_queries=20, groups=2, seed=3)
    plain = write_pool(tmp_path / "plain", 4, 400, seed=2)
    padded = write_pool(tmp_path / "padded", 4, 400, seed=2, padding=9)
    assert sample_is_complete(plain, spec, str(tmp_path / "plain.npy"))
    assert not sample_is_complete(padded, spec, str(tmp_path / "padded.npy"))
    metas = [build_index(pool, str(tmp_path / f"index-{i}"), spec) for i, pool in enumerate((plain, padded))]
    assert metas[1]["skipped_rows"] == {"zero_vector": 4 * 400 * 9}
    got = [outputs(tmp_path / f"index-{i}") for i in range(2)]
    for meta in (got[0][2], got[1][2]):
        for differs in ("source", "skipped_rows", "skipped_sample"):
            meta.pop(differs)
    assert got[1] == got[0]
