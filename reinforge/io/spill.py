"""Uid rows spilled to local files by the high bits of the uid, read back one bucket at a time in uid
order: the driver sorts, deduplicates or merges a pool of any size holding one bucket, never the pool.

Bucket b holds the uids whose top `bits` bits of the high half equal b, so buckets in ascending order
are ranges of uid order; rows inside a bucket come back in the order they were added (a stable sort of
a bucket keeps input order among equal uids). Each row may carry one payload field (a row index, a count).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterator, Optional

import numpy as np

ROWS_PER_BUCKET = 1 << 18  # aim: a bucket of a few tens of MB (sorting takes ~100 B a row), up to 2^27 rows


def bucket_bits(rows: int, min_bits: int = 4, max_bits: int = 9) -> int:
    """Enough buckets for ~ROWS_PER_BUCKET rows each (at least 16, so small pools use the same path)."""
    wanted = int(np.ceil(np.log2(max(1.0, rows / ROWS_PER_BUCKET))))
    return min(max_bits, max(min_bits, wanted))  # max_bits: one open file per bucket


class UidSpill:
    """Append (hi, lo[, payload]) rows; iterate buckets as (hi, lo, payload) arrays in uid-range order."""

    def __init__(self, bits: int, payload: Optional[np.dtype] = None, folder: Optional[str] = None):
        self.bits = bits
        fields = [("hi", "<u8"), ("lo", "<u8")] + ([("p", np.dtype(payload))] if payload is not None else [])
        self.dtype = np.dtype(fields)
        self.folder = tempfile.mkdtemp(prefix="reinforge-uid-spill-", dir=folder)
        self.files = [open(os.path.join(self.folder, f"{b:04d}.bin"), "wb") for b in range(1 << bits)]
        self.rows = 0

    def add(self, hi: np.ndarray, lo: np.ndarray, payload: Optional[np.ndarray] = None) -> None:
        if not len(hi):
            return
        records = np.empty(len(hi), self.dtype)
        records["hi"], records["lo"] = hi, lo
        if payload is not None:
            records["p"] = payload
        bucket = (np.asarray(hi, np.uint64) >> np.uint64(64 - self.bits)).astype(np.int64) if self.bits else \
            np.zeros(len(hi), np.int64)
        order = np.argsort(bucket, kind="stable")  # stable: input order inside a bucket
        records, bucket = records[order], bucket[order]
        bounds = np.searchsorted(bucket, np.arange((1 << self.bits) + 1))
        for b in np.flatnonzero(bounds[1:] > bounds[:-1]):
            self.files[b].write(records[bounds[b]:bounds[b + 1]].tobytes())
        self.rows += len(hi)

    def buckets(self) -> Iterator[np.ndarray]:
        """Each bucket's records (fields hi, lo[, p]), ascending bucket order."""
        for f in self.files:
            f.close()
        for b in range(1 << self.bits):
            path = os.path.join(self.folder, f"{b:04d}.bin")
            records = np.fromfile(path, self.dtype)
            os.remove(path)  # the disk holds at most what is still to be read
            yield records

    def close(self) -> None:
        for f in self.files:
            f.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "UidSpill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
