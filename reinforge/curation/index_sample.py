"""The seeded sample an index is trained on (pass 1 of build_index), with the driver holding keys, never vectors.

Every usable row gets a random key, uniform in [0, 1), that depends only on (seed, file number, row); the
sample is the `keep` rows with the smallest keys, ties broken by file then row (a total order), so it does
not depend on how the files are grouped or where the tasks run. Each group's task (`sample_group`) keeps
its rows with a key <= `bound` (at most `keep` of them), writes their vectors to a scratch file and returns
their keys and row ids (file and row in one int64) only. The bound (`key_bound`) lets about 5 % more than
`keep` of the pool's raw rows pass, so the scratch holds about `keep` vectors, not `keep` per group.
`fold_samples` keeps the `keep` smallest keys as the groups' samples arrive; where fewer than
min(keep, usable rows) passed the bound (many unusable rows), the caller runs the pass again with bound 1
(every row passes): either way the sample is the `keep` smallest keys, the same rows. `choose` splits it
into recall queries and training rows (disjoint, each sorted by pool row), and `read_sample` gathers their
vectors from the scratch files. The driver holds 16 bytes per sampled row (key, id) and O(files) counts.
"""
from __future__ import annotations

import io
import math
from typing import Iterable, Optional

import numpy as np

from reinforge.formats.embeddings import EmbeddingError, iter_embeddings, merge_skipped
from reinforge.io.storage import read_bytes, write_bytes


def key_bound(keep: int, raw_rows: int) -> float:
    """A key bound that about 5 % (and 8 standard deviations) more than `keep` of `raw_rows` uniform keys
    pass; 1 (every row passes) where it would let half of them or more pass."""
    bound = (1.05 * keep + 8 * math.sqrt(keep) + 64) / max(1, raw_rows)
    return 1.0 if bound >= 0.5 else bound


def row_id(file: int | np.ndarray, row: int | np.ndarray) -> np.ndarray:
    """A row's id in the sample: file number and row within the file in one int64 (their order is the pool's)."""
    return (np.asarray(file, np.int64) << 32) | row


def _smallest(keys: np.ndarray, ids: np.ndarray, keep: int) -> np.ndarray:
    """Positions of the `keep` smallest (key, file, row), in that order."""
    return np.lexsort((ids, keys))[:keep]


def sample_group(files: list[str], first_file: int, scratch_url: str, key: Optional[str], seed: int, keep: int,
                 bound: float) -> dict:
    """Pass 1 on a worker: usable rows per file, and the group's `keep` rows with the smallest keys among
    those with a key <= `bound`: their keys and row ids (row_id) are returned, sorted by id, and written
    with their vectors to `scratch_url` (.npz: ids, vectors)."""
    rows, parts, keys, ids = [], [], np.zeros(0), np.zeros(0, np.int64)
    vectors, dim, used_key = None, None, None
    for j, emb in enumerate(iter_embeddings(files, key)):
        n = len(emb.vectors)
        rows.append(n)
        parts.append({"skipped": emb.skipped, "skipped_sample": emb.skipped_sample})
        dim, used_key = dim or emb.dim, used_key or emb.key
        file_keys = np.random.default_rng([seed, first_file + j]).random(n)
        cand = np.flatnonzero(file_keys <= bound)
        if len(cand) > keep:  # ties at the cut are settled with the rest, by (key, file, row)
            cand = cand[file_keys[cand] <= np.sort(file_keys[cand])[keep - 1]]
        keys = np.concatenate([keys, file_keys[cand]])
        ids = np.concatenate([ids, row_id(first_file + j, cand)])
        vectors = emb.vectors[cand] if vectors is None else np.concatenate([vectors, emb.vectors[cand]])
        best = _smallest(keys, ids, keep)  # bounded: one file's candidates + the sample
        keys, ids, vectors = keys[best], ids[best], vectors[best]
    order = np.argsort(ids)
    keys, ids = keys[order], ids[order]
    buf = io.BytesIO()
    np.savez(buf, ids=ids, vectors=vectors[order] if vectors is not None else np.zeros((0, dim or 0), np.float32))
    write_bytes(scratch_url, buf.getvalue())
    skipped, sample = merge_skipped(parts)
    return {"rows": rows, "dim": dim, "key": used_key, "skipped": skipped, "skipped_sample": sample,
            "keys": keys, "ids": ids}


def fold_samples(scans: Iterable[dict], files: list[str], keep: int) -> dict:
    """The groups' samples folded as they arrive: the `keep` smallest keys and their row ids (16 bytes a row;
    the pieces are cut to `keep` once they hold twice as many), rows per file (O(files)), skipped rows."""
    out, keys, ids, held = None, [], [], 0
    for g, part in enumerate(scans):
        if out is None:
            out = {**part, "rows": []}
        elif (part["dim"], part["key"]) != (out["dim"], out["key"]):
            raise EmbeddingError(f"{files[0]}: key {out['key']!r} dim {out['dim']}, but a later file "
                                 f"of group {g} has key {part['key']!r} dim {part['dim']}")
        else:
            out["skipped"], out["skipped_sample"] = merge_skipped([out, part])
        out["rows"] += part["rows"]
        keys.append(part["keys"])
        ids.append(part["ids"])
        held += len(part["keys"])
        if held > 2 * keep:  # bounded: back to the `keep` smallest
            keys, ids = _cut(keys, ids, keep)
            held = keep
    if out is not None:
        keys, ids = _cut(keys, ids, keep)
        out["keys"], out["ids"] = keys[0], ids[0]
    return out


def _cut(keys: list[np.ndarray], ids: list[np.ndarray], keep: int) -> tuple[list, list]:
    """The pieces' `keep` smallest (key, id), as one piece."""
    keys, ids = np.concatenate(keys), np.concatenate(ids)
    best = _smallest(keys, ids, keep)
    return [keys[best]], [ids[best]]


def complete(scan: dict, keep: int) -> bool:
    """Whether the folded sample holds the pool's `keep` smallest keys: min(keep, usable rows) passed."""
    return len(scan["keys"]) >= min(keep, sum(scan["rows"]))


def choose(scan: dict, files: list[str], recall_queries: int, train_size: int) -> tuple:
    """(query rows, query ids, training ids) of the folded sample: the recall queries are its first keys,
    the training rows the next `train_size` (all the queries where the pool has no more rows); rows are
    global (in file order), ids are row_id's, each sorted."""
    rows = scan["rows"]
    n = sum(rows)
    if not n:
        raise EmbeddingError(f"embeddings: no usable rows in {len(files)} file(s) ({files[0]}, ...); "
                             f"skipped: {scan['skipped'] or 'none (the files are empty)'}")
    ids = scan["ids"][_smallest(scan["keys"], scan["ids"], len(scan["ids"]))]
    n_queries = min(recall_queries, max(1, n // 10))
    queries = np.sort(ids[:n_queries])
    train = np.sort(ids[n_queries:n_queries + train_size]) if n > n_queries else queries
    return np.cumsum([0] + rows)[queries >> 32] + (queries & 0xFFFFFFFF), queries, train


def read_sample(scratch_urls: list[str], first_files: list[int], wanted: list[np.ndarray], dim: int) -> list:
    """The vectors of each list of row ids, from the scratch files of the groups (whose first files are
    `first_files`) that hold them, one file at a time."""
    out = [np.zeros((len(w), dim), np.float32) for w in wanted]
    group = [np.searchsorted(first_files, w >> 32, "right") - 1 for w in wanted]
    for g in np.unique(np.concatenate(group)).tolist():
        with np.load(io.BytesIO(read_bytes(scratch_urls[g])), allow_pickle=False) as scratch:
            ids, vectors = scratch["ids"], scratch["vectors"]
        for got, w, mine in zip(out, wanted, group):
            mine = mine == g
            at = np.searchsorted(ids, w[mine])
            if (at >= len(ids)).any() or not np.array_equal(ids[at], w[mine]):
                raise RuntimeError(f"{scratch_urls[g]}: sample rows missing (scratch files changed?)")
            got[mine] = vectors[at]
    return out
