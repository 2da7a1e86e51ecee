"""A replay step's subset built as passes of tasks (TaskMap: Ray, worker processes or inline), the driver
holding per-task counts, never a uid (issue #16). Same uids, counts and bytes as replay.step_subset
(independent buffer): the same seeded choice of which uids get one more copy.
1. choose (per split that draws extra copies): numpy's seeded choice of the rows that get one more copy
   (it holds 8 B x split rows, on a worker), sorted, to a part file grouped by draw unit.
2. draw (per unit: a run of a split's rows): each row's copies (the base, +1 if chosen), its drawn uids with
   their multiplicities routed to uid buckets (the top bits of the uid) in a part file.
3. per uid bucket: sort (refusing a uid drawn from two splits); the driver appends the buckets, in uid
   order, to the step's `.npy` and `.counts.npy`.
Part files (io/parts.py) sit beside the step's file (`<step>.npy.work/`) and are removed after.

Only split files already in DataComp's form (sorted, unique u8,u8) stream; any other file (unsorted,
repeats, not readable as such) returns None and the caller builds the step in memory, which normalises
or reports it exactly as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from reinforge.formats.subset import (COUNTS_DTYPE, SUBSET_DTYPE, appending_subset, first_occurrence, is_sorted_unique,
                                      make_subset, uid_order)
from reinforge.io.parts import (bucket_bits, bucket_parts, concatenate_columns, read_parts, write_parts,
                                write_uid_buckets)
from reinforge.io.storage import absolute_url, filesystem, remove_tree
from reinforge.runtime.ray_session import TaskMap

CHUNK = 1 << 18  # uids a task reads at a time
UNIT_ROWS = 1 << 22  # split rows per draw task (64 MB of uids)
DRAWN = {"hi": np.uint64, "lo": np.uint64, "mult": COUNTS_DTYPE}


class NotStreamable(Exception):
    """The split file is not a plain sorted unique u8,u8 array; build the step in memory."""


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


def _chunks(url: str, first: int = 0, rows: Optional[int] = None, chunk: int = 0):
    """(first row, hi, lo) chunks of rows first .. first+rows-1 of a split file, checked sorted and unique
    (across chunk edges, and against the row before `first`)."""
    f, total, dtype = _open_uids(url)
    stop = total if rows is None else first + rows
    chunk = chunk or CHUNK
    with f:
        last, start = None, first
        if first:
            f.seek(f.tell() + (first - 1) * 16)
            start -= 1  # the row before, only to check the edge
        while start < stop:
            n = min(chunk, stop - start)
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
            if start < first:  # the row before the run: checked, not drawn
                uids, start, n = uids[1:], first, n - 1
            yield start, uids["f0"], uids["f1"]
            start += n


@dataclass(frozen=True)
class Draw:
    """A draw task: rows start .. start+rows-1 of a split, each drawn `base` times, +1 for its chosen rows."""
    url: str
    start: int
    rows: int
    base: int
    chosen: list[tuple[str, int, int]]  # the piece of the chosen rows' part file inside the run (or none)
    chunk: int


def choose(url: str, size: int, extra: int, seed: int, t: int, split: int, unit_rows: int) -> np.ndarray:
    """The split's rows that get one more copy: the same seeded choice as the in-memory step, (seed, step,
    split); to a part file grouped by draw unit, sorted inside. Returns the chosen rows per unit."""
    chosen = np.random.default_rng([seed, t, split]).choice(size, extra, replace=False)  # 8 B x size
    chosen.sort()
    return write_parts(url, {"row": chosen}, chosen // unit_rows, -(-size // unit_rows))


def draw(d: Draw, out: str, bits: int) -> Optional[tuple[np.ndarray, int]]:
    """A run's drawn uids and their multiplicities to a part file by uid bucket: (rows per bucket, copies
    drawn), or None when the split file is not in DataComp's sorted unique form."""
    chosen = read_parts(d.chosen, {"row": np.int64})["row"]
    parts = {"hi": [], "lo": [], "mult": []}
    drawn = 0
    try:
        for start, hi, lo in _chunks(d.url, d.start, d.rows, d.chunk):
            mult = np.full(len(hi), d.base, np.int64)
            mine = chosen[np.searchsorted(chosen, start):np.searchsorted(chosen, start + len(hi))]
            mult[mine - start] += 1
            keep = mult > 0
            parts["hi"].append(hi[keep])
            parts["lo"].append(lo[keep])
            parts["mult"].append(mult[keep].astype(COUNTS_DTYPE))
            drawn += int(mult.sum())
    except NotStreamable:
        return None
    return write_uid_buckets(out, concatenate_columns(parts, DRAWN), bits), drawn


def sorted_bucket(parts: list[tuple[str, int, int]]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """A uid bucket's drawn uids sorted, with their multiplicities; None when a uid was drawn twice (from
    two splits)."""
    records = read_parts(parts, DRAWN)
    order = uid_order(records["hi"], records["lo"])
    uids = make_subset(records["hi"][order], records["lo"][order])
    if not first_occurrence(uids["f0"], uids["f1"]).all():
        return None
    return uids, records["mult"][order]


def stream_step_subset(files: dict[str, str], counts: dict[str, int], seed: int, t: int,
                       split_index: dict[str, int], out: str, error, tasks: Optional[TaskMap] = None,
                       unit_rows: Optional[int] = None) -> Optional[int]:
    """Write the step's subset and counts to `out`; return its unique uids, or None when a split file is
    not streamable. `error(message)` builds the exception a bad schedule raises. The passes run on `tasks`
    (inline when not given), over draw units of `unit_rows` rows."""
    try:
        sizes = {s: split_rows(files[s]) for s in counts}
    except NotStreamable:
        return None
    for split, c in counts.items():
        if sizes[split] == 0:
            raise error(f"step {t}: split {split} is empty but the policy draws {c} samples from it")
    unique = sum(size if counts[s] >= size else counts[s] for s, size in sizes.items())
    own = tasks is None
    tasks = tasks or TaskMap("inline")
    unit_rows = unit_rows or UNIT_ROWS
    work = absolute_url(out) + ".work"
    try:
        return _stream(files, counts, sizes, seed, t, split_index, out, error, tasks, unit_rows, work, unique)
    finally:
        remove_tree(work)
        if own:
            tasks.close()


def _stream(files, counts, sizes, seed, t, split_index, out, error, tasks, unit_rows, work, unique) -> Optional[int]:
    splits = list(counts)
    chosen_files = {s: f"{work}/chosen/{split_index[s]:06d}.bin" for s in splits if counts[s] % sizes[s]}
    choices = [(chosen_files[s], sizes[s], counts[s] % sizes[s], seed, t, split_index[s], unit_rows)
               for s in chosen_files]
    chosen = {s: list(bucket_parts([chosen_files[s]], per_unit[None])) for s, per_unit in
              zip(chosen_files, tasks(choose, choices, ()))}  # per draw unit: its piece of the chosen rows
    draws, owners = [], []
    for s in splits:
        for k, start in enumerate(range(0, sizes[s], unit_rows)):
            mine = chosen[s][k] if s in chosen else []
            draws.append(Draw(files[s], start, min(unit_rows, sizes[s] - start), counts[s] // sizes[s], mine, CHUNK))
            owners.append(s)
    bits = bucket_bits(unique)
    drawn_files = [f"{work}/drawn/{i:08d}.bin" for i in range(len(draws))]
    results = list(tasks(draw, list(zip(draws, drawn_files)), (bits,)))
    if any(r is None for r in results):
        return None
    drawn = dict.fromkeys(splits, 0)
    for s, (_, copies) in zip(owners, results):
        drawn[s] += copies
    for s in splits:
        if drawn[s] != counts[s]:
            raise error(f"step {t}: split {s} multiplicities sum to {drawn[s]}, expected {counts[s]}")
    buckets = bucket_parts(drawn_files, np.stack([r[0] for r in results]))
    written = _write_buckets(tasks(sorted_bucket, ((p,) for p in buckets if p), ()), out, unique, t, error)
    if written != sum(counts.values()):
        raise error(f"step {t}: subset multiplicities sum to {written}, budget is {sum(counts.values())}")
    return unique


def _write_buckets(buckets, out: str, unique: int, t: int, error) -> int:
    """Append each sorted bucket (uid order) to the uid and counts files; refuse a uid in two splits."""
    total = 0
    with appending_subset(out, unique, counts=True) as subset:
        for bucket in buckets:
            if bucket is None:
                raise error(f"step {t}: a uid appears in more than one split; splits must be disjoint")
            subset.append(*bucket)
            total += int(bucket[1].sum(dtype=np.int64))
    return total
