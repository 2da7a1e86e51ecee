"""A replay step's subset built without holding its uids (issue #16): each split file is read in chunks,
the uids it draws go with their multiplicities to uid buckets spilled to disk, and each bucket is sorted
and appended to the step's `.npy` and `.counts.npy` in turn. Same uids, counts and bytes as
replay.step_subset (independent buffer): the same seeded choice of which uids get one more copy.

Only split files already in DataComp's form (sorted, unique u8,u8) stream; any other file (unsorted,
repeats, not readable as such) returns None and the caller builds the step in memory, which normalises
or reports it exactly as before.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from reinforge.formats.subset import (COUNTS_DTYPE, SUBSET_DTYPE, counts_path, first_occurrence, is_sorted_unique,
                                      uid_order)
from reinforge.io.spill import UidSpill, bucket_bits
from reinforge.io.storage import atomic_open, filesystem

CHUNK = 1 << 18  # uids read at a time (a chunk's working set, ~100 B a row, is the driver's fixed cost)


class NotStreamable(Exception):
    """The split file is not a plain sorted unique u8,u8 array; build the step in memory."""


def npy_header(dtype: np.dtype, rows: int) -> bytes:
    """The header np.save writes for a 1-d array of `rows` rows of `dtype`."""
    import io
    header = np.lib.format.header_data_from_array_1_0(np.empty(0, dtype))
    header["shape"] = (rows,)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def _open_uids(url: str):
    """(open file positioned at the data, rows, dtype) of a subset .npy, or NotStreamable."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise NotStreamable(url)
    f = fs.open(path, "rb")
    try:
        version = np.lib.format.read_magic(f)
        shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(f))
    except (ValueError, OSError, EOFError):
        f.close()
        raise NotStreamable(url) from None
    if dtype.names is None or len(dtype.names) != 2 or any(
            dtype[i].kind != "u" or dtype[i].itemsize != 8 for i in range(2)) or dtype.itemsize != 16:
        f.close()
        raise NotStreamable(url)
    return f, int(np.prod(shape)), dtype


def split_rows(url: str) -> int:
    f, rows, _ = _open_uids(url)
    f.close()
    return rows


def _chunks(url: str):
    """(first row, hi, lo) chunks of a split file, checked sorted and unique across chunk edges."""
    f, rows, dtype = _open_uids(url)
    with f:
        last, start = None, 0
        while start < rows:
            n = min(CHUNK, rows - start)
            data = f.read(n * 16)
            if len(data) != n * 16:
                raise NotStreamable(url)
            raw = np.frombuffer(data, dtype)
            uids = np.empty(n, SUBSET_DTYPE)
            uids["f0"], uids["f1"] = raw[dtype.names[0]], raw[dtype.names[1]]
            edge = uids[:1] if last is None else np.concatenate([last, uids[:1]])
            if not (is_sorted_unique(uids) and is_sorted_unique(edge)):
                raise NotStreamable(url)
            last = uids[-1:]
            yield start, uids["f0"], uids["f1"]
            start += n


def stream_step_subset(files: dict[str, str], counts: dict[str, int], seed: int, t: int,
                       split_index: dict[str, int], out: str, error) -> Optional[int]:
    """Write the step's subset and counts to `out`; return its unique uids, or None when a split file is
    not streamable. `error(message)` builds the exception a bad schedule raises."""
    try:
        sizes = {s: split_rows(files[s]) for s in counts}
    except NotStreamable:
        return None
    for split, c in counts.items():
        if sizes[split] == 0:
            raise error(f"step {t}: split {split} is empty but the policy draws {c} samples from it")
    unique = sum(size if counts[s] >= size else counts[s] for s, size in sizes.items())
    try:
        with UidSpill(bucket_bits(unique), COUNTS_DTYPE) as spill:
            for split, c in counts.items():
                size = sizes[split]
                base, extra = c // size, c % size
                chosen = np.zeros(0, np.int64)
                if extra:  # the same seeded choice as the in-memory step: (seed, step, split)
                    rng = np.random.default_rng([seed, t, split_index[split]])
                    chosen = rng.choice(size, extra, replace=False)  # numpy holds 8 B x size while choosing
                    chosen.sort()
                drawn = 0
                for start, hi, lo in _chunks(files[split]):
                    mult = np.full(len(hi), base, np.int64)
                    mine = chosen[np.searchsorted(chosen, start):np.searchsorted(chosen, start + len(hi))]
                    mult[mine - start] += 1
                    keep = mult > 0
                    spill.add(hi[keep], lo[keep], mult[keep])
                    drawn += int(mult.sum())
                if drawn != c:
                    raise error(f"step {t}: split {split} multiplicities sum to {drawn}, expected {c}")
            written = _write_buckets(spill, out, unique, t, error)
    except NotStreamable:
        return None
    if written != sum(counts.values()):
        raise error(f"step {t}: subset multiplicities sum to {written}, budget is {sum(counts.values())}")
    return unique


def _write_buckets(spill: UidSpill, out: str, unique: int, t: int, error) -> int:
    """Sort each bucket, check no uid is in two splits, append it to the uid and counts files."""
    total, rows, last = 0, 0, None
    with atomic_open(out) as f_uids, atomic_open(counts_path(out)) as f_counts:
        f_uids.write(npy_header(SUBSET_DTYPE, unique))
        f_counts.write(npy_header(COUNTS_DTYPE, unique))
        for records in spill.buckets():
            order = uid_order(records["hi"], records["lo"])
            uids = np.empty(len(records), SUBSET_DTYPE)
            uids["f0"], uids["f1"] = records["hi"][order], records["lo"][order]
            if not first_occurrence(uids["f0"], uids["f1"]).all():
                raise error(f"step {t}: a uid appears in more than one split; splits must be disjoint")
            if len(uids) and last is not None and not is_sorted_unique(np.concatenate([last, uids[:1]])):
                raise AssertionError(f"{out}: buckets out of order")
            if len(uids):
                last = uids[-1:]
            mult = records["p"][order].astype(COUNTS_DTYPE)
            f_uids.write(uids.tobytes())
            f_counts.write(mult.tobytes())
            total += int(mult.sum(dtype=np.int64))
            rows += len(uids)
    if rows != unique:
        raise AssertionError(f"{out}: wrote {rows} uids, expected {unique}")
    return total
