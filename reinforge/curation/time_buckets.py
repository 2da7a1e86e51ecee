"""Time labels, bucketings and timestamp parsing for TiC-DataComp time splits (pure, vectorised).

A month index is year * 12 + month - 1. A bucketing maps month indexes to bucket keys: a bucket's
position for bounded bucketings (tic, boundaries, year/month with a range), or the year / month
index itself for open ones. Two keys are reserved: UNKNOWN (-1: missing or unparseable timestamp)
and OUT_OF_RANGE (-2: a valid timestamp outside every bucket).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from reinforge.formats.sources import InputError

UNKNOWN, OUT_OF_RANGE = -1, -2  # bucket keys of the two non-time buckets
TS_OK, TS_MISSING, TS_UNPARSEABLE, TS_BEYOND = 0, 1, 2, 3  # BEYOND: parsed, but outside years 1..9999
TIMESTAMP_FORMATS = ("epoch", "epoch_ms", "iso", "yyyymm")
BUCKETINGS = ("year", "month", "tic", "boundaries")
MIN_MONTH = 1 * 12  # year 1
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
