"""Which output shard, and which place in it, each copy of each subset uid gets.

Copy r of a uid with multiplicity m gets the sort key (r + phase) / m, where phase in [0, 1) is a hash
of (seed, uid): copies of one uid sit 1/m of the run apart, and distinct uids are shuffled across the
pool. Output shards are consecutive blocks of `samples_per_shard` copies in key order (the last one
shorter). Inside a shard, samples go in (copy round, pool shard, offset) order, so reads move forward
through each pool shard; a copy that would directly follow a copy of the same uid is swapped with the
next different sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


@dataclass
class Copies:
    index: np.ndarray  # per copy: its uid's row in the arrays given
    copy: np.ndarray  # its copy number (int32)
    key: np.ndarray  # its sort key (float64 in [0, 1))


def copy_keys(hi: np.ndarray, lo: np.ndarray, counts: np.ndarray, seed: int) -> Copies:
    """Every copy of every uid (rows in order, copies in order inside) with its sort key
    (copy + phase) / count. Sorting all copies of a subset by key, stably, is its output order."""
    phase = uid_phase(hi, lo, seed)
    if (counts == 1).all():  # (0 + phase) / 1 == phase: the same keys without the expansion
        return Copies(np.arange(len(hi)), np.zeros(len(hi), np.int32), phase)
    counts = counts.astype(np.int64)
    index = np.repeat(np.arange(len(hi)), counts)
    copy = np.arange(len(index)) - np.repeat(np.cumsum(counts) - counts, counts)
    return Copies(index, copy.astype(np.int32), (copy + phase[index]) / counts[index])


def lexsort_nonnegative(keys: tuple[np.ndarray, ...]) -> np.ndarray:
    """np.lexsort(keys) (the last key primary) of non-negative integer keys: when their bits fit in 64,
    one stable argsort of the keys packed into a uint64 (about half lexsort's time), else lexsort."""
    widths = [int(k.max()).bit_length() if len(k) else 0 for k in keys]
    if sum(widths) > 64 or any(len(k) and k.min() < 0 for k in keys):
        return np.lexsort(keys)
    packed, shift = np.zeros(len(keys[0]), np.uint64), 0
    for key, width in zip(keys, widths):
        packed |= key.astype(np.uint64) << np.uint64(shift)
        shift += width
    return np.argsort(packed, kind="stable")


def order_inside(block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One output shard's copies (columns row, copy, shard, offset, ...) in the order they are written:
    (copy round, pool shard, offset), then no copy directly after a copy of the same uid."""
    order = lexsort_nonnegative((block["offset"], block["shard"], block["copy"]))
    _separate_repeats(block["row"][order], order)
    return {name: values[order] for name, values in block.items()}


def _separate_repeats(idx: np.ndarray, order: np.ndarray) -> None:
    """In place, on a shard's uid rows and its order: no sample directly follows a copy of its own uid,
    where another sample can go there."""
    if not (idx[1:] == idx[:-1]).any():
        return
    for i in range(1, len(idx)):
        if idx[i] == idx[i - 1]:
            later = np.flatnonzero(idx[i + 1:] != idx[i - 1])
            if len(later):
                j = i + 1 + int(later[0])
                idx[[i, j]], order[[i, j]] = idx[[j, i]], order[[j, i]]
