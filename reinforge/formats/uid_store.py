"""Bounded-memory stores for the split builder: uid rows radix-partitioned by their top byte, and
growing sorted subset files. Partitions are visited in uid order, so outputs come out globally
sorted without a merge; past `memory_rows` both spill to local temporary files."""
from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np

from reinforge.formats.subset import SUBSET_DTYPE
from reinforge.io.storage import atomic_open

_RECORD = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("key", "<i4")])


def _partition(hi, lo, key) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Split rows by the top byte of hi (stable, so input order survives inside a partition)."""
    top = (hi >> np.uint64(56)).astype(np.uint8)
    order = np.argsort(top, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(top, minlength=256))]
    hi, lo, key = hi[order], lo[order], key[order]
    for p in range(256):
        a, b = bounds[p], bounds[p + 1]
        if b > a:
            yield p, hi[a:b], lo[a:b], key[a:b]


class RowStore:
    """(uid, bucket key) rows in input order; in memory up to `memory_rows`, then partitioned to disk."""

    def __init__(self, memory_rows: int, spill_dir: str):
        self.memory_rows = memory_rows
        self.spill_dir = spill_dir
        self.chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.buffered = 0
        self.spilled = False

    def add(self, hi, lo, key) -> None:
        self.chunks.append((hi, lo, key))
        self.buffered += len(hi)
        if self.buffered >= self.memory_rows:
            self._spill()

    def _drain(self):
        if not self.chunks:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int32)
        hi, lo, key = (np.concatenate(c) for c in zip(*self.chunks))
        self.chunks, self.buffered = [], 0
        return hi, lo, key

    def _spill(self) -> None:
        self.spilled = True
        for p, hi, lo, key in _partition(*self._drain()):
            rec = np.empty(len(hi), _RECORD)
            rec["hi"], rec["lo"], rec["key"] = hi, lo, key
            with open(os.path.join(self.spill_dir, f"part-{p:03d}.bin"), "ab") as f:
                rec.tofile(f)

    def partitions(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if not self.spilled:
            for _, hi, lo, key in _partition(*self._drain()):
                yield hi, lo, key
            return
        self._spill()
        for p in range(256):
            path = os.path.join(self.spill_dir, f"part-{p:03d}.bin")
            if os.path.exists(path):
                rec = np.fromfile(path, _RECORD)
                os.remove(path)
                yield rec["hi"].copy(), rec["lo"].copy(), rec["key"].copy()


class SubsetOut:
    """A growing sorted uid file: chunks in memory, or appended to a raw temporary file when spilling."""

    def __init__(self, spill_path: Optional[str]):
        self.spill_path = spill_path
        self.chunks: list[np.ndarray] = []
        self.count = 0

    def append(self, hi: np.ndarray, lo: np.ndarray) -> None:
        rec = np.empty(len(hi), SUBSET_DTYPE)
        rec["f0"], rec["f1"] = hi, lo
        self.count += len(rec)
        if self.spill_path:
            with open(self.spill_path, "ab") as f:
                rec.tofile(f)
        else:
            self.chunks.append(rec)

    def write(self, url: str) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(SUBSET_DTYPE), "fortran_order": False, "shape": (self.count,)}
        with atomic_open(url) as out:  # the bytes np.save would write, streamed
            np.lib.format.write_array_header_1_0(out, header)
            if self.spill_path and os.path.exists(self.spill_path):
                with open(self.spill_path, "rb") as f:
                    while block := f.read(64 << 20):
                        out.write(block)
                os.remove(self.spill_path)
            for rec in self.chunks:
                out.write(rec.tobytes())
