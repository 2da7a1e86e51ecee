"""Where the subset's uids are in the pool: which pool shards take part (DataComp's --first-shard/
--num-shards), and a pass over their uid indexes (formats/uid_index.py) that keeps, per requested uid,
its pool shard and byte range. Pool uids that occur twice: the first (pool shard order, then position)
is used and the repeats are counted. Join locates its reinforcement uids with the same pass."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa

from reinforge.formats.sources import InputError
from reinforge.formats.subset import LoadedSubset, UidLookup, locate, uid_hex
from reinforge.formats.uid_index import INDEX_STATUS
from reinforge.io.manifest import Task

SAMPLE = 10  # examples kept of each kind of problem


class ReshardError(InputError):
    """The subset cannot be resharded from this pool as asked (missing uids, changed inputs)."""


def select_shards(pool: list[Task], first: int, num: int | None) -> tuple[list[Task], dict]:
    """DataComp's --first-shard/--num-shards: the pool shards numbered first .. first+num-1 (all from
    `first` on when num is None), by the number in their file name; absent numbers are counted."""
    if first == 0 and num is None:
        return pool, {}
    numbered = {}
    for task in pool:
        stem = task.inputs[0].rpartition("/")[2].split(".")[0]
        if not stem.isdigit():
            raise ReshardError(f"first_shard/num_shards select pool shards by number, but {task.inputs[0]} has "
                               f"no number as its name")
        numbered.setdefault(int(stem), task)
    last = first + num - 1 if num is not None else max(numbered, default=first - 1)
    chosen = [numbered[n] for n in sorted(numbered) if first <= n <= last]
    if not chosen:
        raise ReshardError(f"no pool shard is numbered {first}..{last}")
    absent = [n for n in range(first, last + 1) if n not in numbered]
    return chosen, {"first_shard": first, "num_shards": num, "shards_selected": len(chosen),
                    "numbers_absent": len(absent), "absent_sample": absent[:SAMPLE]}


@dataclass
class PoolMatch:
    """Where each requested uid lives in the pool, plus what the index pass found wrong with the pool."""
    shard: np.ndarray  # per found subset uid: pool shard number
    offset: np.ndarray
    length: np.ndarray
    found: np.ndarray  # mask over subset uids
    samples: int = 0
    bad: dict = field(default_factory=dict)
    bad_sample: list = field(default_factory=list)
    duplicates: int = 0
    duplicate_sample: list = field(default_factory=list)


def match_pool(subset: LoadedSubset, tables: Iterator[pa.Table], urls: list[str]) -> PoolMatch:
    """Stream the per-shard indexes, keeping only rows of requested uids (memory ~ subset + one shard)."""
    n = len(subset.uids)
    m = PoolMatch(np.full(n, -1, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, bool))
    lookup = UidLookup(subset.uids)  # once, not per shard: a copy of the subset per shard was shards x uids
    for s, table in enumerate(tables):
        m.samples += table.num_rows
        status = table.column("status").to_numpy()
        for code, name in INDEX_STATUS.items():
            bad = np.flatnonzero(status == code)
            if len(bad):
                m.bad[name] = m.bad.get(name, 0) + len(bad)
                keys = table.column("key")
                m.bad_sample.extend({"shard": urls[s], "key": keys[int(i)].as_py(), "problem": name}
                                    for i in bad[:SAMPLE - len(m.bad_sample)])
        ok = status == 0
        hi, lo = table.column("uid_hi").to_numpy()[ok], table.column("uid_lo").to_numpy()[ok]
        pos = locate(hi, lo, lookup)
        hit = np.flatnonzero(pos >= 0)
        p = pos[hit]
        in_order = np.sort(p)
        if (in_order[1:] != in_order[:-1]).all():  # no uid twice in this shard (the usual case)
            fresh = ~m.found[p]  # not already found in an earlier shard
        else:
            fresh = np.zeros(len(p), bool)
            fresh[np.unique(p, return_index=True)[1]] = True  # first in this shard, by position
            fresh &= ~m.found[p]  # and not already found in an earlier shard
        repeats = hit[~fresh]
        m.duplicates += len(repeats)
        m.duplicate_sample.extend(uid_hex(hi[i], lo[i]) for i in repeats[:SAMPLE - len(m.duplicate_sample)])
        rows, p = hit[fresh], p[fresh]
        m.found[p], m.shard[p] = True, s
        m.offset[p] = table.column("offset").to_numpy()[ok][rows]
        m.length[p] = table.column("length").to_numpy()[ok][rows]
    return m
