"""A faiss inner-product index over pool embeddings (unit vectors, so inner product = cosine).

Kinds: `flat` (exact), `ivf_flat`, `ivf_pq`, `hnsw`; `auto` is exact below `exact_below` vectors,
else IVF-PQ. IVF-PQ re-ranks k_factor*k candidates on fp16 copies of the vectors by default (PQ
distances alone cap recall@10 near 0.76 on clustered 512-d data; the IVF probe then sets it).
IVF and PQ are trained on a seeded sample that excludes the recall queries. The driver holds O(files)
counts and the sample's keys (16 bytes a row), never vectors or the index: every step runs as tasks
(TaskMap: Ray where an address is given or this process has Ray, else this machine's worker processes,
inline for small pools). Pass 1 finds usable rows per file and the sample
(index_sample: its vectors go to scratch files in `.tmp-parts/` of the output); one task trains the
empty index on it and writes it and the recall queries there; IVF and flat indexes are then built per
shard group in parallel (tasks add their group's files, one at a time, to copies of the trained empty
index, write it to a part file in `.tmp-parts/`, and find the queries' exact neighbours among them for
recall); the driver streams the parts, merged in group order with id offsets, into index.faiss
(index_parts), which gives the same inverted lists, hence the same bytes, as a serial build (recall is
measured by a task on the written file, memory-mapped). HNSW graphs cannot be merged: they are built
inline, in the driver, in one thread (faiss' parallel HNSW insertion depends on thread timing).

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
from reinforge.curation.index_sample import choose, complete, fold_samples, key_bound, read_sample, sample_group
from reinforge.formats.arrays import npy_bytes
from reinforge.formats.embeddings import count_rows, iter_embeddings, resolve_paths
from reinforge.formats.recipe import ConfigError, Strict, format_validation_error
from reinforge.formats.subset import SUBSET_DTYPE
from reinforge.io.manifest import TMP_MARKER, join
from reinforge.io.storage import filesystem, read_bytes, read_text, remove_tree, write_bytes
from reinforge.runtime.ray_session import TaskMap, ray_session, where_to_map

FORMAT = "reinforge.index/1"
INLINE_INDEX_ROWS = 1 << 16  # smaller pools are built inline: their index is a few tens of MB at most


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


def top_k(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest similarities (ties: smaller id first); merges exact results found in parts."""
    order = np.lexsort((ids, -sims), axis=-1)[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


def _add_group(files: list[str], first_row: int, part_url: Optional[str], trained_url: str, key: str,
               queries_url: Optional[str], kk: int, threads: Optional[int]) -> dict:
    """Pass 2 on a worker: the group's files, one at a time, added to a copy of the trained empty index
    (read from `trained_url`), and the exact top-kk of the recall queries (from `queries_url`) among them
    (brute force, ids global), with `threads` faiss threads (None: faiss' default). The populated index
    and uids are written to `part_url` (index_parts), or returned when there is no part file (HNSW)."""
    import faiss
    index = deserialize(read_bytes(trained_url))
    queries = None if queries_url is None else _read_npy(queries_url)
    uids, rows = [], 0
    sims = np.zeros((0 if queries is None else len(queries), 0), np.float32)
    ids = np.zeros(sims.shape, np.int64)
    for emb in iter_embeddings(files, key):
        with _omp_threads(threads):
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


def _recall_from_file(url: str, search: dict, queries_url: str, query_ids: np.ndarray, truth: np.ndarray,
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
        return recall_at_k(index, _read_npy(queries_url), query_ids, truth, k)


def recall_at_k(index, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean |approx top-k ∩ exact top-k| / k for pool rows as queries, their own row left out of both."""
    _, found = index.search(queries, truth.shape[1])
    hits = 0
    for q, t, f in zip(query_ids, truth, found):
        t, f = [i for i in t if i != q][:k], {i for i in f if i != q}
        hits += len(f.intersection(t)) / max(len(t), 1)
    return hits / len(query_ids)


def _train_empty(scratch_urls: list[str], first_files: list[int], query_rows: np.ndarray, train_rows: np.ndarray,
                 dim: int, plan: Plan, ef_construction: int, threads: int, trained_url: str, queries_url: str) -> float:
    """On a worker: the sample's vectors (rows as index_sample.row_id) read from the scratch files of the
    groups (whose first files are `first_files`), the empty index trained on them and written (serialised)
    to `trained_url`, the recall queries to `queries_url` (.npy); returns the seconds training took. faiss
    trains with the driver's thread count (its k-means depends on it), so the bytes are those of a training
    on the driver wherever this runs."""
    import faiss
    queries, train = read_sample(scratch_urls, first_files, [query_rows, train_rows], dim)
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        index.hnsw.efConstruction = ef_construction
    if plan.kind == "ivf_pq":  # the factory turns polysemous training on; slow, and only for Hamming search
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
    started = time.perf_counter()
    with _omp_threads(threads):
        index.train(train)
    seconds = time.perf_counter() - started
    write_bytes(trained_url, serialize(index))
    write_bytes(queries_url, npy_bytes(queries))
    return seconds


def _read_npy(url: str) -> np.ndarray:
    return np.load(io.BytesIO(read_bytes(url)), allow_pickle=False)


def _sample(tasks: TaskMap, group_files: list[list[str]], first_files: list[int], files: list[str], raw_rows: int,
            spec: IndexSpec, work: str) -> tuple[dict, list[str]]:
    """Pass 1 (index_sample): the folded sample's keys and the groups' scratch files; run again without a
    key bound where too few rows passed it (the same sample either way)."""
    keep = spec.recall_queries + spec.train_size
    scratch = [join(work, f"{g:06d}.sample.npz") for g in range(len(group_files))]
    bound = key_bound(keep, raw_rows)
    while True:
        scans = tasks(sample_group, list(zip(group_files, first_files, scratch)), (spec.key, spec.seed, keep, bound))
        scan = fold_samples(scans, files, keep)
        if bound == 1.0 or complete(scan, keep):
            return scan, scratch
        bound = 1.0


def _add_threads(kind: str, where: str) -> Optional[int]:
    """faiss threads of a pass-2 task: one on worker processes (a task per CPU; Ray's workers have one) and
    for HNSW (faiss' parallel HNSW insertion depends on thread timing), else faiss' default."""
    return 1 if kind == "hnsw" or where != "inline" else None


def _where(merged: bool, raw_rows: int) -> str:
    """Where the tasks run: inline for HNSW (built in the driver), else ray_session.where_to_map with vectors'
    share of the driver (INLINE_INDEX_ROWS): worker processes past it even for one group (a group's index,
    ~600 bytes a vector at 256 d, would otherwise be built in the driver)."""
    return where_to_map(raw_rows, INLINE_INDEX_ROWS) if merged else "inline"


def build_index(source: str | Sequence[str], out_dir: str, spec: IndexSpec, address: Optional[str] = None,
                where: Optional[str] = None) -> dict:
    """Three steps over the files, as tasks per shard group: on Ray where `address` is given or this process
    has Ray, else on worker processes, inline for small pools and HNSW (`_where`; `where` names one; the
    bytes are the same wherever they run):
    1. usable rows per file + the keys of a seeded sample (index_sample) — all the driver reads;
    2. one task trains the empty index on the sample and writes it and the recall queries to `.tmp-parts/`;
    3. each group adds its own files to a copy of the trained index, writes it to a part file and finds
       the queries' exact neighbours among them; the driver streams the parts, merged in group order,
       into index.faiss and uids.npy, and a task measures recall on the written index."""
    import faiss
    started = time.perf_counter()
    files = resolve_paths(source)
    raw_rows = [count_rows(url) for url in files]
    n_groups = spec.groups or math.ceil(sum(raw_rows) / 250_000)
    parts_files = shard_groups(raw_rows, max(1, min(len(files), n_groups)))
    merged = spec.kind != "hnsw"  # built in parts, streamed into index.faiss (HNSW graphs cannot be merged)
    if not merged:
        parts_files = [list(range(len(files)))]
    group_files, first_files = [[files[i] for i in part] for part in parts_files], [part[0] for part in parts_files]
    work = join(out_dir, f"{TMP_MARKER}parts")  # the sample's scratch and the groups' part files, removed at the end
    remove_tree(work)
    with ray_session(address) if address and merged else contextlib.nullcontext(), _removed(work), \
            contextlib.closing(TaskMap(where or _where(merged, sum(raw_rows)))) as tasks:
        scan, scratch = _sample(tasks, group_files, first_files, files, sum(raw_rows), spec, work)
        file_rows, key, dim, n = scan["rows"], scan["key"], scan["dim"], sum(scan["rows"])
        query_ids, query_rows, train_rows = choose(scan, files, spec.recall_queries, spec.train_size)
        skipped, skipped_sample = scan["skipped"], scan["skipped_sample"]
        del scan
        plan = plan_index(spec, n, dim)
        if plan.kind == "ivf_pq" and len(train_rows) < 2 ** spec.pq_bits:
            raise ConfigError(f"config error: index.kind: ivf_pq with pq_bits={spec.pq_bits} needs at least "
                              f"{2 ** spec.pq_bits} training vectors, the pool has {len(train_rows)}; "
                              "use flat or hnsw")
        trained_url, queries_url = join(work, "trained.faiss"), join(work, "queries.npy")
        train_s = next(tasks(_train_empty, [(scratch, first_files, query_rows, train_rows)],
                             (dim, plan, spec.ef_construction, faiss.omp_get_max_threads(), trained_url, queries_url)))
        train_vectors = len(train_rows)
        del query_rows, train_rows
        t0 = time.perf_counter()
        group_rows = [sum(file_rows[i] for i in part) for part in parts_files]
        first_rows = np.cumsum([0] + group_rows).tolist()
        part_urls = [join(work, f"{g:06d}.part") if merged else None for g in range(len(parts_files))]
        kk = min(spec.recall_k + 1, n)
        exact = plan.kind != "flat"
        pieces = tasks(_add_group, list(zip(group_files, first_rows, part_urls)),
                       (trained_url, key, queries_url if exact else None, kk, _add_threads(plan.kind, tasks.where)))
        uids, sims, ids = [], np.zeros((len(query_ids), 0), np.float32), np.zeros((len(query_ids), 0), np.int64)
        for part, expected, piece in zip(parts_files, group_rows, pieces):
            if piece["rows"] != expected:
                raise RuntimeError(f"index group {part}: {piece['rows']} vectors, the first pass read {expected} "
                                   "(files changed?)")
            if not merged:
                index = deserialize(piece.pop("index"))
                uids.append(piece["uids"])
            if exact:  # the queries' exact neighbours so far (ids are global rows, so the order is total)
                sims, ids = top_k(np.hstack([sims, piece["sims"]]), np.hstack([ids, piece["ids"]]), kk)
        if merged:  # the trained empty index: the parts' concrete classes (the factory's IndexFlat is IndexFlatIP)
            index = deserialize(read_bytes(trained_url))
        set_search_parameters(index, plan.search)
        if merged:  # the parts streamed into the files a serial build writes, one slab of lists at a time
            parts = PartFiles(part_urls, group_rows, layout_of(index))
            size = write_merged_index(join(out_dir, "index.faiss"), index, parts)
            write_merged_uids(join(out_dir, "uids.npy"), parts)
        else:
            data = serialize(index)
            size = len(data)
            write_bytes(join(out_dir, "index.faiss"), data)
            write_bytes(join(out_dir, "uids.npy"), npy_bytes(np.concatenate(uids).astype(SUBSET_DTYPE, copy=False)))
            del data
        add_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if not exact:
            recall = 1.0
        elif merged:  # on a worker, from the written file: the driver never holds the index
            recall = next(tasks(_recall_from_file, [(join(out_dir, "index.faiss"),)],
                                (plan.search, queries_url, query_ids, ids, spec.recall_k)))
        else:
            recall = recall_at_k(index, _read_npy(queries_url), query_ids, ids, spec.recall_k)
    meta = {"format": FORMAT, "kind": plan.kind, "factory": plan.factory, "metric": "inner_product",
            "dim": int(dim), "ntotal": int(n), "search": plan.search, "config": spec.model_dump(),
            "refine": plan.refine, "bytes_per_vector": round(size / max(1, n), 1),
            "source": files, "key": key, "skipped_rows": skipped, "skipped_sample": skipped_sample,
            "train_vectors": int(train_vectors), "groups": len(parts_files),
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
