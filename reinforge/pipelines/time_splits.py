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
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from reinforge.pipelines.sources import InputError
from reinforge.pipelines.storage import atomic_open, filesystem, write_bytes
from reinforge.schemas.subset import (SUBSET_DTYPE, UID_OK, UID_STATUS_NAMES, first_occurrence, isin,
                                      parse_hex_uids, read_subset, uid_hex, uid_order)

UNKNOWN, OUT_OF_RANGE = -1, -2  # bucket keys of the two non-time buckets
TS_OK, TS_MISSING, TS_UNPARSEABLE, TS_BEYOND = 0, 1, 2, 3  # BEYOND: parsed, but outside years 1..9999
TIMESTAMP_FORMATS = ("epoch", "epoch_ms", "iso", "yyyymm")
BUCKETINGS = ("year", "month", "tic", "boundaries")
SAMPLE = 10  # examples kept per reported problem
MIN_MONTH, MAX_MONTH = 1 * 12, 9999 * 12 + 11
_EPOCH_LIMIT_S = 253402300799  # 9999-12-31T23:59:59


class SplitError(InputError):
    """Bad split input or option; one line naming the file, column or option."""


# ---------------------------------------------------------------- time labels and bucketing

def month_label(m: int) -> str:
    return f"{m // 12:04d}-{m % 12 + 1:02d}"


def parse_period(label: str) -> tuple[int, int]:
    """"2016" -> (2016-01, 2017-01); "201906" / "2019-06" -> (2019-06, 2019-07), as month indexes."""
    text = str(label).strip()
    if re.fullmatch(r"\d{4}", text):
        return int(text) * 12, int(text) * 12 + 12
    match = re.fullmatch(r"(\d{4})-?(\d{2})", text)
    if match and 1 <= int(match[2]) <= 12:
        m = int(match[1]) * 12 + int(match[2]) - 1
        return m, m + 1
    raise SplitError(f"bad period {label!r}: expected YYYY, YYYYMM or YYYY-MM")


def _period_name(label: str) -> str:
    start, end = parse_period(label)
    return f"{start // 12:04d}" if end - start == 12 else f"{start // 12:04d}{start % 12 + 1:02d}"


@dataclass(frozen=True)
class Bucketing:
    """Maps month indexes (year * 12 + month - 1) to bucket keys. Bounded: `starts` (ascending) and
    `end` (exclusive) define buckets [starts[i], starts[i+1]); keys are bucket positions. Open (year
    or month without a range): one bucket per year / month seen, the key being the year / month index."""
    by: str
    starts: Optional[tuple[int, ...]] = None
    end: Optional[int] = None
    names: tuple[str, ...] = ()

    @property
    def bounded(self) -> bool:
        return self.starts is not None

    def keys(self, months: np.ndarray, status: np.ndarray) -> np.ndarray:
        keys = np.full(len(months), UNKNOWN, np.int32)
        ok = status == TS_OK
        keys[status == TS_BEYOND] = OUT_OF_RANGE
        if self.bounded:
            starts = np.asarray(self.starts, np.int64)
            m = months[ok]
            k = (np.searchsorted(starts, m, side="right") - 1).astype(np.int32)
            k[(m < starts[0]) | (m >= self.end)] = OUT_OF_RANGE
            keys[ok] = k
        else:
            keys[ok] = months[ok] // 12 if self.by == "year" else months[ok]
        return keys

    def key_of_period(self, start: int, end: int) -> int:
        """The one bucket a whole period falls in (uid files carry a period, not a timestamp)."""
        a, b = self.keys(np.array([start, end - 1], np.int64), np.zeros(2, np.int8))
        if a != b:
            raise SplitError(f"period {month_label(start)}..{month_label(end - 1)} straddles a bucket boundary "
                             f"of --by {self.by}; use a finer uid file or coarser buckets")
        return int(a)

    def name(self, key: int) -> str:
        if self.bounded:
            return self.names[key]
        return f"{key:04d}" if self.by == "year" else f"{key // 12:04d}{key % 12 + 1:02d}"

    def bucket_range(self, key: int) -> tuple[str, str]:
        if self.bounded:
            end = self.starts[key + 1] if key + 1 < len(self.starts) else self.end
            return month_label(self.starts[key]), month_label(end - 1)
        if self.by == "year":
            return month_label(key * 12), month_label(key * 12 + 11)
        return month_label(key), month_label(key)

    def fixed_keys(self) -> list[int]:
        return list(range(len(self.starts))) if self.bounded else []

    def describe(self) -> dict:
        out = {"by": self.by}
        if self.bounded:
            out["buckets"] = {n: list(self.bucket_range(k)) for k, n in enumerate(self.names)}
        return out


TIC_YEARS = (2016, 2017, 2018, 2019, 2020, 2021, 2022)


def make_bucketing(by: str, boundaries: Optional[list[str]] = None, range_: Optional[str] = None) -> Bucketing:
    """`tic`: 2014-2016 merged into "2016", then one bucket per year to 2022 (TiC-DataComp's 7 steps).
    `year` / `month`: one bucket per year / month, bounded by `range_` ("2014:2022", "201401:202212")
    or open (every period seen). `boundaries`: labels B0 < B1 < ... < Bn give buckets [Bi, Bi+1) named Bi."""
    if by == "tic":
        starts = (2014 * 12,) + tuple(y * 12 for y in TIC_YEARS[1:])
        return Bucketing("tic", starts, 2023 * 12, tuple(str(y) for y in TIC_YEARS))
    if by in ("year", "month"):
        if not range_:
            return Bucketing(by)
        first, sep, last = range_.partition(":")
        if not sep:
            raise SplitError(f"--range {range_!r}: expected START:END, e.g. 2014:2022")
        lo, hi = parse_period(first)[0], parse_period(last)[1]
        if hi <= lo:
            raise SplitError(f"--range {range_!r}: END is before START")
        step = 12 if by == "year" else 1
        if by == "year" and (lo % 12 or hi % 12):
            raise SplitError(f"--range {range_!r}: --by year needs whole years")
        starts = tuple(range(lo, hi, step))
        names = tuple(f"{s // 12:04d}" if by == "year" else f"{s // 12:04d}{s % 12 + 1:02d}" for s in starts)
        return Bucketing(by, starts, hi, names)
    if by == "boundaries":
        if not boundaries or len(boundaries) < 2:
            raise SplitError("--by boundaries needs --boundaries with at least two labels, e.g. 2014,2017,2020,2023")
        starts = [parse_period(b)[0] for b in boundaries]
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise SplitError(f"--boundaries {','.join(boundaries)}: labels must be strictly increasing")
        return Bucketing("boundaries", tuple(starts[:-1]), starts[-1], tuple(_period_name(b) for b in boundaries[:-1]))
    raise SplitError(f"--by {by!r}: expected one of {', '.join(BUCKETINGS)}")


# ---------------------------------------------------------------- timestamp parsing

_ISO = r"^\d{4}-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01])([T ]\d{2}(:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?)?)?$"
_NUMBER = r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$"


def _blank(arr):
    import pyarrow.compute as pc
    return pc.fill_null(pc.equal(pc.utf8_trim_whitespace(arr), ""), False)


def month_index(col, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Month index (year * 12 + month - 1) and a status per row (TS_OK / MISSING / UNPARSEABLE / BEYOND).

    Arrow timestamp and date columns are used as they are, whatever `fmt` says. `epoch` / `epoch_ms`:
    numbers (or numeric strings) of seconds / milliseconds since 1970 UTC. `iso`: `YYYY-MM[-DD[THH:MM:SS]]`
    with an optional zone, bucketed by the date as written. `yyyymm`: 201903 (int or string) or "2019-03".
    Missing = null, NaN or blank; unparseable = anything else that does not match the format."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    status = np.zeros(n, np.int8)
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.dictionary_decode(), col.type.value_type
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        col, t = col.cast(pa.string()), pa.string()
    if pa.types.is_null(t):
        status[:] = TS_MISSING
        return np.zeros(n, np.int64), status
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return _from_calendar(pc.year(col), pc.month(col), status)
    null = col.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_string(t):
        blank = _blank(col).to_numpy(zero_copy_only=False)
        status[null | blank] = TS_MISSING
        pattern = {"iso": _ISO, "yyyymm": r"^\s*\d{4}-?\d{2}\s*$"}.get(fmt, _NUMBER)
        good = pc.fill_null(pc.match_substring_regex(col, pattern), False).to_numpy(zero_copy_only=False)
        status[(status == TS_OK) & ~good] = TS_UNPARSEABLE
        valid = pa.array(status == TS_OK)
        if fmt == "iso":
            cleaned = pc.if_else(valid, col, "0000-01")  # only validated text reaches the casts
            year = pc.cast(pc.utf8_slice_codeunits(cleaned, 0, 4), pa.int64())
            month = pc.cast(pc.utf8_slice_codeunits(cleaned, 5, 7), pa.int64())
            return _from_calendar(year, month, status)
        cleaned = pc.if_else(valid, col, "0")
        if fmt == "yyyymm":
            col = pc.cast(pc.replace_substring(pc.utf8_trim_whitespace(cleaned), "-", ""), pa.int64())
        else:
            col = pc.cast(pc.utf8_trim_whitespace(cleaned), pa.float64())
        t = col.type
        null = np.zeros(n, bool)
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise SplitError(f"timestamp column has type {t}, which --timestamp-format {fmt} cannot read")
    if fmt == "iso":
        raise SplitError(f"timestamp column has numeric type {t}; --timestamp-format iso needs strings")
    values = col.to_numpy(zero_copy_only=False)
    if values.dtype.kind == "f":
        nan = np.isnan(values)
        status[(nan | null) & (status == TS_OK)] = TS_MISSING
        values = np.where(nan, 0, values)
    else:
        status[null & (status == TS_OK)] = TS_MISSING
    if fmt == "yyyymm":
        v = values.astype(np.int64) if values.dtype.kind != "f" else values
        whole = v == np.floor(v) if values.dtype.kind == "f" else np.ones(n, bool)
        v = v.astype(np.int64)
        month = v % 100
        bad = ~whole | (month < 1) | (month > 12) | (v < 100)
        status[(status == TS_OK) & bad] = TS_UNPARSEABLE
        beyond = (status == TS_OK) & (v > 999912)
        status[beyond] = TS_BEYOND
        months = np.where(status == TS_OK, (v // 100) * 12 + month - 1, 0)
        return months.astype(np.int64), status
    scale = 1000 if fmt == "epoch_ms" else 1
    seconds = np.floor(values / scale) if values.dtype.kind == "f" or scale != 1 else values
    if values.dtype.kind == "f":
        seconds = np.where(np.isfinite(seconds), seconds, 0)
    beyond = (status == TS_OK) & ((seconds < -62135596800) | (seconds > _EPOCH_LIMIT_S))
    status[beyond] = TS_BEYOND
    seconds = np.where(status == TS_OK, seconds, 0).astype(np.int64)
    stamps = pa.array(seconds).cast(pa.timestamp("s"))
    return _from_calendar(pc.year(stamps), pc.month(stamps), status)


def _from_calendar(year, month, status: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(year.to_numpy(zero_copy_only=False), np.float64 if year.null_count else np.int64)
    mo = np.asarray(month.to_numpy(zero_copy_only=False), np.float64 if month.null_count else np.int64)
    missing = np.isnan(y) | np.isnan(mo) if y.dtype.kind == "f" or mo.dtype.kind == "f" else np.zeros(len(y), bool)
    status[missing & (status == TS_OK)] = TS_MISSING
    months = np.where(status == TS_OK, np.nan_to_num(y) * 12 + np.nan_to_num(mo) - 1, 0).astype(np.int64)
    return months, status


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
    from reinforge.schemas.subset import _load_npy
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


# ---------------------------------------------------------------- partitioned row store

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
        raise SplitError(f"--timestamp-format {options.timestamp_format!r}: expected one of {', '.join(TIMESTAMP_FORMATS)}")
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
    n = len(batch.hi)
    report.rows += n
    if batch.key_override is not None:
        keys = np.full(n, batch.key_override, np.int32)
        if batch.key_override == OUT_OF_RANGE:  # a whole uid file outside the buckets
            below = bool(bucketing.bounded and batch.months[0] < bucketing.starts[0])
            report.below += n if below else 0
            report.above += 0 if below else n
            m = int(batch.months[0])
            report.earliest_out = m if report.earliest_out is None else min(report.earliest_out, m)
            report.latest_out = m if report.latest_out is None else max(report.latest_out, m)
    else:
        keys = bucketing.keys(batch.months, batch.ts_status)
        report.missing += int((batch.ts_status == TS_MISSING).sum())
        unparseable = np.flatnonzero(batch.ts_status == TS_UNPARSEABLE)
        report.unparseable += len(unparseable)
        for i in unparseable[:SAMPLE - len(report.unparseable_sample)].tolist():
            report.unparseable_sample.append({"input": url, "row": row0 + i, "value": str(batch.raw_ts[i].as_py())[:64]})
        out = keys == OUT_OF_RANGE
        if out.any():
            m = batch.months[out]
            beyond = batch.ts_status[out] == TS_BEYOND
            first = bucketing.starts[0] if bucketing.bounded else MIN_MONTH
            below = (m < first) & ~beyond
            report.below += int(below.sum())
            report.above += int((~below).sum())
            inside = m[~beyond]
            if len(inside):
                report.earliest_out = min(int(inside.min()), report.earliest_out if report.earliest_out is not None else 1 << 40)
                report.latest_out = max(int(inside.max()), report.latest_out if report.latest_out is not None else -1)
    bad = batch.uid_status != UID_OK
    if bad.any():
        for code, name in UID_STATUS_NAMES.items():
            c = int((batch.uid_status == code).sum())
            if c:
                report.malformed[name] = report.malformed.get(name, 0) + c
        for i in np.flatnonzero(bad)[:SAMPLE - len(report.malformed_sample)].tolist():
            value = batch.raw_uids[i].as_py() if batch.raw_uids is not None else None
            report.malformed_sample.append({"input": url, "row": row0 + i,
                                            "value": None if value is None else str(value)[:64]})
        good = ~bad
        store.add(batch.hi[good], batch.lo[good], keys[good])
        _add_counts(report.rows_by_key, keys[good])
    else:
        store.add(batch.hi, batch.lo, keys)
        _add_counts(report.rows_by_key, keys)


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
