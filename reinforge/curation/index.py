"""A faiss inner-product index over pool embeddings (unit vectors, so inner product = cosine).

Kinds: `flat` (exact), `ivf_flat`, `ivf_pq`, `hnsw`; `auto` is exact below `exact_below` vectors,
else IVF-PQ. IVF-PQ re-ranks k_factor*k candidates on fp16 copies of the vectors by default (PQ
distances alone cap recall@10 near 0.76 on clustered 512-d data; the IVF probe then sets it).
IVF and PQ are trained on a seeded sample that excludes the recall queries. The driver reads only
that sample and the queries: IVF and flat indexes are built per shard group in parallel (Ray tasks
add their group's files, one at a time, to copies of the trained empty index, write it to a part file
in `.tmp-parts/` of the output, and find the queries' exact neighbours among them for recall); the
driver streams the parts, merged in group order with id offsets, into index.faiss (index_parts), which
gives the same inverted lists, hence the same bytes, as a serial build, and never holds the index
(recall is measured by a task on the written file, memory-mapped). HNSW graphs cannot be merged and are
built in one thread (faiss' parallel HNSW insertion depends on thread timing).

Saved as `index/index.faiss`, `index/index.json` (config, ntotal, dim, metric, search parameters,
recall@k vs exact) and `index/uids.npy` (u8,u8 in faiss id order: row i is faiss id i).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
from pydantic import Field, ValidationError

from reinforge.curation.index_parts import PartFiles, layout_of, write_merged_index, write_merged_uids, write_part
from reinforge.formats.embeddings import EmbeddingError, count_rows, iter_embeddings, merge_skipped, resolve_paths
from reinforge.formats.recipe import ConfigError, Strict, format_validation_error
from reinforge.formats.subset import SUBSET_DTYPE
from reinforge.io.manifest import TMP_MARKER, join
from reinforge.io.storage import filesystem, read_text, remove_tree, write_bytes

FORMAT = "reinforge.index/1"


class IndexSpec(Strict):
    kind: Literal["auto", "flat", "ivf_flat", "ivf_pq", "hnsw"] = "auto"
    key: Optional[str] = Field(None, description="embedding column / npz key (default image_emb, or l14_img)")
    exact_below: int = Field(20000, ge=0, description="auto: exact search below this many vectors")
    nlist: Optional[int] = Field(None, ge=1, description="IVF lists; default 4*sqrt(n), at most n/39")
    nprobe: Optional[int] = Field(None, ge=1, description="IVF lists searched; default nlist/8, at least 16")
    pq_m: Optional[int] = Field(None, ge=1, description="PQ sub-quantizers; default the largest divisor of dim <= dim/4")
    pq_bits: int = Field(8, ge=4, le=12)
    refine: Optional[Literal["fp16", "sq8", "flat"]] = Field(
        "fp16", description="ivf_pq: re-rank k_factor*k PQ candidates exactly on vectors stored at this "
        "precision (faiss IndexRefine; fp16 adds 2*dim bytes per vector); null: PQ distances only")
    k_factor: int = Field(4, ge=1, description="ivf_pq with refine: candidates re-ranked per result")
    hnsw_m: int = Field(32, ge=4)
    ef_construction: int = Field(80, ge=8)
    ef_search: int = Field(128, ge=8)
    train_size: int = Field(100_000, ge=256, description="vectors in the seeded training sample")
    groups: Optional[int] = Field(None, ge=1, description="parallel build groups; default one per 250k vectors")
    recall_queries: int = Field(1000, ge=1)
    recall_k: int = Field(10, ge=1)
    seed: int = 0


def parse_index_spec(raw: dict) -> IndexSpec:
    try:
        return IndexSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc).replace("config error: ", "config error: index.")) from None


@dataclass
class Plan:
    kind: str
    factory: str
    search: dict  # faiss ParameterSpace name -> value
    refine: Optional[dict] = None


def plan_index(spec: IndexSpec, n: int, dim: int) -> Plan:
    kind = spec.kind if spec.kind != "auto" else ("flat" if n < spec.exact_below else "ivf_pq")
    if kind == "flat":
        return Plan(kind, "Flat", {})
    if kind == "hnsw":
        return Plan(kind, f"HNSW{spec.hnsw_m},Flat", {"efSearch": spec.ef_search})
    nlist = spec.nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))
    nprobe = min(nlist, spec.nprobe or max(16, nlist // 8))
    if kind == "ivf_flat":
        return Plan(kind, f"IVF{nlist},Flat", {"nprobe": nprobe})
    m = spec.pq_m or max(d for d in range(1, dim // 4 + 1) if dim % d == 0)
    if dim % m:
        raise ConfigError(f"config error: index.pq_m: {m} does not divide the embedding dim {dim}")
    if spec.refine is None:
        return Plan(kind, f"IVF{nlist},PQ{m}x{spec.pq_bits}", {"nprobe": nprobe})
    refine = {"fp16": "SQfp16", "sq8": "SQ8", "flat": "Flat"}[spec.refine]
    return Plan(kind, f"IVF{nlist},PQ{m}x{spec.pq_bits},Refine({refine})", {"nprobe": nprobe, "k_factor_rf": spec.k_factor},
                {"vectors": spec.refine, "k_factor": spec.k_factor})


def serialize(index) -> bytes:
    import faiss
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes):
    import faiss
    return faiss.deserialize_index(np.frombuffer(data, np.uint8))


def set_search_parameters(index, search: dict) -> None:
    import faiss
    space = faiss.ParameterSpace()
    for name, value in search.items():
        space.set_index_parameter(index, name, value)


@contextlib.contextmanager
def _omp_threads(n: Optional[int]):
    """faiss' OpenMP threads set to n for a block (None: unchanged)."""
    import faiss
    before = faiss.omp_get_max_threads()
    if n:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def shard_groups(file_rows: list[int], groups: int) -> list[list[int]]:
    """Contiguous runs of file numbers with about equal rows each (files are never split)."""
    total, out, current, acc = sum(file_rows), [], [], 0
    for i, rows in enumerate(file_rows):
        current.append(i)
        acc += rows
        if acc >= total * (len(out) + 1) / groups and len(out) < groups - 1:
            out.append(current)
            current = []
    return out + ([current] if current else [])


def _sample_group(files: list[str], first_file: int, key: Optional[str], seed: int, keep: int) -> dict:
    """Pass 1 on a worker: usable rows per file, and the group's `keep` rows with the smallest seeded
    random keys. A row's key depends only on (seed, file number, row), so the pool-wide sample (the
    smallest keys of all groups) does not depend on how files are grouped."""
    rows, parts, keys, where = [], [], np.zeros(0), np.zeros((0, 2), np.int64)
    vectors, dim, used_key = None, None, None
    for j, emb in enumerate(iter_embeddings(files, key)):
        n = len(emb.vectors)
        rows.append(n)
        parts.append({"skipped": emb.skipped, "skipped_sample": emb.skipped_sample})
        dim, used_key = dim or emb.dim, used_key or emb.key
        file_keys = np.random.default_rng([seed, first_file + j]).random(n)
        cand = np.flatnonzero(file_keys <= np.sort(file_keys)[keep - 1]) if n > keep else np.arange(n)
        keys = np.concatenate([keys, file_keys[cand]])
        where = np.concatenate([where, np.stack([np.full(len(cand), first_file + j), cand], axis=1)])
        vectors = emb.vectors[cand] if vectors is None else np.concatenate([vectors, emb.vectors[cand]])
        best = np.lexsort((where[:, 1], where[:, 0], keys))[:keep]  # bounded: one file + the sample
        keys, where, vectors = keys[best], where[best], vectors[best]
    skipped, sample = merge_skipped(parts)
    return {"rows": rows, "dim": dim, "key": used_key, "skipped": skipped, "skipped_sample": sample,
            "keys": keys, "where": where, "vectors": vectors}


def top_k(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest similarities (ties: smaller id first); merges exact results found in parts."""
    order = np.lexsort((ids, -sims), axis=-1)[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


def _add_group(files: list[str], first_row: int, part_url: Optional[str], empty: bytes, key: str,
               queries: Optional[np.ndarray], kk: int, add_threads: Optional[int]) -> dict:
    """Pass 2 on a worker: the group's files, one at a time, added to a copy of the trained empty index,
    and the exact top-kk of the recall queries among them (brute force, ids global). The populated index
    and uids are written to `part_url` (index_parts), or returned when there is no part file (one group)."""
    import faiss
    index = deserialize(empty)
    uids, rows = [], 0
    sims = np.zeros((0 if queries is None else len(queries), 0), np.float32)
    ids = np.zeros(sims.shape, np.int64)
    for emb in iter_embeddings(files, key):
        with _omp_threads(add_threads):
            index.add(emb.vectors)
        if queries is not None and len(emb.vectors):
            d, i = faiss.knn(queries, emb.vectors, min(kk, len(emb.vectors)), metric=faiss.METRIC_INNER_PRODUCT)
            sims, ids = top_k(np.hstack([sims, d]), np.hstack([ids, i + first_row + rows]), kk)
        uids.append(emb.uids)
        rows += len(emb.vectors)
    if part_url is None:
        return {"index": serialize(index), "rows": rows, "uids": np.concatenate(uids), "sims": sims, "ids": ids}
    write_part(part_url, index, first_row, np.concatenate(uids))
    return {"rows": rows, "sims": sims, "ids": ids}


def _recall_from_file(url: str, search: dict, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray,
                      k: int) -> float:
    """recall_at_k of a written index, memory-mapped (a copy in local temp first where it is remote)."""
    import faiss
    from fsspec.implementations.local import LocalFileSystem
    fs, path = filesystem(url)
    with tempfile.TemporaryDirectory(prefix="reinforge-index-") as tmp:
        if not isinstance(fs, LocalFileSystem):
            fs.get(path, os.path.join(tmp, "index.faiss"))
            path = os.path.join(tmp, "index.faiss")
        index = faiss.read_index(path, faiss.IO_FLAG_MMAP)
        set_search_parameters(index, search)
        return recall_at_k(index, queries, query_ids, truth, k)


def recall_at_k(index, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean |approx top-k ∩ exact top-k| / k for pool rows as queries, their own row left out of both."""
    _, found = index.search(queries, truth.shape[1])
    hits = 0
    for q, t, f in zip(query_ids, truth, found):
        t, f = [i for i in t if i != q][:k], {i for i in f if i != q}
        hits += len(f.intersection(t)) / max(len(t), 1)
    return hits / len(query_ids)


def _fold_samples(scans, files: list[str], keep: int) -> dict:
    """The groups' samples folded as they arrive, keeping the `keep` smallest seeded keys seen so far
    (a total order: the pool-wide result does not depend on the grouping, and the driver holds one
    group's sample besides its own); rows per file are kept (O(files))."""
    out = None
    for g, part in enumerate(scans):
        if out is None:
            out = {**part, "rows": []}
        elif (part["dim"], part["key"]) != (out["dim"], out["key"]):
            raise EmbeddingError(f"{files[0]}: key {out['key']!r} dim {out['dim']}, but a later file "
                                 f"of group {g} has key {part['key']!r} dim {part['dim']}")
        else:
            out["keys"] = np.concatenate([out["keys"], part["keys"]])
            out["where"] = np.concatenate([out["where"], part["where"]])
            out["vectors"] = np.concatenate([out["vectors"], part["vectors"]])
        best = np.lexsort((out["where"][:, 1], out["where"][:, 0], out["keys"]))[:keep]
        out["keys"], out["where"], out["vectors"] = out["keys"][best], out["where"][best], out["vectors"][best]
        if g:
            out["skipped"], out["skipped_sample"] = merge_skipped([out, part])
        out["rows"] += part["rows"]
    return out


def _sample(scan: dict, files: list[str], spec: IndexSpec):
    """The pool-wide sample from the folded groups' samples: recall queries, then training rows (disjoint)."""
    rows = scan["rows"]
    n = sum(rows)
    if not n:
        raise EmbeddingError(f"embeddings: no usable rows in {len(files)} file(s) ({files[0]}, ...); "
                             f"skipped: {scan['skipped'] or 'none (the files are empty)'}")
    keys, where, vectors = scan["keys"], scan["where"], scan["vectors"]
    best = np.lexsort((where[:, 1], where[:, 0], keys))
    row_ids = (np.cumsum([0] + rows)[where[:, 0]] + where[:, 1])[best]
    n_queries = min(spec.recall_queries, max(1, n // 10))
    q = np.sort(row_ids[:n_queries])
    t = np.sort(row_ids[n_queries:n_queries + spec.train_size]) if n > n_queries else q
    position = dict(zip(row_ids.tolist(), best.tolist()))
    return rows, q, *(np.ascontiguousarray(vectors[[position[i] for i in ids.tolist()]]) for ids in (q, t))


def build_index(source: str | Sequence[str], out_dir: str, spec: IndexSpec, address: Optional[str] = None) -> dict:
    """Two passes over the files, in parallel per shard group (Ray tasks when more than one group):
    1. usable rows per file + a seeded sample (recall queries, training rows) — all the driver reads;
    2. each group adds its own files to a copy of the trained index, writes it to a part file and finds
       the queries' exact neighbours among them; the driver streams the parts, merged in group order,
       into index.faiss and uids.npy, and a task measures recall on the written index."""
    import faiss

    from reinforge.runtime.ray_session import map_groups, ray_session
    started = time.perf_counter()
    files = resolve_paths(source)
    raw_rows = [count_rows(url) for url in files]
    n_groups = spec.groups or math.ceil(sum(raw_rows) / 250_000)
    parts_files = shard_groups(raw_rows, max(1, min(len(files), n_groups)))
    parallel = len(parts_files) > 1 and spec.kind != "hnsw"
    if not parallel:
        parts_files = [list(range(len(files)))]
    group_files = [[files[i] for i in part] for part in parts_files]
    work = join(out_dir, f"{TMP_MARKER}parts")  # the groups' part files, removed once merged
    remove_tree(work)
    with ray_session(address) if parallel else contextlib.nullcontext(), _removed(work if parallel else None):
        keep = spec.recall_queries + spec.train_size
        scan = _fold_samples(map_groups(_sample_group, [(f, part[0]) for f, part in zip(group_files, parts_files)],
                                        (spec.key, spec.seed, keep), parallel), files, keep)
        file_rows, query_ids, queries, train = _sample(scan, files, spec)
        key, dim, n = scan["key"], scan["dim"], sum(file_rows)
        skipped, skipped_sample = scan["skipped"], scan["skipped_sample"]
        del scan
        plan = plan_index(spec, n, dim)
        index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
        if plan.kind == "ivf_pq" and len(train) < 2 ** spec.pq_bits:
            raise ConfigError(f"config error: index.kind: ivf_pq with pq_bits={spec.pq_bits} needs at least "
                              f"{2 ** spec.pq_bits} training vectors, the pool has {len(train)}; use flat or hnsw")
        if plan.kind == "hnsw":
            index.hnsw.efConstruction = spec.ef_construction
        if plan.kind == "ivf_pq":  # the factory turns polysemous training on; slow, and only for Hamming search
            faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
        t0 = time.perf_counter()
        index.train(train)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        empty = serialize(index)
        index = deserialize(empty)  # the same concrete classes as the parts (the factory's IndexFlat is IndexFlatIP there)
        group_rows = [sum(file_rows[i] for i in part) for part in parts_files]
        first_rows = np.cumsum([0] + group_rows).tolist()
        part_urls = [join(work, f"{g:06d}.part") if parallel else None for g in range(len(parts_files))]
        kk = min(spec.recall_k + 1, n)
        exact = plan.kind != "flat"
        pieces = map_groups(_add_group, list(zip(group_files, first_rows, part_urls)),
                            (empty, key, queries if exact else None, kk, 1 if plan.kind == "hnsw" else None), parallel)
        uids, sims, ids = [], np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        for part, expected, piece in zip(parts_files, group_rows, pieces):
            if piece["rows"] != expected:
                raise RuntimeError(f"index group {part}: {piece['rows']} vectors, the first pass read {expected} "
                                   "(files changed?)")
            if not parallel:
                index = deserialize(piece["index"])
                uids.append(piece["uids"])
            if exact:  # the queries' exact neighbours so far (ids are global rows, so the order is total)
                sims, ids = top_k(np.hstack([sims, piece["sims"]]), np.hstack([ids, piece["ids"]]), kk)
        set_search_parameters(index, plan.search)
        if parallel:  # the parts streamed into the files a serial build writes, one slab of lists at a time
            parts = PartFiles(part_urls, group_rows, layout_of(index))
            size = write_merged_index(join(out_dir, "index.faiss"), index, parts)
            write_merged_uids(join(out_dir, "uids.npy"), parts)
        else:
            data = serialize(index)
            size = len(data)
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(np.concatenate(uids), SUBSET_DTYPE), allow_pickle=False)
            write_bytes(join(out_dir, "index.faiss"), data)
            write_bytes(join(out_dir, "uids.npy"), buf.getvalue())
            del data, buf
        add_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if not exact:
            recall = 1.0
        elif parallel:  # on a worker, from the written file: the driver never holds the index
            recall = next(map_groups(_recall_from_file, [(join(out_dir, "index.faiss"),)],
                                     (plan.search, queries, query_ids, ids, spec.recall_k), True))
        else:
            recall = recall_at_k(index, queries, query_ids, ids, spec.recall_k)
    meta = {"format": FORMAT, "kind": plan.kind, "factory": plan.factory, "metric": "inner_product",
            "dim": int(dim), "ntotal": int(n), "search": plan.search, "config": spec.model_dump(),
            "refine": plan.refine, "bytes_per_vector": round(size / max(1, n), 1),
            "source": files, "key": key, "skipped_rows": skipped, "skipped_sample": skipped_sample,
            "train_vectors": int(len(train)), "groups": len(parts_files),
            "recall": {f"recall@{spec.recall_k}": round(recall, 4), "queries": int(len(query_ids)),
                       "held_out": n > len(query_ids), "vs": "exact inner product (brute force)",
                       "seconds": round(time.perf_counter() - t0, 3)},
            "seconds": {"train": round(train_s, 3), "add": round(add_s, 3),
                        "total": round(time.perf_counter() - started, 3)}}
    write_bytes(join(out_dir, "index.json"), json.dumps(meta, indent=1, sort_keys=True).encode())
    return meta


@contextlib.contextmanager
def _removed(url: Optional[str]):
    """Remove the folder `url` when the block ends, however it ends."""
    try:
        yield
    finally:
        if url:
            remove_tree(url)


@dataclass
class LoadedIndex:
    index: object
    uids: np.ndarray  # u8,u8 in faiss id order
    meta: dict

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(queries, np.float32), k)


def load_index(index_dir: str) -> LoadedIndex:
    meta_url = join(index_dir, "index.json")
    fs, path = filesystem(meta_url)
    if not fs.exists(path):
        raise FileNotFoundError(f"{index_dir} is not an index folder (no index.json)")
    meta = json.loads(read_text(meta_url))
    fs, path = filesystem(join(index_dir, "index.faiss"))
    index = deserialize(fs.cat_file(path))
    set_search_parameters(index, meta["search"])
    fs, path = filesystem(join(index_dir, "uids.npy"))
    uids = np.load(io.BytesIO(fs.cat_file(path)), allow_pickle=False)
    if len(uids) != index.ntotal:
        raise ValueError(f"{index_dir}: uids.npy has {len(uids)} rows, the index {index.ntotal}")
    return LoadedIndex(index, uids, meta)
