"""DataComp uid subset files: the pure format code (no Ray, no pipelines).

A uid is 32 hexadecimal characters (128 bits; either case is accepted, written back lower-case).
A subset file is a NumPy `.npy` of the structured dtype `u8,u8` = (high 64 bits, low 64 bits),
sorted ascending and free of repeats: DataComp's resharder and trainers read it as a set.

Multiplicities (a split upsampled in a replay step) go to a parallel file `<stem>.counts.npy`:
uint32, same length and order as the uid file, every entry >= 1. The uid file stays an exact
DataComp subset; a reader that ignores the counts file sees the set of uids. No counts file
means every count is 1.
"""
from __future__ import annotations

import io
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

SUBSET_DTYPE = np.dtype([("f0", "<u8"), ("f1", "<u8")])
COUNTS_DTYPE = np.dtype("<u4")
COUNTS_SUFFIX = ".counts.npy"

# uid_status codes returned by parse_hex_uids
UID_OK, UID_NULL, UID_BAD_LENGTH, UID_NOT_HEX = 0, 1, 2, 3
UID_STATUS_NAMES = {UID_NULL: "null", UID_BAD_LENGTH: "wrong_length", UID_NOT_HEX: "not_hex"}

_HEX_LUT = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_LUT[_c] = 10 + _i


class SubsetError(ValueError):
    """A subset/counts file that is not in the format above; the message names the file."""


def parse_hex_uids(strings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised uid parsing of a pyarrow string array (or a list of str).

    Returns (hi, lo, status): uint64 halves and an int8 status per row (UID_OK, or why not);
    hi/lo of rows that are not UID_OK are 0 and must be ignored by the caller."""
    import pyarrow as pa
    arr = strings if isinstance(strings, (pa.Array, pa.ChunkedArray)) else pa.array(strings, pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_large_string(arr.type) or pa.types.is_string_view(arr.type):
        arr = arr.cast(pa.string())
    if not pa.types.is_string(arr.type):
        raise SubsetError(f"uid column has type {arr.type}, expected strings of 32 hex characters")
    n = len(arr)
    status = np.zeros(n, np.int8)
    if n == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), status
    # byte lengths from the offsets, nulls from the validity bitmap: no pyarrow.compute (0.1 s to import)
    lengths = np.diff(np.frombuffer(arr.buffers()[1], np.int32, n + 1, arr.offset * 4))
    null = np.asarray(arr.is_null().to_numpy(zero_copy_only=False)) if arr.null_count else np.zeros(n, bool)
    status[null] = UID_NULL
    status[~null & (lengths != 32)] = UID_BAD_LENGTH
    good32 = status == UID_OK
    hi = np.zeros(n, np.uint64)
    lo = np.zeros(n, np.uint64)
    sub = arr if good32.all() else arr.filter(pa.array(good32))
    if len(sub) == 0:
        return hi, lo, status
    offsets = np.frombuffer(sub.buffers()[1], np.int32, len(sub) + 1, sub.offset * 4)
    data = np.frombuffer(sub.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
    try:  # fast path: the whole batch is valid hex (C-speed decode of the concatenated text)
        raw = np.frombuffer(bytes.fromhex(data.tobytes().decode("ascii")), ">u8").reshape(-1, 2)
        sub_ok = np.ones(len(sub), bool)
    except ValueError:  # some row is not hex: find which with a lookup table, decode the rest
        nibbles = _HEX_LUT[data.reshape(-1, 32)]
        sub_ok = ~(nibbles == 255).any(axis=1)
        packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
        raw = np.ascontiguousarray(packed).view(">u8").reshape(-1, 2)
    idx = np.flatnonzero(good32)
    hi[idx] = raw[:, 0]
    lo[idx] = raw[:, 1]
    bad = idx[~sub_ok]
    status[bad] = UID_NOT_HEX
    hi[bad] = lo[bad] = 0
    return hi, lo, status


def uid_hex(hi, lo) -> str:
    return f"{int(hi):016x}{int(lo):016x}"


def uids_hex(uids: np.ndarray) -> list[str]:
    return [uid_hex(h, l) for h, l in zip(uids["f0"].tolist(), uids["f1"].tolist())]


def make_subset(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    out = np.empty(len(hi), SUBSET_DTYPE)
    out["f0"] = hi
    out["f1"] = lo
    return out


def stable_argsort(key, chunk: int = 1 << 20, n: int | None = None) -> np.ndarray:
    """np.argsort(key, kind="stable") of uint64 keys (here: uids, or the bits of floats >= 0, which
    order as the floats do). `key` is an array, or a function giving the keys of a slice or of an index
    array (then n is their count), so that the keys need not be in memory at once. Sorts values, not
    indices: (the key's top bits, position) packed in one uint64 and np.sort-ed (a SIMD sort, ~10x an
    argsort at 12.8M); runs whose top bits tie (rare: keys are hashes) are then put in (key, position)
    order. Memory: the packed array, which becomes the result."""
    if not callable(key):
        if key.dtype != np.uint64:
            return np.argsort(key, kind="stable")
        n, key = len(key), key.__getitem__
    bits = max(1, (n - 1).bit_length())  # for the position
    shift, mask = np.uint64(bits), np.uint64((1 << bits) - 1)
    packed = np.empty(n, np.uint64)
    for a in range(0, n, chunk):  # top bits and positions, a chunk at a time
        part = packed[a:a + chunk]
        part[:] = key(slice(a, a + chunk)) >> shift
        part <<= shift
        part |= np.arange(a, a + len(part), dtype=np.uint64)
    packed.sort()
    tie = np.concatenate([np.zeros(0, np.int64)] + [  # i where packed[i], packed[i + 1] share their top bits
        a + np.flatnonzero(((packed[a + 1:e + 1] ^ packed[a:e]) >> shift) == 0)
        for a, e in ((a, min(a + chunk, n - 1)) for a in range(0, max(n - 1, 0), chunk))])
    members = np.unique(np.concatenate([tie, tie + 1]))  # positions inside runs of equal top bits
    heads = packed[members] >> shift
    packed &= mask
    order = packed.view(np.int64)
    if len(members):
        run = np.cumsum(np.r_[True, heads[1:] != heads[:-1]])
        rows = order[members]
        order[members] = rows[np.lexsort((rows, key(rows), run))]
    return order


def uid_order(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Indices that sort (hi, lo) ascending; equal uids keep their input order (first occurrence first).

    A stable sort on hi alone is faster than a two-key lexsort; rows whose hi repeats (duplicates, or
    a 1-in-2^64 collision) are re-ordered among themselves by (lo, input position)."""
    order = stable_argsort(hi)
    sorted_hi = hi[order]
    tie = np.flatnonzero(sorted_hi[1:] == sorted_hi[:-1])
    if len(tie):
        members = np.unique(np.concatenate([tie, tie + 1]))  # positions inside tie groups
        group = np.cumsum(np.r_[True, sorted_hi[members[1:]] != sorted_hi[members[:-1]]])
        rows = order[members]
        order[members] = rows[np.lexsort((rows, lo[rows], group))]
    return order


def first_occurrence(hi_sorted: np.ndarray, lo_sorted: np.ndarray) -> np.ndarray:
    """Mask over uid-sorted rows: True for the first row of each distinct uid."""
    keep = np.ones(len(hi_sorted), bool)
    keep[1:] = (hi_sorted[1:] != hi_sorted[:-1]) | (lo_sorted[1:] != lo_sorted[:-1])
    return keep


def is_sorted_unique(uids: np.ndarray) -> bool:
    hi, lo = uids["f0"], uids["f1"]
    return bool(np.all((hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] > lo[:-1]))))


class UidLookup:
    """A sorted unique subset array prepared for many locate() calls (one per pool shard): where each
    bucket of high halves starts (equal slices of the members' own span of high halves, about 4 uids
    each: uids are hashes, so they fill the slices evenly, also when the members are one uid range of
    many). A lookup walks one bucket, a cache line or two, instead of binary-searching the whole subset
    (~24 random reads per uid at 12.8M). hi and lo are views of the subset, not copies."""

    def __init__(self, members: np.ndarray):
        self.hi, self.lo = members["f0"], members["f1"]
        n = len(members)
        self.base = self.hi[0] if n else np.uint64(0)
        span = int(self.hi[-1]) - int(self.base) if n else 0
        bits = min(40, max(1, int(np.ceil(np.log2(max(n, 1) / 4)))))
        self.shift = np.uint64(max(0, span.bit_length() - bits))
        counts = np.bincount(((self.hi - self.base) >> self.shift).astype(np.intp), minlength=(span >> int(self.shift)) + 1)
        self.starts = np.r_[0, np.cumsum(counts)].astype(np.int32 if n < 2**31 else np.int64)

    def __len__(self) -> int:
        return len(self.hi)

    def search(self, hi: np.ndarray) -> np.ndarray:
        """np.searchsorted(self.hi, hi) (the first position whose high half is >= hi)."""
        last = len(self.starts) - 2  # the last bucket
        inside = hi >= self.base
        bucket = np.where(inside, (hi - self.base) >> self.shift, 0)
        past = bucket > np.uint64(max(last, 0))
        bucket = np.minimum(bucket, np.uint64(max(last, 0))).astype(np.intp)
        pos, end = self.starts[bucket].astype(np.int64), self.starts[bucket + 1]
        pos[past] = end[past]  # beyond the last member's bucket: after every member
        todo = np.flatnonzero(inside & ~past & (pos < end))
        while len(todo):  # past every smaller high half of the bucket; past its end, the next is larger
            todo = todo[self.hi[pos[todo]] < hi[todo]]
            pos[todo] += 1
            todo = todo[pos[todo] < end[todo]]
        return pos


def locate(hi: np.ndarray, lo: np.ndarray, members) -> np.ndarray:
    """Position of each (hi, lo) row in a sorted unique subset array (or its UidLookup), -1 where
    absent. Searches on the high half only (a structured searchsorted is ~20x slower), then walks the
    run of equal high halves (almost always of length 1) comparing the low half."""
    out = np.full(len(hi), -1, np.int64)
    if len(members) == 0 or len(hi) == 0:
        return out
    if isinstance(members, UidLookup):
        m_hi, m_lo, pos = members.hi, members.lo, members.search(hi)
    else:
        m_hi, m_lo = np.ascontiguousarray(members["f0"]), np.ascontiguousarray(members["f1"])
        pos = np.searchsorted(m_hi, hi)
    todo = np.flatnonzero(pos < len(m_hi))
    while len(todo):
        p = pos[todo]
        same_hi = m_hi[p] == hi[todo]
        todo, p = todo[same_hi], p[same_hi]
        hit = m_lo[p] == lo[todo]
        out[todo[hit]] = p[hit]
        todo = todo[~hit]
        pos[todo] += 1
        todo = todo[pos[todo] < len(m_hi)]
    return out


def isin(hi: np.ndarray, lo: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Membership of (hi, lo) rows in a sorted unique subset array."""
    return locate(hi, lo, members) >= 0


def npy_header(dtype: np.dtype, rows: int) -> bytes:
    """The header np.save writes for a 1-d array of `rows` rows of `dtype`: a file written as this header and
    then the rows' bytes, piece by piece, is np.save's file."""
    import io
    header = np.lib.format.header_data_from_array_1_0(np.empty(0, dtype))
    header["shape"] = (rows,)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


class SubsetAppender:
    """Appends pieces of a subset (and its counts) in uid order, checking the order where pieces meet."""

    def __init__(self, url: str, uids_file, counts_file=None):
        self.url, self._uids, self._counts = url, uids_file, counts_file
        self.written, self._last = 0, None

    def append(self, uids: np.ndarray, counts: Optional[np.ndarray] = None) -> None:
        """The next piece: sorted unique uids, all above the last piece's (and their counts)."""
        if len(uids) and self._last is not None and not is_sorted_unique(np.concatenate([self._last, uids[:1]])):
            raise AssertionError(f"{self.url}: pieces out of uid order")
        if len(uids):
            self._last = uids[-1:]
        self._uids.write(uids.tobytes())
        if self._counts is not None:
            self._counts.write(np.asarray(counts, COUNTS_DTYPE).tobytes())
        self.written += len(uids)


@contextmanager
def appending_subset(url: str, rows: int, counts: bool = False) -> Iterator[SubsetAppender]:
    """A subset .npy (with its .counts.npy when `counts`) written piece after piece, as passes over uid buckets
    make them: np.save's bytes, with the row count declared in the header up front and checked at the end.
    Both files appear only if the block completes."""
    from reinforge.io.storage import atomic_open  # fsspec I/O; imported lazily
    with atomic_open(url) as uids_file, (atomic_open(counts_path(url)) if counts else nullcontext()) as counts_file:
        uids_file.write(npy_header(SUBSET_DTYPE, rows))
        if counts:
            counts_file.write(npy_header(COUNTS_DTYPE, rows))
        appender = SubsetAppender(url, uids_file, counts_file)
        yield appender
        if appender.written != rows:
            raise AssertionError(f"{url}: wrote {appender.written} uids, expected {rows}")


def counts_path(subset_path: str) -> str:
    return (subset_path[:-4] if subset_path.endswith(".npy") else subset_path) + COUNTS_SUFFIX


def subset_bytes(uids: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(uids, SUBSET_DTYPE), allow_pickle=False)
    return buf.getvalue()


def counts_bytes(counts: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(counts, COUNTS_DTYPE), allow_pickle=False)
    return buf.getvalue()


def check_subset(uids: np.ndarray, counts: Optional[np.ndarray] = None, name: str = "subset") -> None:
    if uids.dtype.names != ("f0", "f1") or uids.dtype["f0"] != np.uint64 or uids.dtype["f1"] != np.uint64:
        raise SubsetError(f"{name}: dtype {uids.dtype} is not DataComp's u8,u8")
    if uids.ndim != 1:
        raise SubsetError(f"{name}: expected a 1-d array, got shape {uids.shape}")
    if not is_sorted_unique(uids):
        raise SubsetError(f"{name}: uids are not sorted ascending and unique")
    if counts is not None:
        if counts.shape != uids.shape:
            raise SubsetError(f"{name}: counts have shape {counts.shape}, uids {uids.shape}")
        if len(counts) and counts.min() < 1:
            raise SubsetError(f"{name}: counts must be >= 1 (found {int(counts.min())})")


def write_subset(url: str, uids: np.ndarray, counts: Optional[np.ndarray] = None) -> None:
    """Write a sorted unique subset (and `<stem>.counts.npy` when counts are given), atomically."""
    from reinforge.io.storage import write_bytes  # fsspec I/O; imported lazily
    check_subset(uids, counts, url)
    write_bytes(url, subset_bytes(uids))
    if counts is not None:
        write_bytes(counts_path(url), counts_bytes(counts))


@dataclass
class LoadedSubset:
    uids: np.ndarray  # sorted unique u8,u8
    counts: np.ndarray  # uint32 multiplicities, parallel to uids
    path: str
    counts_file: Optional[str] = None
    repeated_entries: int = 0  # repeats inside the uid file itself, folded into counts
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def _load_npy(url: str) -> np.ndarray:
    from reinforge.io.storage import filesystem
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise SubsetError(f"subset file {url} not found")
    try:
        with fs.open(path, "rb") as f:  # read in blocks straight into the array: no second copy of the file
            return np.load(f, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise SubsetError(f"{url}: not a readable .npy file ({exc})") from None


def read_subset(url: str, counts: str = "auto") -> LoadedSubset:
    """Load a subset file. `counts`: "auto" (use `<stem>.counts.npy` if it exists), "none", or a path.

    Policy for a uid file that is not sorted or repeats uids (not DataComp's format, but seen in the
    wild): an unsorted file is sorted; repeats are folded into multiplicities and counted in
    `repeated_entries` (never dropped). Repeats together with a counts file are ambiguous: error."""
    from reinforge.io.storage import exists
    raw = _load_npy(url)
    if raw.dtype.names is None or len(raw.dtype.names) != 2 or any(
            raw.dtype[i].kind != "u" or raw.dtype[i].itemsize != 8 for i in range(2)):
        raise SubsetError(f"{url}: dtype {raw.dtype} is not DataComp's u8,u8 subset format")
    if raw.dtype == SUBSET_DTYPE and raw.ndim == 1:
        uids = raw  # already what make_subset would copy it into
    else:
        uids = make_subset(raw[raw.dtype.names[0]].astype("<u8"), raw[raw.dtype.names[1]].astype("<u8")).reshape(-1)
    del raw
    counts_file = None if counts == "none" else (counts_path(url) if counts == "auto" else counts)
    if counts_file and counts == "auto" and not exists(counts_file):
        counts_file = None
    loaded_counts = None
    if counts_file:
        loaded_counts = _load_npy(counts_file)
        if loaded_counts.dtype.kind not in "ui":
            raise SubsetError(f"{counts_file}: counts dtype {loaded_counts.dtype} is not an integer type")
        loaded_counts = loaded_counts.astype(np.int64).reshape(-1)
        if loaded_counts.shape != uids.shape:
            raise SubsetError(f"{counts_file}: {len(loaded_counts)} counts for {len(uids)} uids in {url}")
        if len(loaded_counts) and loaded_counts.min() < 1:
            raise SubsetError(f"{counts_file}: counts must be >= 1 (found {int(loaded_counts.min())})")
    if is_sorted_unique(uids):  # DataComp's format: nothing to sort or fold (what the steps below would find)
        c = np.ones(len(uids), COUNTS_DTYPE) if loaded_counts is None else loaded_counts
        if len(c) and c.max() > np.iinfo(np.uint32).max:
            raise SubsetError(f"{url}: a multiplicity exceeds uint32")
        return LoadedSubset(uids, c.astype(COUNTS_DTYPE, copy=False), url, counts_file, 0, [])
    notes = []
    order = uid_order(uids["f0"], uids["f1"])
    if not np.array_equal(order, np.arange(len(uids))):
        notes.append("uid file was not sorted; sorted on load")
    uids = uids[order]
    c = np.ones(len(uids), np.int64) if loaded_counts is None else loaded_counts[order]
    first = first_occurrence(uids["f0"], uids["f1"])
    repeated = int((~first).sum())
    if repeated:
        if loaded_counts is not None:
            raise SubsetError(f"{url}: {repeated} repeated uids and a counts file {counts_file}: "
                              "ambiguous multiplicities")
        starts = np.flatnonzero(first)
        c = np.diff(np.r_[starts, len(uids)])
        uids = uids[starts]
        notes.append(f"{repeated} repeated uid entries folded into multiplicities")
    if len(c) and c.max() > np.iinfo(np.uint32).max:
        raise SubsetError(f"{url}: a multiplicity exceeds uint32")
    return LoadedSubset(uids, c.astype(COUNTS_DTYPE), url, counts_file, repeated, notes)
