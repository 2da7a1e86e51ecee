"""Retrieval-curated transfer sets: target images (or class-name prompts) -> k pool neighbours each ->
a selection under a policy, deduplicated and decontaminated -> DataComp subset files.

Every policy only orders the candidate (query, rank, pool row) events; one acceptance pass then
enforces, exactly and in that order: decontamination, uid / sha256 / near-duplicate dedup, the
per-query and per-class quotas and the size budget. Policies:
  knn      round robin over queries by rank (plain kNN union, balanced under a budget)
  mmr      maximal marginal relevance: lambda * relevance - (1 - lambda) * max similarity to the chosen
  cluster  spherical k-means over the candidates; round robin over clusters, most relevant first
Queries whose neighbours all fall below `min_similarity` are counted and listed, not an error.
A random subset of the same size (seeded) is always written beside the selection as a baseline.

What the driver holds of the pool: the index and its uids (uids.npy, 16 bytes a row: the baseline draws
from them) and, for the candidates only (the rows the searches returned, at most k per query), their
vectors and sha256: one pass over the source files keeps those and drops the rest a file at a time, so
memory grows with candidates x dim, not with the pool.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import pyarrow as pa
from pydantic import Field, ValidationError, model_validator

from reinforge.curation.index import LoadedIndex, load_index
from reinforge.io.storage import exists, read_text, write_bytes
from reinforge.formats.recipe import ConfigError, Strict, format_validation_error
from reinforge.models.specs import EmbedEncoder
from reinforge.formats.embeddings import iter_embeddings, load_embeddings, resolve_paths, table_bytes
from reinforge.io.manifest import join
from reinforge.formats.subset import make_subset, uid_order, uids_hex, write_subset

SAMPLE = 20


class ImagesSpec(Strict):
    format: Literal["imagefolder", "webdataset"]
    path: str = Field(description="ImageFolder root (class = folder) or shard pattern (class = `cls` member)")


class PromptsSpec(Strict):
    classes: list[str] = Field(min_length=1)
    templates: list[str] = Field(["a photo of a {}."], min_length=1, description="averaged per class")


class DecontaminateSpec(Strict):
    images: Optional[ImagesSpec] = Field(None, description="evaluation images, embedded like the pool")
    embeddings: Optional[str] = Field(None, description="or their embeddings (run dir / parquet / DataComp)")
    threshold: float = Field(0.9, ge=-1, le=1, description="pool items this similar to any eval item are removed")

    @model_validator(mode="after")
    def _one(self) -> "DecontaminateSpec":
        if (self.images is None) == (self.embeddings is None):
            raise ValueError("give exactly one of images or embeddings")
        return self


class SelectionSpec(Strict):
    policy: Literal["knn", "mmr", "cluster"] = "knn"
    k: int = Field(100, ge=1, description="neighbours per query")
    min_similarity: float = Field(-1.0, ge=-1, le=1, description="neighbours below this are dropped")
    per_query: Optional[int] = Field(None, ge=1)
    per_class: Optional[int] = Field(None, ge=1)
    budget: Optional[int] = Field(None, ge=1, description="size of the transfer set at most")
    mmr_lambda: float = Field(0.7, ge=0, le=1)
    clusters: Optional[int] = Field(None, ge=1, description="cluster policy: k-means clusters (default sqrt(candidates))")
    near_duplicate: Optional[float] = Field(0.98, ge=-1, le=1, description="inner product at/above which two "
                                            "pool items are one; null: off")
    dedup_sha256: bool = True


class ReshardSpec(Strict):
    pool: str = Field(description="the pool's shards (jpg + txt + json uid)")
    samples_per_shard: int = Field(10000, ge=1)


class TransferSetSpec(Strict):
    index: str = Field(description="folder written by `reinforge index`")
    output: str
    seed: int = 0
    queries: Optional[ImagesSpec] = None
    prompts: Optional[PromptsSpec] = None
    encoder: Optional[EmbedEncoder] = Field(None, description="default: the encoder of the pool's embed run")
    selection: SelectionSpec = SelectionSpec()
    decontaminate: Optional[DecontaminateSpec] = None
    reshard: Optional[ReshardSpec] = None

    @model_validator(mode="after")
    def _one_target(self) -> "TransferSetSpec":
        if (self.queries is None) == (self.prompts is None):
            raise ValueError("give exactly one of queries (images) or prompts (class names)")
        return self


def parse_transfer_spec(raw) -> TransferSetSpec:
    if not isinstance(raw, dict):
        raise ConfigError("config error: the transfer-set config must be a YAML mapping")
    try:
        return TransferSetSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


# ---------------------------------------------------------------------------------------------
# Embedding queries and evaluation images with the pool's encoder.

def pool_encoder(meta: dict) -> EmbedEncoder:
    """The encoder recorded in run.json of the embed_pool run that wrote the index's source files."""
    for url in meta["source"]:
        root, sep, _ = url.rpartition("/embeddings/")
        if sep and exists(join(root, "run.json")):
            return EmbedEncoder.model_validate(json.loads(read_text(join(root, "run.json")))["recipe"]["encoder"])
    raise ConfigError("config error: encoder: the index was not built from an embed_pool run; "
                      "give the encoder that made its embeddings")


@dataclass
class EmbeddedImages:
    vectors: np.ndarray
    ids: list[str]
    classes: list[str]
    skipped: dict = field(default_factory=dict)


def embed_images(spec: ImagesSpec, encoder, batch: int = 64) -> EmbeddedImages:
    """Decode + embed a (small) image set in this process; bad images are counted skips."""
    import torch

    from reinforge.runtime.executor import batched
    from reinforge.formats.sources import ImageFolderSource, WebDatasetSource
    from reinforge.stages.base import Batch
    from reinforge.stages.decode import DecodeImage
    from reinforge.stages.embed import ImageView
    if spec.format == "imagefolder":
        source = ImageFolderSource(spec.path, 1 << 30)
        names = source.listing()[0]
    else:
        source, names = WebDatasetSource(spec.path), None
    stages = [DecodeImage(), ImageView(encoder.size)]
    vectors, ids, classes, skipped = [], [], [], {}
    for task in source.tasks():
        for chunk in batched(source.read(task), batch):
            b = Batch(chunk)
            for stage in stages:
                b = stage(b)
            for error in b.errors:
                skipped[error.reason] = skipped.get(error.reason, 0) + 1
            if not b.samples:
                continue
            vectors.append(encoder.embed_views(torch.stack([s["view"] for s in b.samples])))
            for s in b.samples:
                label = s.get("cls", b"").decode("utf-8", "replace").strip()
                classes.append(names[int(label)] if names else label)
                ids.append(s.get("__source__") or f"{task.id}/{s['__key__']}")
    if not vectors:
        raise ConfigError(f"error: no usable images in {spec.path} (skipped: {skipped or 'none found'})")
    return EmbeddedImages(np.concatenate(vectors), ids, classes, skipped)


def embed_prompts(spec: PromptsSpec, encoder) -> EmbeddedImages:
    """One query per class: the mean of its templates' text embeddings, renormalised (CLIP zero-shot)."""
    rows = []
    for name in spec.classes:
        emb = encoder.embed_texts([t.format(name) for t in spec.templates]).mean(axis=0)
        rows.append(emb / np.linalg.norm(emb))
    return EmbeddedImages(np.stack(rows).astype(np.float32), [f"prompt:{c}" for c in spec.classes], list(spec.classes))


# ---------------------------------------------------------------------------------------------
# The candidates: the only pool rows whose vectors and sha256 the driver reads.

@dataclass
class Candidates:
    rows: np.ndarray  # pool rows (faiss ids), sorted, distinct
    vectors: np.ndarray  # float32 [len(rows), D], row i of rows
    sha256: Optional[list]  # row i of rows, where the source has it

    def vectors_of(self, rows: np.ndarray) -> np.ndarray:
        """Vectors of some candidate rows, in the given order."""
        return self.vectors[np.searchsorted(self.rows, rows)]


def candidate_rows(index: LoadedIndex, rows: np.ndarray, name: str) -> Candidates:
    """One pass over the index's source files, a file at a time, keeping only `rows`. Pool row = position
    among the usable rows of the files in source order (how build_index numbered them); each file's uids
    must equal uids.npy at its rows, or the source changed since the index was built."""
    changed = ConfigError(f"error: {name}: its embeddings changed since the index was built; rebuild it")
    vectors, sha256, first = [], [], 0
    for part in iter_embeddings(resolve_paths(index.meta["source"]), index.meta["key"]):
        n = len(part.vectors)
        if not np.array_equal(part.uids, index.uids[first:first + n]):
            raise changed
        start, stop = np.searchsorted(rows, [first, first + n])  # rows are sorted
        local = rows[start:stop] - first
        vectors.append(part.vectors[local])
        sha256.append(None if part.sha256 is None else [part.sha256[i] for i in local])
        first += n
    if first != len(index.uids):
        raise changed
    have_sha = all(s is not None for s in sha256)  # as load_embeddings: all files have it, or none counts
    return Candidates(rows, np.concatenate(vectors), [s for part in sha256 for s in part] if have_sha else None)


# ---------------------------------------------------------------------------------------------
# Ordering candidates (policies) and accepting them (dedup, quotas, budget).

def _best_events(events: np.ndarray) -> dict[int, tuple]:
    """Per pool row, its best (query, rank, sim) event."""
    best: dict[int, tuple] = {}
    for q, r, row, sim in events:
        if int(row) not in best or sim > best[int(row)][2]:
            best[int(row)] = (int(q), int(r), float(sim))
    return best


def order_events(policy: SelectionSpec, events: np.ndarray, pool: Candidates, seed: int) -> list[tuple]:
    """Events (query, rank, row, sim) in the order the acceptance pass considers them."""
    if policy.policy == "knn" or not len(events):
        idx = np.lexsort((events[:, 0], events[:, 1])) if len(events) else []
        return [(int(q), int(r), int(row), float(s)) for q, r, row, s in events[idx]]
    best = _best_events(events)
    rows = np.array(sorted(best), np.int64)
    relevance = np.array([best[int(r)][2] for r in rows], np.float32)
    cand = pool.vectors_of(rows)
    if policy.policy == "mmr":
        steps = len(rows) if policy.budget is None else min(len(rows), 2 * policy.budget)
        chosen, closest = [], np.full(len(rows), -np.inf, np.float32)
        free = np.ones(len(rows), bool)
        for _ in range(steps):
            penalty = np.where(np.isfinite(closest), closest, 0)
            score = np.where(free, policy.mmr_lambda * relevance - (1 - policy.mmr_lambda) * penalty, -np.inf)
            pick = int(np.argmax(score))
            chosen.append(pick)
            free[pick] = False
            closest = np.maximum(closest, cand @ cand[pick])
        rest = sorted(np.flatnonzero(free), key=lambda i: (-relevance[i], rows[i]))
        order = chosen + rest
    else:
        import faiss
        n_clusters = min(len(rows), policy.clusters or max(1, round(np.sqrt(len(rows)))))
        assign = np.zeros(len(rows), np.int64)
        if n_clusters > 1:
            kmeans = faiss.Kmeans(cand.shape[1], n_clusters, niter=20, seed=seed, spherical=True)
            kmeans.train(cand)
            assign = np.argmax(cand @ kmeans.centroids.T, axis=1)  # by inner product, as trained
        members = [sorted(np.flatnonzero(assign == c), key=lambda i: (-relevance[i], rows[i]))
                   for c in range(n_clusters)]
        members.sort(key=lambda m: (-len(m), rows[m[0]] if m else 0))
        order = [m[i] for i in range(max(map(len, members))) for m in members if i < len(m)]
    return [(best[int(rows[i])][0], best[int(rows[i])][1], int(rows[i]), best[int(rows[i])][2]) for i in order]


def near_duplicate_pairs(rows: np.ndarray, pool: Candidates, threshold: float) -> dict[int, list[int]]:
    """Pool row -> the other candidate rows with inner product >= threshold (exact, over candidates)."""
    import faiss
    cand = np.ascontiguousarray(pool.vectors_of(rows))
    flat = faiss.IndexFlatIP(cand.shape[1])
    flat.add(cand)
    lims, _, found = flat.range_search(cand, float(np.nextafter(np.float32(threshold), np.float32(-2))))
    return {int(rows[i]): [int(rows[j]) for j in found[lims[i]:lims[i + 1]] if j != i] for i in range(len(rows))}


# ---------------------------------------------------------------------------------------------

def build_transfer_set(spec: TransferSetSpec, address: Optional[str] = None) -> dict:
    from reinforge.stages.embed import Encoder
    started = time.perf_counter()
    sel = spec.selection
    index = load_index(spec.index)
    dim = int(index.meta["dim"])
    encoder = Encoder(spec.encoder or pool_encoder(index.meta))
    encoder.setup()
    if encoder.dim != dim:
        raise ConfigError(f"error: encoder: dim {encoder.dim}, the pool embeddings have dim {dim}")
    targets = embed_images(spec.queries, encoder) if spec.queries else embed_prompts(spec.prompts, encoder)

    k = min(sel.k, index.index.ntotal)
    sims, ids = index.search(targets.vectors, k)
    q_idx, rank = np.nonzero((ids >= 0) & (sims >= sel.min_similarity))
    events = np.stack([q_idx, rank, ids[q_idx, rank], sims[q_idx, rank]], axis=1) if len(q_idx) else np.zeros((0, 4))
    without = sorted(set(range(len(targets.ids))) - set(q_idx.tolist()))

    removed = {"decontaminated": 0, "duplicate_uid": 0, "duplicate_sha256": 0, "near_duplicate": 0,
               "per_query_quota": 0, "per_class_quota": 0, "budget": 0}
    candidates = np.unique(events[:, 2].astype(np.int64)) if len(events) else np.zeros(0, np.int64)
    pool = candidate_rows(index, candidates, spec.index)
    contaminated: set[int] = set()
    eval_report = None
    if spec.decontaminate and len(candidates):
        d = spec.decontaminate
        evals = (embed_images(d.images, encoder).vectors if d.images else load_embeddings(d.embeddings).vectors)
        if evals.shape[1] != dim:
            raise ConfigError(f"error: decontaminate: eval embeddings have dim {evals.shape[1]}, the pool {dim}")
        import faiss
        flat = faiss.IndexFlatIP(dim)
        flat.add(np.ascontiguousarray(evals, np.float32))
        closest, _ = flat.search(pool.vectors, 1)
        contaminated = set(candidates[closest[:, 0] >= d.threshold].tolist())
        removed["decontaminated"] = len(contaminated)
        eval_report = {"eval_items": int(len(evals)), "threshold": d.threshold}
    keep = np.array([int(r) not in contaminated for r in events[:, 2]], bool) if len(events) else np.zeros(0, bool)
    events = events[keep]
    partners = (near_duplicate_pairs(np.unique(events[:, 2].astype(np.int64)), pool, sel.near_duplicate)
                if sel.near_duplicate is not None and len(events) else {})

    uid_hexes = dict(zip(candidates.tolist(), uids_hex(index.uids[candidates])))
    sha256 = dict(zip(candidates.tolist(), pool.sha256 or ()))
    selected: list[tuple] = []
    chosen_rows: set[int] = set()
    taken_uids: set[str] = set()
    taken_sha: set[str] = set()
    blocked: set[int] = set()
    per_query: dict[int, int] = {}
    per_class: dict[str, int] = {}
    dropped_rows: dict[str, set] = {k: set() for k in ("duplicate_uid", "duplicate_sha256", "near_duplicate")}
    for q, r, row, sim in order_events(sel, events, pool, spec.seed):
        if row in chosen_rows:
            continue  # already in the union through another query
        if sel.budget is not None and len(selected) >= sel.budget:
            removed["budget"] += 1
            continue
        uid, sha = uid_hexes[row], sha256.get(row)
        reason = ("duplicate_uid" if uid in taken_uids else
                  "duplicate_sha256" if sel.dedup_sha256 and sha and sha in taken_sha else
                  "near_duplicate" if row in blocked else None)
        if reason:
            dropped_rows[reason].add(row)
            continue
        cls = targets.classes[q]
        if sel.per_query is not None and per_query.get(q, 0) >= sel.per_query:
            removed["per_query_quota"] += 1
            continue
        if sel.per_class is not None and per_class.get(cls, 0) >= sel.per_class:
            removed["per_class_quota"] += 1
            continue
        selected.append((uid, targets.ids[q], cls, r, sim, row))
        chosen_rows.add(row)
        taken_uids.add(uid)
        if sha:
            taken_sha.add(sha)
        blocked.update(partners.get(row, ()))
        per_query[q] = per_query.get(q, 0) + 1
        per_class[cls] = per_class.get(cls, 0) + 1
    for reason, rows in dropped_rows.items():
        removed[reason] = len(rows - chosen_rows)

    rows = np.array([s[5] for s in selected], np.int64)
    chosen = index.uids[rows] if len(rows) else make_subset(np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    chosen = chosen[uid_order(chosen["f0"], chosen["f1"])]
    write_subset(join(spec.output, "transfer_set.npy"), chosen)
    baseline = random_subset(index.uids, len(chosen), spec.seed, exclude=np.array(sorted(contaminated), np.int64))
    write_subset(join(spec.output, "random_baseline.npy"), baseline)
    table = pa.table({"uid": [s[0] for s in selected], "query_id": [s[1] for s in selected],
                      "query_class": [s[2] for s in selected], "rank": pa.array([s[3] for s in selected], pa.int32()),
                      "similarity": pa.array([s[4] for s in selected], pa.float32()),
                      "policy": [sel.policy] * len(selected), "order": pa.array(range(len(selected)), pa.int32())})
    write_bytes(join(spec.output, "selection.parquet"), table_bytes(table))

    report = {
        "format": "reinforge.transfer_set/1", "index": spec.index, "selection": sel.model_dump(), "seed": spec.seed,
        "pool": {"vectors": int(len(index.uids)), "skipped_rows": index.meta["skipped_rows"]},
        "index_recall": index.meta.get("recall"),
        "queries": {"count": len(targets.ids), "skipped_images": targets.skipped,
                    "without_neighbours": len(without),
                    "without_neighbours_sample": [targets.ids[i] for i in without[:SAMPLE]]},
        "candidates": int(len(candidates)), "selected": len(selected), "removed": removed,
        "decontamination": eval_report,
        "per_class": dict(sorted(per_class.items())),
        "per_query": {targets.ids[q]: n for q, n in sorted(per_query.items())},
        "outputs": {"transfer_set": "transfer_set.npy", "random_baseline": "random_baseline.npy",
                    "selection": "selection.parquet"},
    }
    if spec.reshard is not None and len(chosen):
        report["reshard"] = reshard(spec, address)
    report["seconds"] = round(time.perf_counter() - started, 3)
    write_bytes(join(spec.output, "report.json"), json.dumps(report, indent=1, sort_keys=True).encode())
    return report


def random_subset(uids: np.ndarray, size: int, seed: int, exclude: np.ndarray) -> np.ndarray:
    """`size` distinct pool uids drawn with a seeded generator (excluded rows never drawn), sorted."""
    allowed = np.setdiff1d(np.arange(len(uids)), exclude)
    pool = uids[allowed][uid_order(uids["f0"][allowed], uids["f1"][allowed])]
    distinct = np.ones(len(pool), bool)
    distinct[1:] = (pool["f0"][1:] != pool["f0"][:-1]) | (pool["f1"][1:] != pool["f1"][:-1])
    pool = pool[distinct]
    pick = np.sort(np.random.default_rng(seed).choice(len(pool), min(size, len(pool)), replace=False))
    return pool[pick]


def reshard(spec: TransferSetSpec, address: Optional[str]) -> dict:
    """The transfer set as DataComp shards, through the existing `reshard` product."""
    from reinforge.runtime.runner import run_recipe
    from reinforge.products.registry import parse_recipe
    recipe = parse_recipe({"product": "reshard", "output": join(spec.output, "reshard"), "seed": spec.seed,
                           "subset": join(spec.output, "transfer_set.npy"), "counts": "none",
                           "input": {"path": spec.reshard.pool}, "samples_per_shard": spec.reshard.samples_per_shard})
    summary = run_recipe(recipe, address=address, progress=False)
    return {"output": join(spec.output, "reshard", "shards"), "tasks": summary.tasks, "samples": summary.samples,
            "failed": [f.get("task") for f in summary.failed]}
