"""A transfer set's candidates, the pool rows its searches returned, and how each policy orders them.

Policies only order the candidate (query, rank, pool row) events; transfer_set's acceptance pass decides:
  knn      round robin over queries by rank (plain kNN union, balanced under a budget)
  mmr      maximal marginal relevance: lambda * relevance - (1 - lambda) * max similarity to the chosen
  cluster  spherical k-means over the candidates; round robin over clusters, most relevant first

The driver reads vectors and sha256 for the candidates only (at most k per query): one pass over the
index's source files keeps those and drops the rest a file at a time, so memory grows with
candidates x dim, not with the pool.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from reinforge.curation.index import LoadedIndex
from reinforge.curation.transfer_spec import SelectionSpec
from reinforge.formats.embeddings import iter_embeddings, resolve_paths
from reinforge.formats.recipe import ConfigError


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
# Ordering candidates (policies), and which are near duplicates of which (for the acceptance pass).

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
