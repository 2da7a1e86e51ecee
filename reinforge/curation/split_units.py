"""The inputs of `reinforge splits` as units, and the two passes' tasks (time_splits.py runs them).

A unit is a run of whole row groups of one metadata Parquet file, or a row range of one per-period uid
file. Pass 1 (`split_unit`, one task per unit) parses its uids and timestamps, counts what the report
says about them, and routes each good row's (uid, bucket key) to uid buckets (the top bits of the uid's
high half) in a part file (io/parts.py), rows in input order. Pass 2 (`split_bucket`, one task per uid
bucket) reads the bucket's rows from every unit's part file in unit order, so a stable uid sort keeps
input order among equal uids and the first occurrence keeps its bucket; it drops repeats and evaluation
uids and writes the bucket's uids grouped by output file, in uid order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from reinforge.curation.time_buckets import (MIN_MONTH, OUT_OF_RANGE, TS_BEYOND, TS_MISSING, TS_UNPARSEABLE, Bucketing,
                                             SplitError, month_index, parse_period)
from reinforge.formats.subset import (SUBSET_DTYPE, UID_OK, UID_STATUS_NAMES, SubsetError, first_occurrence, isin,
                                      parse_hex_uids, uid_hex, uid_order)
from reinforge.io.parts import concatenate_columns, read_parts, write_parts, write_uid_buckets
from reinforge.io.storage import filesystem

SAMPLE = 10  # examples kept per reported problem
UNIT_ROWS = 1_000_000  # rows per pass-1 task (whole row groups): seconds of one core, far above a task's start-up
UID_FILE_CHUNK = 1 << 20  # rows of a uid file parsed at a time
ROWS = {"hi": np.uint64, "lo": np.uint64, "key": np.int32}  # pass 1's part files


# ---------------------------------------------------------------- the report, mergeable per unit and bucket

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

    def merge(self, part: "SplitReport") -> None:
        """Add a later unit's (or uid bucket's) report: counts add up, samples keep the first SAMPLE, dicts keep
        the order in which their keys were first seen."""
        for name in ("rows", "missing", "unparseable", "below", "above", "duplicates", "duplicates_conflicting"):
            setattr(self, name, getattr(self, name) + getattr(part, name))
        for name in ("rows_by_key", "malformed", "duplicates_by_key", "eval_removed_by_key", "uids_by_key"):
            mine = getattr(self, name)
            for k, v in getattr(part, name).items():
                mine[k] = mine.get(k, 0) + v
        for name in ("unparseable_sample", "malformed_sample", "duplicate_sample"):
            mine = getattr(self, name)
            mine += getattr(part, name)[:SAMPLE - len(mine)]
        seen = [v for v in (self.earliest_out, part.earliest_out) if v is not None]
        self.earliest_out = min(seen) if seen else None
        seen = [v for v in (self.latest_out, part.latest_out) if v is not None]
        self.latest_out = max(seen) if seen else None


def add_counts(target: dict, keys: np.ndarray) -> None:
    counts = np.bincount(keys.astype(np.int64) - OUT_OF_RANGE)  # keys are >= OUT_OF_RANGE (-2)
    for i in np.flatnonzero(counts).tolist():
        k = i + OUT_OF_RANGE
        target[k] = target.get(k, 0) + int(counts[i])


# ---------------------------------------------------------------- inputs and units

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


@dataclass(frozen=True)
class InputFile:
    """An input as the driver checked it: a Parquet file's row group sizes, or a uid file's period and layout."""
    url: str
    kind: str  # "parquet" | "uid_file"
    row_groups: tuple[int, ...] = ()
    period: tuple[int, int] = (0, 0)  # uid file: its months [start, end)
    offset: int = 0  # uid file: where its records start, their dtype and count
    dtype: Optional[np.dtype] = None
    rows_in_file: int = 0

    @property
    def rows(self) -> int:
        return sum(self.row_groups) if self.kind == "parquet" else self.rows_in_file


@dataclass(frozen=True)
class SplitUnit:
    """Rows file_row .. file_row+rows-1 of one input (whole row groups of a Parquet file); `start` is its first
    row's number over all inputs, which orders the units and names their part files."""
    file: InputFile
    row_groups: tuple[int, ...]
    file_row: int
    start: int
    rows: int

    def batches(self, bucketing: Bucketing, columns: list[str], fmt: str) -> Iterator[tuple[int, Batch]]:
        """(row of the batch in its file, batch) in row order."""
        if self.file.kind == "parquet":
            yield from self._parquet_batches(columns, fmt)
        else:
            yield from self._uid_file_batches(bucketing)

    def _parquet_batches(self, columns: list[str], fmt: str) -> Iterator[tuple[int, Batch]]:
        fs, path = filesystem(self.file.url)
        row = self.file_row
        with fs.open(path, "rb") as f:
            pf = open_parquet(f, self.file.url)
            for index in self.row_groups:
                table = pf.read_row_group(index, columns=columns, use_threads=False)
                uids, stamps = table.column(columns[0]).combine_chunks(), table.column(columns[1]).combine_chunks()
                hi, lo, ustatus = parse_hex_uids(uids)
                months, tstatus = month_index(stamps, fmt)
                yield row, Batch(hi, lo, ustatus, months, tstatus, raw_uids=uids, raw_ts=stamps)
                row += len(table)

    def _uid_file_batches(self, bucketing: Bucketing) -> Iterator[tuple[int, Batch]]:
        start, end = self.file.period
        key = bucketing.key_of_period(start, end)
        dtype = self.file.dtype
        fs, path = filesystem(self.file.url)
        with fs.open(path, "rb") as f:
            for row in range(self.file_row, self.file_row + self.rows, UID_FILE_CHUNK):
                n = min(UID_FILE_CHUNK, self.file_row + self.rows - row)
                f.seek(self.file.offset + row * dtype.itemsize)
                raw = np.frombuffer(f.read(n * dtype.itemsize), dtype, n)
                yield row, Batch(raw[dtype.names[0]].astype(np.uint64), raw[dtype.names[1]].astype(np.uint64),
                                 np.zeros(n, np.int8), np.full(n, start, np.int64), np.zeros(n, np.int8),
                                 key_override=key)


def open_parquet(f, url: str):
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(f)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise SplitError(f"{url}: not a readable Parquet file ({exc})") from None


def check_input(url: str, uid_column: str, ts_column: str, bucketing: Bucketing) -> InputFile:
    """What the tasks need to know of an input, read from its footer or header; a bad input fails here."""
    return check_uid_file(url, bucketing) if url.endswith(".npy") else check_parquet(url, uid_column, ts_column)


def check_parquet(url: str, uid_column: str, ts_column: str) -> InputFile:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        pf = open_parquet(f, url)
        names, meta = pf.schema_arrow.names, pf.metadata
    for column, flag in ((uid_column, "--uid-column"), (ts_column, "--timestamp-column")):
        if column not in names:
            raise SplitError(f"{url}: no column {column!r} ({flag}); columns: {', '.join(names[:12])}")
    return InputFile(url, "parquet", tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)))


def check_uid_file(url: str, bucketing: Bucketing) -> InputFile:
    """A TiC-style per-period uid file (`2019.npy`, `201903.npy`): its name is its period."""
    stem = url.rpartition("/")[2][:-len(".npy")]
    try:
        start, end = parse_period(stem)
    except SplitError:
        raise SplitError(f"{url}: a uid file must be named by its period (YYYY.npy or YYYYMM.npy)") from None
    if bucketing.by == "month" and end - start != 1:
        raise SplitError(f"{url}: a whole-year uid file cannot be split by month")
    bucketing.key_of_period(start, end)  # raises if the period straddles buckets
    offset, dtype, rows = _npy_layout(url)
    if dtype.names is None or len(dtype.names) != 2:
        raise SplitError(f"{url}: dtype {dtype} is not DataComp's u8,u8 subset format")
    return InputFile(url, "uid_file", period=(start, end), offset=offset, dtype=dtype, rows_in_file=rows)


def _npy_layout(url: str) -> tuple[int, np.dtype, int]:
    """Where a .npy file's records start, their dtype and count (the header alone is read)."""
    fs, path = filesystem(url)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with fs.open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in readers:
                raise ValueError(f".npy format version {version} is not read here")
            shape, _, dtype = readers[version](f)
            offset = f.tell()
        if len(shape) != 1:
            raise ValueError(f"shape {shape}: a uid file is one-dimensional")
        if fs.size(path) < offset + shape[0] * dtype.itemsize:
            raise ValueError("the file is shorter than its header says")
    except (ValueError, OSError, EOFError) as exc:
        raise SubsetError(f"{url}: not a readable .npy file ({exc})") from None
    return offset, dtype, int(shape[0])


def cut_units(files: list[InputFile], unit_rows: int) -> list[SplitUnit]:
    """Runs of whole row groups of ~unit_rows rows (a larger row group is a unit of its own); uid files in
    row ranges of unit_rows. Units never span two inputs."""
    units, start = [], 0
    for file in files:
        if file.kind == "uid_file":
            for row in range(0, file.rows, unit_rows):
                n = min(unit_rows, file.rows - row)
                units.append(SplitUnit(file, (), row, start, n))
                start += n
            continue
        groups, first, rows = [], 0, 0
        for i, n in enumerate(file.row_groups):
            groups.append(i)
            rows += n
            if rows >= unit_rows or i == len(file.row_groups) - 1:
                units.append(SplitUnit(file, tuple(groups), first, start, rows))
                groups, first, start, rows = [], first + rows, start + rows, 0
    return units


# ---------------------------------------------------------------- pass 1: parse, count, route to uid buckets

def ingest(batch: Batch, bucketing: Bucketing, report: SplitReport, url: str, row0: int):
    """Count and set aside rows with malformed uids, then bucket the rest; every counter below is
    about rows with a valid uid, so that `rows` of a bucket and its timestamp counters agree.
    Returns the good rows' (hi, lo, key)."""
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
        note_out_of_range(report, months[out], ts_status[out] == TS_BEYOND,
                          bucketing.starts[0] if bucketing.bounded else MIN_MONTH)
    add_counts(report.rows_by_key, keys)
    return hi, lo, keys


def note_out_of_range(report: SplitReport, months: np.ndarray, beyond: np.ndarray, first: int) -> None:
    below = (months < first) & ~beyond
    report.below += int(below.sum())
    report.above += int((~below).sum())
    inside = months[~beyond]  # BEYOND rows have no meaningful month
    if len(inside):
        lo_seen, hi_seen = int(inside.min()), int(inside.max())
        report.earliest_out = lo_seen if report.earliest_out is None else min(report.earliest_out, lo_seen)
        report.latest_out = hi_seen if report.latest_out is None else max(report.latest_out, hi_seen)


def unit_part(work: str, unit: SplitUnit) -> str:
    return f"{work}/rows/{unit.start:016d}.bin"


def bucket_part(work: str, bucket: int) -> str:
    return f"{work}/uids/{bucket:05d}.bin"


def split_unit(unit: SplitUnit, bucketing: Bucketing, columns: list[str], fmt: str, work: str,
               bits: int) -> tuple[SplitReport, np.ndarray]:
    """Pass 1 for a unit: its report, and its good rows to its part file by uid bucket (their count per bucket)."""
    report, parts = SplitReport(), {name: [] for name in ROWS}
    for row0, batch in unit.batches(bucketing, columns, fmt):
        for name, values in zip(ROWS, ingest(batch, bucketing, report, unit.file.url, row0)):
            parts[name].append(values)
        batch = None  # the raw strings go before the rows are joined
    rows = concatenate_columns(parts, ROWS)
    del parts  # the unit's rows are held once while grouped
    return report, write_uid_buckets(unit_part(work, unit), rows, bits)


# ---------------------------------------------------------------- pass 2: per uid bucket, repeats and eval uids out

def split_bucket(parts: list[tuple[str, int, int]], eval_uids: np.ndarray, out: str,
                 keys: np.ndarray) -> tuple[SplitReport, np.ndarray]:
    """Pass 2 for a uid bucket (its rows in `parts`, in input order): the first row of a uid keeps its bucket
    key, later ones are counted; evaluation uids are removed; the rest go to `out` grouped by output file
    (the position of their key in `keys`), in uid order. Returns the report's counts and the uids per file."""
    report = SplitReport()
    rows = read_parts(parts, ROWS)
    order = uid_order(rows["hi"], rows["lo"])  # stable: a uid's first row stays first
    hi, lo, key = rows["hi"][order], rows["lo"][order], rows["key"][order]
    del rows, order
    first = first_occurrence(hi, lo)
    if not first.all():
        dup = np.flatnonzero(~first)
        owner = np.maximum.accumulate(np.where(first, np.arange(len(hi)), 0))[dup]
        report.duplicates += len(dup)
        report.duplicates_conflicting += int((key[dup] != key[owner]).sum())
        add_counts(report.duplicates_by_key, key[dup])
        report.duplicate_sample = [uid_hex(hi[i], lo[i]) for i in dup[:SAMPLE].tolist()]
        hi, lo, key = hi[first], lo[first], key[first]
    if len(eval_uids):
        hit = isin(hi, lo, eval_uids)
        if hit.any():
            add_counts(report.eval_removed_by_key, key[hit])
            hi, lo, key = hi[~hit], lo[~hit], key[~hit]
    uids = np.empty(len(hi), SUBSET_DTYPE)
    uids["f0"], uids["f1"] = hi, lo
    return report, write_parts(out, {"uid": uids}, np.searchsorted(keys, key), len(keys))
