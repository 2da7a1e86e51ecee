"""Retrieval-curated transfer sets: target images (or class-name prompts) -> k pool neighbours each ->
a selection under a policy, deduplicated and decontaminated -> DataComp subset files.

A policy (transfer_candidates.py) orders the candidate (query, rank, pool row) events; one acceptance
pass then enforces, exactly and in that order: decontamination, uid / sha256 / near-duplicate dedup, the
per-query and per-class quotas and the size budget. Queries whose neighbours all fall below
`min_similarity` are counted and listed, not an error. A random subset of the same size (seeded) is
always written beside the selection as a baseline.

What the driver holds of the pool: the index and its uids (uids.npy, 16 bytes a row: the baseline draws
from them) and the candidates' vectors and sha256 (transfer_candidates.candidate_rows).
"""
from __future__ import annotations

import json
import time
from typing import Optional

import numpy as np
import pyarrow as pa

from reinforge.curation.index import load_index
from reinforge.curation.transfer_candidates import candidate_rows, near_duplicate_pairs, order_events
from reinforge.curation.transfer_spec import TransferSetSpec
from reinforge.curation.transfer_targets import embed_images, embed_prompts, pool_encoder
from reinforge.formats.embeddings import load_embeddings, table_bytes
from reinforge.formats.recipe import ConfigError
from reinforge.formats.subset import make_subset, uid_order, uids_hex, write_subset
from reinforge.io.manifest import RunLayout, join
from reinforge.io.storage import write_bytes

SAMPLE = 20


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
    from reinforge.products.registry import parse_recipe
    from reinforge.runtime.runner import run_recipe
    recipe = parse_recipe({"product": "reshard", "output": join(spec.output, "reshard"), "seed": spec.seed,
                           "subset": join(spec.output, "transfer_set.npy"), "counts": "none",
                           "input": {"path": spec.reshard.pool}, "samples_per_shard": spec.reshard.samples_per_shard})
    summary = run_recipe(recipe, address=address, progress=False)
    return {"output": RunLayout(join(spec.output, "reshard")).shards_dir, "tasks": summary.tasks, "samples": summary.samples,
            "failed": [f.get("task") for f in summary.failed]}
