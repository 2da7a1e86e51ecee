"""The planner's small array steps against their plain definitions (issue #16): bucket_of (a table per
16-bit uid prefix, searches only where a bucket start lies) and lexsort_nonnegative (packed keys)."""
from __future__ import annotations

import numpy as np
import pytest

from reinforge.formats.subset import make_subset
from reinforge.products.reshard.assignment import lexsort_nonnegative
from reinforge.io.parts import bucket_of


def buckets_by_definition(hi, lo, bounds) -> np.ndarray:
    """How many bucket starts (hi, lo) are <= each uid, pair by pair."""
    starts = bounds.tolist()
    return np.array([sum(1 for s in starts if s <= (int(h), int(l))) for h, l in zip(hi, lo)], np.int64)


@pytest.mark.parametrize("scale", [1, 2**40, 2**48, 2**60])
def test_bucket_of_is_the_count_of_starts_at_or_below(scale):
    """Starts sharing a high half, starts at a prefix's first value, uids equal to a start's high half with
    lower, equal and higher low halves, uids just below a start, no starts at all."""
    rng = np.random.default_rng(scale % 1000)
    for trial in range(150):
        f0 = rng.integers(0, 20, int(rng.integers(0, 12))).astype(np.uint64) * np.uint64(scale)
        bounds = np.unique(make_subset(f0, rng.integers(0, 5, len(f0)).astype(np.uint64)))
        hi = rng.integers(0, 22, 300).astype(np.uint64) * np.uint64(scale)
        hi += rng.integers(0, 3, 300).astype(np.uint64) * np.uint64(trial % 2)
        hi -= np.uint64(trial % 3 == 0)  # wraps 0 to the largest uid
        lo = rng.integers(0, 6, 300).astype(np.uint64)
        assert (bucket_of(hi, lo, bounds) == buckets_by_definition(hi, lo, bounds)).all(), trial


def test_lexsort_nonnegative_is_lexsort():
    rng = np.random.default_rng(1)
    for trial in range(300):
        n = int(rng.integers(0, 2000))
        keys = tuple(rng.integers(0, int(rng.integers(1, 2**40)), n, dtype=np.int64) for _ in range(3))
        if trial % 3 == 0:
            keys = (keys[0] * 0,) + keys[1:]  # a key of zeros: no bits
        if trial % 5 == 0:
            keys = tuple(k.astype(np.int32) % 7 for k in keys)  # many ties
        if trial % 7 == 0:
            keys = keys[:2] + (keys[2] << 23,)  # wider than 64 bits together: lexsort itself
        assert (lexsort_nonnegative(keys) == np.lexsort(keys)).all(), trial
