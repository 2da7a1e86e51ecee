"""The exact k-th smallest of values streamed in batches, without holding them (issue #16): a radix selection.

Values map to unsigned keys whose unsigned order is their numeric order (`order_keys`). Each pass over the
batches counts the next 16 bits of the keys that share the bits fixed so far (a 65536-bin histogram) and fixes
the digit whose bin holds the k-th smallest: 2 passes for 4-byte keys, 4 for 8-byte ones. Once the keys left
in the bin are few (SMALL), one more pass gathers them and finishes in memory, which saves the later passes
when values are spread out. Memory: one histogram (512 KiB) and at most SMALL keys, whatever the row count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol

import numpy as np

RADIX = 16
BINS = 1 << RADIX
SMALL = 1 << 16  # keys gathered into memory once the bin holding the k-th smallest is this small


@dataclass(frozen=True)
class Selected:
    count: int            # keys in all
    key: Optional[int]    # the k-th smallest; None when rank(count) asked for none
    below: int = 0        # keys smaller than it
    equal: int = 0        # keys equal to it (itself included)


class Keys(Protocol):
    """Keys a selection reads in passes: streamed batches (StreamedKeys), or tasks over a file's units."""

    def histogram(self, key_bits: int, prefix: int, fixed: int) -> np.ndarray:
        """The BINS-bin histogram of the next RADIX bits of every key whose top `fixed` bits are `prefix`."""

    def gather(self, key_bits: int, prefix: int, fixed: int) -> np.ndarray:
        """Every key whose top `fixed` bits are `prefix`."""


class StreamedKeys:
    """The keys every call of `passes()` yields, batch by batch, in the same order."""

    def __init__(self, passes: Callable[[], Iterable[np.ndarray]]):
        self.passes = passes

    def histogram(self, key_bits: int, prefix: int, fixed: int) -> np.ndarray:
        return sum_histograms(bin_histogram(keys, key_bits, prefix, fixed) for keys in self.passes())

    def gather(self, key_bits: int, prefix: int, fixed: int) -> np.ndarray:
        return concatenate_keys(in_bin(keys, key_bits, prefix, fixed) for keys in self.passes())


def radix_select(passes: Callable[[], Iterable[np.ndarray]], rank: Callable[[int], Optional[int]],
                 key_bits: int, count: Optional[int] = None) -> Selected:
    """select() over the unsigned keys that every call of `passes()` yields, batch by batch."""
    return select(StreamedKeys(passes), rank, key_bits, count)


def select(keys: Keys, rank: Callable[[int], Optional[int]], key_bits: int, count: Optional[int] = None) -> Selected:
    """The k-th smallest (0-based, k = rank(number of keys), None for none) of the unsigned `keys`. `count`:
    the number of keys, when the caller knows it (few keys are then gathered in one pass)."""
    k = None if count is None else rank(count)
    if count is not None and k is None:
        return Selected(count, None)
    prefix = fixed = below = 0  # the top `fixed` bits of the k-th smallest, and the keys below that prefix
    left = count  # keys that share the prefix
    while fixed < key_bits:
        if left is not None and left <= SMALL:
            return _gather(keys, k, key_bits, prefix, fixed, below, count)
        histogram = keys.histogram(key_bits, prefix, fixed)
        if count is None:  # the first pass counted the keys
            count = int(histogram.sum())
            k = rank(count)
            if k is None:
                return Selected(count, None)
        if not 0 <= k < count:
            raise ValueError(f"rank {k} of {count} keys")
        cumulative = np.cumsum(histogram)
        digit = int(np.searchsorted(cumulative, k - below, side="right"))  # the bin holding the k-th smallest
        below += int(cumulative[digit] - histogram[digit])
        left = int(histogram[digit])
        prefix, fixed = (prefix << RADIX) | digit, fixed + RADIX
    return Selected(count, prefix, below, left)


def in_bin(keys: np.ndarray, key_bits: int, prefix: int, fixed: int) -> np.ndarray:
    """The keys whose top `fixed` bits are `prefix`."""
    if not fixed:
        return keys
    t = keys.dtype.type
    return keys[(keys >> t(key_bits - fixed)) == t(prefix)]


def bin_histogram(keys: np.ndarray, key_bits: int, prefix: int, fixed: int) -> np.ndarray:
    """One batch's share of Keys.histogram."""
    keys = in_bin(keys, key_bits, prefix, fixed)
    shift = keys.dtype.type(key_bits - fixed - RADIX)
    return np.bincount(((keys >> shift) & keys.dtype.type(BINS - 1)).astype(np.intp), minlength=BINS)


def sum_histograms(parts: Iterable[np.ndarray]) -> np.ndarray:
    total = np.zeros(BINS, np.int64)
    for part in parts:
        total += part
    return total


def concatenate_keys(parts: Iterable[np.ndarray]) -> np.ndarray:
    parts = list(parts)
    return np.concatenate(parts) if parts else np.empty(0, np.uint64)


def _gather(keys: Keys, k: int, key_bits: int, prefix: int, fixed: int, below: int, count: int) -> Selected:
    """Finish in memory: the keys sharing the prefix, partitioned at the k-th smallest."""
    keys = keys.gather(key_bits, prefix, fixed)
    if not 0 <= k - below < len(keys):
        raise ValueError(f"rank {k} of {count} keys: {len(keys)} keys after {below} below")
    keys.partition(k - below)
    key = keys[k - below]
    return Selected(count, int(key), below + int((keys < key).sum()), int((keys == key).sum()))


def order_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned keys of the same width whose unsigned order is the values' numeric order (values without NaN).
    Floats: -0.0 takes 0.0's key (they are ==); negatives have every bit flipped, the rest the sign bit.
    Signed ints: the sign bit flipped."""
    values = np.ascontiguousarray(values)
    kind, size = values.dtype.kind, values.dtype.itemsize
    unsigned = np.dtype(f"u{size}")
    sign = unsigned.type(1 << (8 * size - 1))
    if kind == "u":
        return values
    bits = values.view(unsigned)
    if kind == "i":
        return bits ^ sign
    if kind != "f":
        raise TypeError(f"no order keys for {values.dtype}")
    bits = np.where(bits == sign, unsigned.type(0), bits)  # -0.0 -> +0.0, by its bits (no float arithmetic)
    return np.where(bits & sign, ~bits, bits | sign)


def key_value(key: int, dtype) -> np.generic:
    """The value of `dtype` whose order key is `key` (the inverse of order_keys)."""
    dtype = np.dtype(dtype)
    unsigned = np.dtype(f"u{dtype.itemsize}")
    sign = 1 << (8 * dtype.itemsize - 1)
    if dtype.kind == "i":
        key ^= sign
    elif dtype.kind == "f":
        key = key ^ sign if key & sign else ~key & ((sign << 1) - 1)
    return np.array(key, unsigned).view(dtype)[()]
