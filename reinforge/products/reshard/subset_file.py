"""The reshard subset file (DataComp's sorted unique u8,u8 .npy, with its optional counts .npy) as the planning
passes read it: checked once, a block at a time, then read by row range. A file that is not sorted and unique
(not DataComp's format, but seen in the wild) is normalised as formats/subset.read_subset does it, in memory,
into the plan's work folder, and that copy is read instead."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from reinforge.formats.subset import (SUBSET_DTYPE, SubsetError, counts_path, is_sorted_unique, make_subset,
                                      read_subset, write_subset)
from reinforge.io.storage import exists, filesystem

BLOCK = 1 << 20  # bytes the driver checks at a time (its working set is a few copies of a block)
SHARD_SAMPLES = 10_000  # samples in a typical pool shard (img2dataset's default): sizes passes before shards are read


def partition_size(n: int) -> int:
    """Rows per partition for n rows: 256k (a task holds a few arrays of that size) up to ~16M rows, then
    64 * sqrt(n), so the pieces one pass hands the next (buckets x ranges of them) stay large: ~2.3M rows
    per partition and ~560 partitions at 1.28B."""
    return max(1 << 18, int(64 * math.sqrt(n)))


def npy_layout(url: str) -> tuple[int, np.dtype, int]:
    """(rows, dtype, header bytes) of a .npy file, from its header alone."""
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        header = f.tell()
    if fortran and len(shape) > 1:
        raise ValueError(f"{url}: a Fortran-ordered array")
    return int(np.prod(shape, dtype=np.int64)), dtype, header


def read_rows(url: str, dtype: np.dtype, header: int, start: int, stop: int) -> np.ndarray:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        f.seek(header + start * dtype.itemsize)
        data = f.read((stop - start) * dtype.itemsize)
    return np.frombuffer(data, dtype)


@dataclass
class SubsetFile:
    """Where the rows are (the file read, its counts file) and what the check found: rows, copies, sha256
    of the file, and the uid buckets (their first rows, and their first uids but the first bucket's)."""
    url: str
    dtype: np.dtype
    header: int
    counts_url: Optional[str]
    counts_dtype: Optional[np.dtype]
    counts_header: Optional[int]
    rows: int = 0
    total: int = 0
    sha256: str = ""
    counts_file: Optional[str] = None  # the counts file the recipe named (reshard.json reports it)
    bounds: np.ndarray = field(default_factory=lambda: np.zeros(0, SUBSET_DTYPE))
    starts: list[int] = field(default_factory=lambda: [0, 0])
    repeated_entries: int = 0
    notes: list = field(default_factory=list)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows start..stop-1 as u8,u8 uids, and their counts (int64; ones without a counts file)."""
        raw = read_rows(self.url, self.dtype, self.header, start, stop)
        names = raw.dtype.names
        uids = make_subset(raw[names[0]].astype("<u8"), raw[names[1]].astype("<u8"))
        if self.counts_url is None:
            return uids, np.ones(len(uids), np.int64)
        return uids, read_rows(self.counts_url, self.counts_dtype, self.counts_header, start, stop).astype(np.int64)


def _npy(url: str, what: str) -> tuple[int, np.dtype, int]:
    if not exists(url):
        raise SubsetError(f"{what} file {url} not found")
    try:
        return npy_layout(url)
    except (ValueError, OSError, EOFError) as exc:
        raise SubsetError(f"{url}: not a readable .npy file ({exc})") from None


def open_subset(url: str, counts: str, work: str, bucket_rows: Optional[int] = None) -> SubsetFile:
    """Check the subset file (and counts: "auto", "none" or a path, as read_subset takes them) a block at a
    time, hashing it and taking every bucket's first uid; the same errors as read_subset."""
    rows, dtype, header = _npy(url, "subset")
    if dtype.names is None or len(dtype.names) != 2 or any(dtype[i].kind != "u" or dtype[i].itemsize != 8
                                                           for i in range(2)):
        raise SubsetError(f"{url}: dtype {dtype} is not DataComp's u8,u8 subset format")
    counts_file = None if counts == "none" else (counts_path(url) if counts == "auto" else counts)
    if counts_file and counts == "auto" and not exists(counts_file):
        counts_file = None
    subset = SubsetFile(url, dtype, header, counts_file, None, None, rows, counts_file=counts_file)
    if counts_file:
        n, subset.counts_dtype, subset.counts_header = _npy(counts_file, "counts")
        if subset.counts_dtype.kind not in "ui":
            raise SubsetError(f"{counts_file}: counts dtype {subset.counts_dtype} is not an integer type")
        if n != rows:
            raise SubsetError(f"{counts_file}: {n} counts for {rows} uids in {url}")
    fs, path = filesystem(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    subset.sha256 = digest.hexdigest()
    ordered, largest, previous, step = True, 0, None, max(1, BLOCK // dtype.itemsize)
    for a in range(0, rows, step):
        uids, copies = subset.read(a, min(a + step, rows))
        if len(copies) and copies.min() < 1:
            raise SubsetError(f"{counts_file}: counts must be >= 1 (found {int(copies.min())})")
        subset.total += int(copies.sum())
        largest = max(largest, int(copies.max(initial=0)))
        ordered = ordered and is_sorted_unique(uids if previous is None else np.concatenate([previous, uids]))
        previous = uids[-1:]
    if not ordered:
        return _normalised(url, counts, work, bucket_rows, subset.sha256)
    if largest > np.iinfo(np.uint32).max:
        raise SubsetError(f"{url}: a multiplicity exceeds uint32")
    if rows:
        subset.starts = list(range(0, rows, bucket_rows or partition_size(rows))) + [rows]
        subset.bounds = np.concatenate([subset.read(s, s + 1)[0] for s in subset.starts[1:-1]]
                                       or [np.zeros(0, SUBSET_DTYPE)])
    return subset


def _normalised(url: str, counts: str, work: str, bucket_rows: Optional[int], sha256: str) -> SubsetFile:
    """Not DataComp's format: sorted and folded in memory (read_subset), written to `work`, opened again."""
    loaded = read_subset(url, counts)
    copy = f"{work}/subset.npy"
    write_subset(copy, loaded.uids, loaded.counts)
    subset = open_subset(copy, counts_path(copy), work, bucket_rows)
    subset.sha256, subset.counts_file = sha256, loaded.counts_file
    subset.repeated_entries, subset.notes = loaded.repeated_entries, loaded.notes
    return subset
