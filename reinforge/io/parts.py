"""Part files, how passes of tasks hand rows to each other (reshard and join planning, `filter apply`, `schedule`,
`splits`): rows of fixed columns grouped by part (a uid bucket, a key range, ...): part after part, each part its
columns one after the other, so rows start..stop of a file are bytes start*width .. stop*width and a task reads
just its part of every file. Ragged values (face boxes) go in a part file of their own, grouped the same way.

uid buckets: bucket b holds the uids whose top `bits` bits of the high half equal b, so buckets in order are
ranges of uid order; rows keep the order they were written in inside a bucket (a stable sort of a bucket keeps
input order among equal uids)."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from reinforge.io.storage import atomic_open, filesystem


def write_parts(url: str, columns: dict[str, np.ndarray], part: np.ndarray, parts: int) -> np.ndarray:
    """Write the rows grouped by part (stable), and return each part's row count."""
    counts = np.bincount(part, minlength=parts)
    order = np.argsort(part.astype(np.uint16) if parts <= 1 << 16 else part, kind="stable")  # uint16: a radix sort
    grouped = {name: values[order] for name, values in columns.items()}
    ends = np.cumsum(counts)
    with atomic_open(url) as f:  # piece by piece: no joined copy of the file in memory
        for n, end in zip(counts.tolist(), ends.tolist()):
            for name in columns:
                f.write(memoryview(grouped[name][end - n:end]).cast("B"))
    return counts


def concatenate_columns(pieces: dict[str, list[np.ndarray]], dtypes: dict[str, type]) -> dict[str, np.ndarray]:
    """Each column's pieces joined (an empty column of its dtype when there are none)."""
    return {name: np.concatenate(v) if v else np.zeros(0, dtypes[name]) for name, v in pieces.items()}


def read_parts(parts: list[tuple[str, int, int]], dtypes: dict[str, type]) -> dict[str, np.ndarray]:
    """Rows start..stop-1 of each (file, start, stop), concatenated in the order given."""
    width = sum(np.dtype(t).itemsize for t in dtypes.values())
    out = {name: [] for name in dtypes}
    for url, start, stop in parts:
        if stop <= start:
            continue
        fs, path = filesystem(url)
        with fs.open(path, "rb") as f:
            f.seek(start * width)
            data = f.read((stop - start) * width)
        at = 0
        for name, t in dtypes.items():
            out[name].append(np.frombuffer(data, t, stop - start, at))
            at += (stop - start) * np.dtype(t).itemsize
    return concatenate_columns(out, dtypes)


PREFIX_BITS = 16  # bucket_of's lookup table: one entry per value of a uid's top 16 bits


def bucket_of(hi: np.ndarray, lo: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The uid bucket of each uid: how many bucket starts (sorted u8,u8 `bounds`) are <= it."""
    f0 = bounds["f0"]
    if not len(bounds):
        return np.zeros(len(hi), np.int64)
    # a binary search per uid costs ~30 ns (random keys mispredict every branch); most top-16-bit prefixes
    # hold no bucket start, so a table per prefix answers those uids, and only uids of a prefix that holds
    # one are searched
    shift = np.uint64(64 - PREFIX_BITS)
    prefixes = np.arange(1 << PREFIX_BITS, dtype=np.uint64)
    first = np.searchsorted(f0, prefixes << shift, side="left")  # starts below the prefix
    last = np.searchsorted(f0, (prefixes << shift) | ~(~np.uint64(0) << shift), side="right")  # and inside it
    prefix = hi >> shift
    b = first[prefix]
    mixed = np.flatnonzero(last[prefix] != b)
    b[mixed] = np.searchsorted(f0, hi[mixed], side="right")
    # a start with the same high half counts only if its low half is <= lo: only uids whose high half
    # is that start's need the look (rare: uids are hashes)
    todo = mixed[(f0[np.maximum(b[mixed], 1) - 1] == hi[mixed]) & (b[mixed] > 0)]
    while len(todo):
        above = (f0[b[todo] - 1] == hi[todo]) & (bounds["f1"][b[todo] - 1] > lo[todo])
        todo = todo[above]
        b[todo] -= 1
        todo = todo[b[todo] > 0]
    return b


ROWS_PER_BUCKET = 1 << 18  # aim: a bucket of a few tens of MB (sorting takes ~100 B a row), up to 2^27 rows


def bucket_bits(rows: int, min_bits: int = 4, max_bits: int = 9) -> int:
    """Enough uid buckets for ~ROWS_PER_BUCKET of `rows` rows each (at least 16, so small inputs take the same
    path; at most 512, so the per-unit bucket counts the driver keeps stay small)."""
    wanted = int(np.ceil(np.log2(max(1.0, rows / ROWS_PER_BUCKET))))
    return min(max_bits, max(min_bits, wanted))


def uid_bucket(hi: np.ndarray, bits: int) -> np.ndarray:
    """The uid bucket of each high half: its top `bits` bits (buckets in order are ranges of uid order)."""
    return (hi >> np.uint64(64 - bits)).astype(np.int64)


def write_uid_buckets(url: str, columns: dict[str, np.ndarray], bits: int) -> np.ndarray:
    """Rows (columns with "hi") to a part file grouped by uid bucket; their count per bucket."""
    return write_parts(url, columns, uid_bucket(columns["hi"], bits), 1 << bits)


def bucket_parts(files: list[str], counts: np.ndarray) -> Iterator[list[tuple[str, int, int]]]:
    """Per part, in order, its (file, first row, end row) in each of `files`, which hold counts[file, part] rows
    of it (empty pieces left out): what read_parts takes. Made one part at a time, as tasks start."""
    ends = np.cumsum(counts, axis=1)
    for k in range(counts.shape[1]):
        yield [(f, int(e - n), int(e)) for f, n, e in zip(files, counts[:, k].tolist(), ends[:, k].tolist()) if n]
