"""TiC-DataComp time splits: stream metadata, bucket every uid by time, write DataComp subset files.

Driver-side and Ray-free. One pass over the inputs, a record batch at a time: uids are parsed to
(high, low) 64-bit halves and each row gets a bucket key. Rows are kept as 20 bytes each, radix-
partitioned by the top byte of the uid and spilled to disk past `memory_rows`, so memory is bounded
by a batch plus one partition (1/256 of the pool), never by the pool. Each partition is then sorted,
de-duplicated, cleaned of evaluation uids and appended to the per-bucket outputs; since partitions
are visited in uid order, every output comes out globally sorted without a merge.

Every input row is accounted for exactly once (checked before anything is written):
  rows = malformed uids + duplicate rows + eval uids removed + sum of uids over all output files
where the output files are the time buckets plus `unknown` (missing or unparseable timestamp) and
`out_of_range` (a valid timestamp outside every bucket). Duplicates: the first occurrence in input
order (files in the order given, rows in file order) keeps its bucket; later ones are counted.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from reinforge.curation.time_buckets import (MIN_MONTH, OUT_OF_RANGE, TIMESTAMP_FORMATS, TS_BEYOND, TS_MISSING,
                                             TS_UNPARSEABLE, UNKNOWN, Bucketing, SplitError, make_bucketing,
                                             month_index, month_label, parse_period)
from reinforge.formats.subset import (SUBSET_DTYPE, UID_OK, UID_STATUS_NAMES, first_occurrence, isin, parse_hex_uids,
                                      read_subset, uid_hex, uid_order)
from reinforge.formats.uid_store import RowStore, SubsetOut
from reinforge.io.storage import filesystem, write_bytes

SAMPLE = 10  # examples kept per reported problem


# ---------------------------------------------------------------- inputs

@dataclass
class Batch:
    hi: np.ndarray
    lo: np.ndarray
    uid_status: np.ndarray
    months: np.ndarray
    ts_status: np.ndarray
    key_override: Optional[int] = None  # uid files: the whole batch falls in one bucket
    raw_uids: object = None  # pyarrow strings, for reporting malformed values
    raw_ts: object = None


def expand_inputs(paths: list[str]) -> list[str]:
    """Files as given; a directory expands to its sorted *.parquet and *.npy files."""
    out = []
    for p in paths:
        fs, path = filesystem(p)
        if fs.isdir(path):
            found = sorted(f for f in fs.ls(path, detail=False) if f.endswith((".parquet", ".npy"))
                           and not f.endswith(".counts.npy"))
            if not found:
                raise SplitError(f"{p}: directory holds no .parquet or .npy files")
            prefix = p.split("://")[0] + "://" if "://" in p else ""
            out.extend(f if f.startswith(prefix) else prefix + f for f in found)
        elif fs.exists(path):
            out.append(p)
        else:
            raise SplitError(f"{p}: no such file")
    return out


def _open_parquet(f, url: str):
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(f)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise SplitError(f"{url}: not a readable Parquet file ({exc})") from None


def _parquet_row_group(url: str, index: int, columns: list[str], fmt: str) -> Batch:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:  # one handle per call: a ParquetFile is not shared between threads
        table = _open_parquet(f, url).read_row_group(index, columns=columns, use_threads=False)
    uids, stamps = table.column(columns[0]).combine_chunks(), table.column(columns[1]).combine_chunks()
    hi, lo, ustatus = parse_hex_uids(uids)
    months, tstatus = month_index(stamps, fmt)
    return Batch(hi, lo, ustatus, months, tstatus, raw_uids=uids, raw_ts=stamps)


def parquet_batches(url: str, uid_column: str, ts_column: str, fmt: str, threads: int = 2) -> Iterator[Batch]:
    """One batch per row group (memory: a few row groups), parsed on `threads` threads; pyarrow and
    numpy release the GIL, so reading row group i+1 overlaps parsing row group i. Order is kept."""
    from concurrent.futures import ThreadPoolExecutor
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        pf = _open_parquet(f, url)
        names, groups = pf.schema_arrow.names, pf.num_row_groups
    for column, flag in ((uid_column, "--uid-column"), (ts_column, "--timestamp-column")):
        if column not in names:
            raise SplitError(f"{url}: no column {column!r} ({flag}); columns: {', '.join(names[:12])}")
    columns = [uid_column, ts_column]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending = []
        for i in range(groups):
            pending.append(pool.submit(_parquet_row_group, url, i, columns, fmt))
            if len(pending) > threads:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def uid_file_batches(url: str, bucketing: Bucketing, chunk: int = 1 << 20) -> Iterator[Batch]:
    """A TiC-style per-period uid file (`2019.npy`, `201903.npy`): its name is its period."""
    from reinforge.formats.subset import _load_npy
    stem = url.rpartition("/")[2][:-len(".npy")]
    try:
        start, end = parse_period(stem)
    except SplitError:
        raise SplitError(f"{url}: a uid file must be named by its period (YYYY.npy or YYYYMM.npy)") from None
    if bucketing.by == "month" and end - start != 1:
        raise SplitError(f"{url}: a whole-year uid file cannot be split by month")
    key = bucketing.key_of_period(start, end)
    raw = _load_npy(url)
    if raw.dtype.names is None or len(raw.dtype.names) != 2:
        raise SplitError(f"{url}: dtype {raw.dtype} is not DataComp's u8,u8 subset format")
    hi_all, lo_all = raw[raw.dtype.names[0]], raw[raw.dtype.names[1]]
    for s in range(0, len(raw), chunk):
        n = min(chunk, len(raw) - s)
        yield Batch(hi_all[s:s + n].astype(np.uint64), lo_all[s:s + n].astype(np.uint64),
                    np.zeros(n, np.int8), np.full(n, start, np.int64), np.zeros(n, np.int8), key_override=key)


# ---------------------------------------------------------------- the split builder

@dataclass
class SplitReport:
    rows: int = 0
    rows_by_key: dict[int, int] = field(default_factory=dict)  # before de-duplication / eval removal
    missing: int = 0
    unparseable: int = 0
    unparseable_sample: list = field(default_factory=list)
    below: int = 0
    above: int = 0
    earliest_out: Optional[int] = None
    latest_out: Optional[int] = None
    malformed: dict[str, int] = field(default_factory=dict)
    malformed_sample: list = field(default_factory=list)
    duplicates: int = 0
    duplicates_conflicting: int = 0
    duplicates_by_key: dict[int, int] = field(default_factory=dict)
    duplicate_sample: list = field(default_factory=list)
    eval_removed_by_key: dict[int, int] = field(default_factory=dict)
    uids_by_key: dict[int, int] = field(default_factory=dict)


def _add_counts(target: dict, keys: np.ndarray) -> None:
    counts = np.bincount(keys.astype(np.int64) - OUT_OF_RANGE)  # keys are >= OUT_OF_RANGE (-2)
    for i in np.flatnonzero(counts).tolist():
        k = i + OUT_OF_RANGE
        target[k] = target.get(k, 0) + int(counts[i])


@dataclass
class SplitOptions:
    uid_column: str = "uid"
    timestamp_column: str = "timestamp"
    timestamp_format: str = "epoch"
    by: str = "tic"
    boundaries: Optional[list[str]] = None
    range: Optional[str] = None
    eval_uids: list[str] = field(default_factory=list)
    memory_rows: int = 64 << 20  # ~1.3 GB of buffered rows before partitions spill to disk


def build_splits(inputs: list[str], out_dir: str, options: SplitOptions) -> dict:
    """Bucket every input row, write `<split>.npy`, `unknown.npy`, `out_of_range.npy`, `sizes.json` and
    the manifest `splits.json` under `out_dir`; return the manifest."""
    started = time.perf_counter()
    if options.timestamp_format not in TIMESTAMP_FORMATS:
        raise SplitError(f"--timestamp-format {options.timestamp_format!r}: "
                         f"expected one of {', '.join(TIMESTAMP_FORMATS)}")
    bucketing = make_bucketing(options.by, options.boundaries, options.range)
    files = expand_inputs(inputs)
    eval_set, eval_files = _load_eval(options.eval_uids)
    report = SplitReport()
    spill_dir = tempfile.mkdtemp(prefix="reinforge-splits-")
    try:
        store = RowStore(options.memory_rows, spill_dir)
        input_rows = []
        for url in files:
            rows_before = report.rows
            batches = (uid_file_batches(url, bucketing) if url.endswith(".npy") else
                       parquet_batches(url, options.uid_column, options.timestamp_column, options.timestamp_format))
            for batch in batches:
                _ingest(batch, bucketing, store, report, url, report.rows - rows_before)
            input_rows.append({"path": url, "kind": "uid_file" if url.endswith(".npy") else "parquet",
                               "rows": report.rows - rows_before})
        outputs = _finish(store, bucketing, eval_set, report, spill_dir)
        manifest = _manifest(options, bucketing, report, input_rows, eval_files, len(eval_set), outputs)
        _check_accounting(manifest)
        for key, out in outputs.items():
            out.write(f"{out_dir.rstrip('/')}/{_file_name(bucketing, key)}")
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    write_bytes(f"{out_dir.rstrip('/')}/sizes.json", json.dumps(manifest["sizes"], indent=1).encode())
    write_bytes(f"{out_dir.rstrip('/')}/splits.json", json.dumps(manifest, indent=1).encode())
    return manifest


def _load_eval(paths: list[str]) -> tuple[np.ndarray, list[dict]]:
    if not paths:
        return np.zeros(0, SUBSET_DTYPE), []
    loaded = [read_subset(p, counts="none") for p in paths]
    allu = np.concatenate([s.uids for s in loaded])
    order = uid_order(allu["f0"], allu["f1"])
    allu = allu[order]
    allu = allu[first_occurrence(allu["f0"], allu["f1"])]
    return allu, [{"path": s.path, "uids": len(s.uids)} for s in loaded]


def _ingest(batch: Batch, bucketing: Bucketing, store: RowStore, report: SplitReport, url: str, row0: int) -> None:
    """Count and set aside rows with malformed uids, then bucket the rest; every counter below is
    about rows with a valid uid, so that `rows` of a bucket and its timestamp counters agree."""
    report.rows += len(batch.hi)
    good = np.flatnonzero(batch.uid_status == UID_OK)  # positions in the batch
    if len(good) < len(batch.hi):
        bad = batch.uid_status != UID_OK
        for code, name in UID_STATUS_NAMES.items():
            c = int((batch.uid_status == code).sum())
            if c:
                report.malformed[name] = report.malformed.get(name, 0) + c
        for i in np.flatnonzero(bad)[:SAMPLE - len(report.malformed_sample)].tolist():
            value = batch.raw_uids[i].as_py() if batch.raw_uids is not None else None
            report.malformed_sample.append({"input": url, "row": row0 + i,
                                            "value": None if value is None else str(value)[:64]})
    else:
        good = slice(None)
    hi, lo, months, ts_status = batch.hi[good], batch.lo[good], batch.months[good], batch.ts_status[good]
    rows = np.arange(len(batch.hi))[good]
    if batch.key_override is not None:  # a uid file: one period, one bucket
        keys = np.full(len(hi), batch.key_override, np.int32)
    else:
        keys = bucketing.keys(months, ts_status)
        report.missing += int((ts_status == TS_MISSING).sum())
        unparseable = rows[ts_status == TS_UNPARSEABLE]
        report.unparseable += len(unparseable)
        for i in unparseable[:SAMPLE - len(report.unparseable_sample)].tolist():
            report.unparseable_sample.append({"input": url, "row": row0 + i,
                                              "value": str(batch.raw_ts[i].as_py())[:64]})
    out = keys == OUT_OF_RANGE
    if out.any():
        _note_out_of_range(report, months[out], ts_status[out] == TS_BEYOND,
                           bucketing.starts[0] if bucketing.bounded else MIN_MONTH)
    store.add(hi, lo, keys)
    _add_counts(report.rows_by_key, keys)


def _note_out_of_range(report: SplitReport, months: np.ndarray, beyond: np.ndarray, first: int) -> None:
    below = (months < first) & ~beyond
    report.below += int(below.sum())
    report.above += int((~below).sum())
    inside = months[~beyond]  # BEYOND rows have no meaningful month
    if len(inside):
        lo_seen, hi_seen = int(inside.min()), int(inside.max())
        report.earliest_out = lo_seen if report.earliest_out is None else min(report.earliest_out, lo_seen)
        report.latest_out = hi_seen if report.latest_out is None else max(report.latest_out, hi_seen)


def _finish(store: RowStore, bucketing: Bucketing, eval_set: np.ndarray, report: SplitReport,
            spill_dir: str) -> dict[int, SubsetOut]:
    keys_seen = set(report.rows_by_key) | set(bucketing.fixed_keys()) | {UNKNOWN, OUT_OF_RANGE}
    outputs = {k: SubsetOut(os.path.join(spill_dir, f"out{k}.bin") if store.spilled else None)
               for k in sorted(keys_seen)}
    for hi, lo, key in store.partitions():
        order = uid_order(hi, lo)
        hi, lo, key = hi[order], lo[order], key[order]
        first = first_occurrence(hi, lo)
        if not first.all():
            dup = np.flatnonzero(~first)
            owner = np.maximum.accumulate(np.where(first, np.arange(len(hi)), 0))[dup]
            report.duplicates += len(dup)
            report.duplicates_conflicting += int((key[dup] != key[owner]).sum())
            _add_counts(report.duplicates_by_key, key[dup])
            for i in dup[:SAMPLE - len(report.duplicate_sample)].tolist():
                report.duplicate_sample.append(uid_hex(hi[i], lo[i]))
            hi, lo, key = hi[first], lo[first], key[first]
        if len(eval_set):
            hit = isin(hi, lo, eval_set)
            if hit.any():
                _add_counts(report.eval_removed_by_key, key[hit])
                hi, lo, key = hi[~hit], lo[~hit], key[~hit]
        if len(key) and (key == key[0]).all():
            outputs[int(key[0])].append(hi, lo)
            continue
        for k in np.unique(key).tolist():
            sel = key == k
            outputs[k].append(hi[sel], lo[sel])
    for k, out in outputs.items():
        report.uids_by_key[k] = out.count
    return outputs


def _file_name(bucketing: Bucketing, key: int) -> str:
    return {UNKNOWN: "unknown.npy", OUT_OF_RANGE: "out_of_range.npy"}.get(key) or f"{bucketing.name(key)}.npy"


def _manifest(options: SplitOptions, bucketing: Bucketing, r: SplitReport, inputs: list[dict],
              eval_files: list[dict], eval_uids: int, outputs: dict[int, SubsetOut]) -> dict:
    steps = [k for k in outputs if k >= 0]
    splits = {}
    for k in steps:
        start, end = bucketing.bucket_range(k)
        splits[bucketing.name(k)] = {
            "file": _file_name(bucketing, k), "uids": r.uids_by_key.get(k, 0), "rows": r.rows_by_key.get(k, 0),
            "first_month": start, "last_month": end, "duplicates_dropped": r.duplicates_by_key.get(k, 0),
            "eval_removed": r.eval_removed_by_key.get(k, 0)}

    def side(k: int) -> dict:
        return {"file": _file_name(bucketing, k), "uids": r.uids_by_key.get(k, 0), "rows": r.rows_by_key.get(k, 0),
                "duplicates_dropped": r.duplicates_by_key.get(k, 0), "eval_removed": r.eval_removed_by_key.get(k, 0)}

    return {
        "format": "reinforge.time_splits/1",
        "inputs": inputs,
        "uid_column": options.uid_column,
        "timestamp": {"column": options.timestamp_column, "format": options.timestamp_format},
        "bucketing": bucketing.describe(),
        "steps": [bucketing.name(k) for k in steps],
        "splits": splits,
        "sizes": {bucketing.name(k): r.uids_by_key.get(k, 0) for k in steps},
        "unknown": {**side(UNKNOWN), "missing": r.missing, "unparseable": r.unparseable,
                    "unparseable_sample": r.unparseable_sample},
        "out_of_range": {**side(OUT_OF_RANGE), "below": r.below, "above": r.above,
                         "earliest": None if r.earliest_out is None else month_label(r.earliest_out),
                         "latest": None if r.latest_out is None else month_label(r.latest_out)},
        "malformed_uids": {"rows": sum(r.malformed.values()), "by_reason": r.malformed, "sample": r.malformed_sample},
        "duplicates": {"rows": r.duplicates, "policy": "first occurrence in input order kept, later rows counted here",
                       "conflicting_bucket": r.duplicates_conflicting, "sample": r.duplicate_sample},
        "eval": {"files": eval_files, "uids": eval_uids, "removed": sum(r.eval_removed_by_key.values()),
                 "removed_by_split": {bucketing.name(k) if k >= 0 else _file_name(bucketing, k)[:-4]: v
                                      for k, v in sorted(r.eval_removed_by_key.items())}},
        "rows": r.rows,
    }


def _check_accounting(m: dict) -> None:
    written = sum(s["uids"] for s in m["splits"].values()) + m["unknown"]["uids"] + m["out_of_range"]["uids"]
    accounted = written + m["malformed_uids"]["rows"] + m["duplicates"]["rows"] + m["eval"]["removed"]
    if accounted != m["rows"]:
        raise RuntimeError(f"split accounting broken: {m['rows']} rows read, {accounted} accounted for")
