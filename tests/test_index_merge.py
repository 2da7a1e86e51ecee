"""A parallel index build streams its groups' parts into the files a one-group build writes, byte for byte."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from reinforge.curation.index import IndexSpec, build_index, load_index
from reinforge.formats.embeddings import embeddings_table, table_bytes
from reinforge.io.manifest import TMP_MARKER

pytestmark = pytest.mark.ray
DIM = 32


def write_pool(folder, files: int, rows: int, distinct: int | None = None, seed: int = 0) -> str:
    """Clustered unit vectors in `files` embeddings files; `distinct`: only that many different vectors."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((12, DIM))
    os.makedirs(folder)
    for f in range(files):
        x = centers[rng.integers(0, len(centers), rows)] + 0.4 * rng.standard_normal((rows, DIM))
        if distinct:
            x = x[rng.integers(0, distinct, rows) % rows]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        uids = [hashlib.md5(f"{seed}-{f}-{i}".encode()).hexdigest() for i in range(rows)]
        with open(os.path.join(folder, f"{f:03d}.parquet"), "wb") as out:
            out.write(table_bytes(embeddings_table(uids, ["0" * 64] * rows, x, None, {})))
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
