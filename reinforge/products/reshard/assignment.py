"""Which output shard, and which place in it, each copy of each subset uid gets.

Copy r of a uid with multiplicity m gets the sort key (r + phase) / m, where phase in [0, 1) is a hash
of (seed, uid): copies of one uid sit 1/m of the run apart, and distinct uids are shuffled across the
pool. Output shards are consecutive blocks of `samples_per_shard` copies in key order (the last one
shorter). Inside a shard, samples go in (copy round, pool shard, offset) order, so reads move forward
through each pool shard; a copy that would directly follow a copy of the same uid is swapped with the
next different sample.
"""
from __future__ import annotations

import numpy as np

from reinforge.formats.subset import stable_argsort


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fixed, well-spread hash of uint64 values."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def uid_phase(hi: np.ndarray, lo: np.ndarray, seed: int, chunk: int = 1 << 20) -> np.ndarray:
    """A fixed hash of (seed, uid) in [0, 1), computed a chunk at a time (the hash's temporaries are
    a chunk's size, not the subset's)."""
    out = np.empty(len(hi), np.float64)
    for a in range(0, len(hi), chunk):
        h = _mix64(hi[a:a + chunk] ^ _mix64(lo[a:a + chunk] ^ np.uint64(seed % 2**64)))
        out[a:a + chunk] = (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return out


def assign(uids: np.ndarray, counts: np.ndarray, shard: np.ndarray, offset: np.ndarray,
           samples_per_shard: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(uid index, copy number) of every output sample in output order, and the size of each shard."""
    total = int(counts.sum(dtype=np.int64))
    if total == len(uids):  # every count 1: key = phase, copy = 0 (the same keys, without the expansion)
        hi, lo = uids["f0"], uids["f1"]  # the phases a chunk at a time, never all in memory
        idx = stable_argsort(lambda part: uid_phase(hi[part], lo[part], seed).view(np.uint64), n=len(uids))
        copy = np.zeros(total, np.int32)
    else:
        counts = counts.astype(np.int64)
        idx = np.repeat(np.arange(len(uids)), counts)
        copy = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        key = (copy + uid_phase(uids["f0"], uids["f1"], seed)[idx]) / counts[idx]
        order = stable_argsort(key.view(np.uint64))  # ties: uid order, then copy order
        idx, copy = idx[order], copy[order].astype(np.int32)
    sizes = [min(samples_per_shard, total - s) for s in range(0, total, samples_per_shard)]
    start = 0
    for size in sizes:
        block = slice(start, start + size)
        inner = np.lexsort((offset[idx[block]], shard[idx[block]], copy[block]))
        idx[block], copy[block] = idx[block][inner], copy[block][inner]
        _separate_repeats(idx[block], copy[block])
        start += size
    return idx, copy, sizes


def _separate_repeats(idx: np.ndarray, copy: np.ndarray) -> None:
    """In place: no sample directly follows a copy of its own uid, where another sample can go there."""
    if not (idx[1:] == idx[:-1]).any():
        return
    for i in range(1, len(idx)):
        if idx[i] == idx[i - 1]:
            later = np.flatnonzero(idx[i + 1:] != idx[i - 1])
            if len(later):
                j = i + 1 + int(later[0])
                idx[[i, j]], copy[[i, j]] = idx[[j, i]], copy[[j, i]]
