"""Synthetic DataComp-style pools for the time-split tests and benchmark: metadata Parquet with
skewed timestamps (exponential growth over the years, plus missing, garbage and out-of-range
values) and WebDataset pool shards (jpg, txt, json {"uid"})."""
from __future__ import annotations

import calendar
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

YEARS = np.arange(2014, 2023)


def random_uids(n: int, rng: np.random.Generator) -> tuple[pa.StringArray, np.ndarray, np.ndarray]:
    """n random 32-hex uids as a pyarrow string array built straight from one hex buffer (fast)."""
    raw = rng.integers(0, 2**64 - 1, size=(n, 2), dtype=np.uint64, endpoint=True)
    text = raw.astype(">u8").tobytes().hex().encode()
    offsets = np.arange(0, 32 * n + 1, 32, dtype=np.int32)
    return (pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(text)),
            raw[:, 0].copy(), raw[:, 1].copy())


def skewed_epochs(n: int, rng: np.random.Generator, growth: float = 0.45) -> np.ndarray:
    """Epoch seconds in 2014..2022 with yearly volume growing as exp(growth * year)."""
    weights = np.exp(growth * (YEARS - YEARS[0]))
    years = rng.choice(YEARS, size=n, p=weights / weights.sum())
    starts = np.array([calendar.timegm((y, 1, 1, 0, 0, 0)) for y in range(2014, 2024)], np.int64)
    lo, hi = starts[years - 2014], starts[years - 2014 + 1]
    return lo + (rng.random(n) * (hi - lo)).astype(np.int64)


def metadata_table(n: int, seed: int = 0, fmt: str = "epoch", missing: float = 0.01, garbage: float = 0.005,
                   out_of_range: float = 0.005, bad_uids: int = 0, duplicates: int = 0) -> pa.Table:
    """DataComp-like metadata; `fmt`: epoch (int64 seconds, nulls for missing; garbage = absurd values)
    or iso (strings; garbage = unparseable text)."""
    rng = np.random.default_rng(seed)
    uids, _, _ = random_uids(n, rng)
    uid_list = None
    if bad_uids or duplicates:
        uid_list = uids.to_pylist()
        rows = rng.choice(n, bad_uids + 2 * duplicates, replace=False)
        for k, i in enumerate(rows[:bad_uids]):  # a quarter each: not hex, too short, not hex, null
            uid_list[i] = ["x" * 32, uid_list[i][:31], uid_list[i][:5] + "g" + uid_list[i][6:], None][k % 4]
        for i, source in zip(rows[bad_uids:bad_uids + duplicates], rows[bad_uids + duplicates:]):
            uid_list[i] = uid_list[source]
    epochs = skewed_epochs(n, rng)
    kind = rng.random(n)
    oor = (kind >= missing + garbage) & (kind < missing + garbage + out_of_range)
    epochs[oor] = np.where(rng.random(oor.sum()) < 0.5, calendar.timegm((2009, 6, 1, 0, 0, 0)),
                           calendar.timegm((2031, 3, 1, 0, 0, 0)))
    mask = kind < missing
    garbage_rows = (kind >= missing) & (kind < missing + garbage)
    if fmt == "epoch":
        epochs[garbage_rows] = 10**15  # parses as a number, far beyond any calendar
        ts = pa.array(epochs, pa.int64(), mask=mask)
    else:
        text = np.datetime_as_string(epochs.astype("datetime64[s]"), unit="s").astype(object)
        text[garbage_rows] = "not a date"
        ts = pa.array(text.tolist(), pa.string(), mask=mask)
    return pa.table({
        "uid": pa.array(uid_list, pa.string()) if uid_list is not None else uids,
        "url": pa.array([f"http://example.com/{i}.jpg" for i in range(n)]) if n <= 1_000_000 else
        pa.array(np.full(n, "http://example.com/x.jpg", object)),
        "text": pa.array(np.full(n, "a photo of something", object)),
        "timestamp": ts,
    })


def write_metadata(path, table: pa.Table, row_group_size: int = 100_000) -> None:
    pq.write_table(table, path, row_group_size=row_group_size)


def write_pool_shards(folder, uids_hex: list[str], per_shard: int, payload: int = 2048,
                      seed: int = 0) -> list[str]:
    """DataComp pool shards {:08d}.tar with jpg (random bytes), txt, json {"uid"}; keys as img2dataset writes."""
    import os

    from reinforge.formats.wds import ShardWriter
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in range(0, len(uids_hex), per_shard):
        path = os.path.join(str(folder), f"{s // per_shard:08d}.tar")
        with open(path, "wb") as f, ShardWriter(f) as writer:
            for i, uid in enumerate(uids_hex[s:s + per_shard]):
                writer.write(f"{s // per_shard:05d}{i:04d}", {
                    "jpg": rng.bytes(payload), "txt": f"caption {uid[:6]}".encode(),
                    "json": json.dumps({"uid": uid, "key": f"{s // per_shard:05d}{i:04d}"}).encode()})
        paths.append(path)
    return paths
