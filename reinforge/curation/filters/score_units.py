"""The scores as units, the tasks of `filter apply`'s passes (decide.py, top.py): runs of whole row groups,
read in batches of a few columns, with the rows whose uid an earlier row has (RepeatedRows) set aside; and what
the passes share (Passes): where their tasks run and the part files the units hand to the uid buckets."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from reinforge.curation.filters.clusters import FilterError
from reinforge.curation.filters.rules import NUMERIC
from reinforge.curation.filters.scores import REPORT, SCORES
from reinforge.io.fingerprint import file_versions
from reinforge.io.parts import bucket_parts
from reinforge.io.storage import absolute_url, exists, filesystem, read_text
from reinforge.runtime.ray_session import TaskMap

BATCH = 1 << 16  # rows per batch a task reads


@dataclass(frozen=True)
class Unit:
    """Whole row groups of one file of the scores, rows start .. start+rows-1 of the scores."""
    url: str
    version: tuple[int, str]  # of the file (io.fingerprint.file_versions): which footer a worker may reuse
    row_groups: tuple[int, ...]
    start: int
    rows: int
    batch: int  # rows per batch (tests make batches straddle row groups and bitmask bytes)

    def batches(self, names: list[str]) -> Iterator[tuple[int, int, dict]]:
        """(first row, rows, {name: column}) per batch: uids as uint64, numeric columns as numpy in their stored
        type (nulls as NaN, in float64 then), strings as (codes with -1 for null, dictionary list)."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        fs, path = filesystem(self.url)
        start = self.start
        with fs.open(path, "rb") as f:
            # pre-buffering reads ahead of iter_batches, O(unit) in memory
            pf = pq.ParquetFile(f, pre_buffer=False, metadata=_footer(self.url, self.version))
            for batch in pf.iter_batches(batch_size=self.batch, row_groups=list(self.row_groups), columns=names,
                                         use_threads=False):
                out = {}
                for name in names:
                    col = batch.column(name)
                    if name in ("uid_hi", "uid_lo"):
                        out[name] = col.to_numpy(zero_copy_only=False)
                    elif name in NUMERIC:
                        out[name] = (col.to_numpy(zero_copy_only=False) if col.null_count == 0
                                     else col.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False))
                    else:  # dictionary-encoded strings: compare codes, not Python strings
                        out[name] = (col.indices.fill_null(-1).to_numpy(zero_copy_only=False),
                                     col.dictionary.to_pylist())
                yield start, batch.num_rows, out
                start += batch.num_rows


@functools.lru_cache(maxsize=1)
def _footer(url: str, version: tuple[int, str]):
    """The file's footer, parsed once per worker process and version, not once per task: it lists every row
    group (~100k at 12.8B rows, hundreds of MB), so reading it per task would make a pass quadratic."""
    import pyarrow.parquet as pq
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.read_metadata(f)


@dataclass
class ScoreFile:
    """One Parquet file of the scores: a part (or the single scores.parquet of earlier versions)."""
    url: str
    version: tuple[int, str]
    row_groups: list[int]  # rows in each


@dataclass
class Scores:
    """The scores of a `filter score` folder: its report, its files and the stored column types."""
    folder: str
    report: dict
    files: list[ScoreFile]
    types: dict[str, np.dtype]

    @property
    def rows(self) -> int:
        return sum(sum(f.row_groups) for f in self.files)

    def units(self, unit_rows: int) -> list[Unit]:
        """Runs of whole row groups of one file, ~unit_rows rows each (a row group larger than that is a unit
        of its own); rows are numbered across the files, in order."""
        units, start = [], 0
        for file in self.files:
            groups, first, rows = [], start, 0
            for i, n in enumerate(file.row_groups):
                groups.append(i)
                rows += n
                if rows >= unit_rows or i == len(file.row_groups) - 1:
                    units.append(Unit(file.url, file.version, tuple(groups), first, rows, BATCH))
                    groups, first, rows = [], first + rows, 0
            start = first
        return units


def open_scores(scores_dir: str, names: list[str]) -> Scores:
    """Check that the scores exist, complete (their report lists their parts), and hold the columns `names`."""
    import pyarrow.parquet as pq
    scores_dir = absolute_url(scores_dir.rstrip("/"))
    report_url, single = f"{scores_dir}/{REPORT}", f"{scores_dir}/{SCORES}"
    report = json.loads(read_text(report_url)) if exists(report_url) else {}
    if "parts" not in report and not (report and exists(single)):
        raise FilterError(f"{scores_dir}: no scores (run `reinforge filter score` first)")
    parts = [(f"{scores_dir}/{p['file']}", p["row_groups"]) for p in report["parts"]] if "parts" in report else []
    urls = [url for url, _ in parts] or [single]
    versions = file_versions(urls)
    for url in urls:
        if versions[url][0] < 0:
            raise FilterError(f"{scores_dir}: {url} is missing (score again)")
    fs, path = filesystem(urls[0])
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        if not parts:  # one file: its row groups from its footer
            parts = [(single, [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)])]
    missing = [n for n in names if n not in schema.names]
    if missing:
        hint = (" (score with --clusters K --cluster-targets ...)" if any(n.startswith("cluster") for n in missing)
                else " (score with --cld3)" if "lang_cld3" in missing else "")
        raise FilterError(f"{scores_dir}: the scores have no column {', '.join(missing)}{hint}")
    types = {n: np.dtype(schema.field(n).type.to_pandas_dtype()) for n in names if n in NUMERIC}
    return Scores(scores_dir, report, [ScoreFile(url, versions[url], sizes) for url, sizes in parts], types)


class RepeatedRows:
    """The rows whose uid an earlier row has: their sorted numbers while those take less room than a bit per
    row (8 B each: up to one row in 64), else a bit per row. Scored pools repeat few uids (~0.1 %: ~0.01 B
    per row), and a bit per row would be 1.6 GB over DataComp-xlarge's 12.8B rows."""

    def __init__(self, rows: int):
        self.rows, self.count = rows, 0
        self.listed: list[np.ndarray] = []
        self.sorted: Optional[np.ndarray] = None
        self.bits: Optional[np.ndarray] = None  # packed, little bit order, from row `base`
        self.base = 0

    def add(self, rows: np.ndarray) -> None:
        self.count += len(rows)
        if self.bits is None and 64 * self.count > self.rows + 64:
            self.bits = np.zeros((self.rows + 7) // 8, np.uint8)
            for listed in self.listed:
                self._set(listed)
            self.listed = []
        if self.bits is not None:
            self._set(rows)
        else:
            self.listed.append(rows)

    def _set(self, rows: np.ndarray) -> None:
        np.bitwise_or.at(self.bits, rows >> 3, (1 << (rows & 7)).astype(np.uint8))

    def close(self) -> None:
        """Every repeated row added: sort the listed ones."""
        if self.bits is None:
            self.sorted = np.sort(np.concatenate(self.listed or [np.zeros(0, np.int64)]))
            self.listed = []

    def part(self, start: int, n: int) -> "RepeatedRows":
        """The rows [start, start+n) alone (a unit's task needs no more); views, not copies."""
        part = RepeatedRows(n)
        if self.bits is not None:
            part.bits, part.base = self.bits[start // 8:(start + n + 7) // 8], start - start % 8
        else:
            a, b = np.searchsorted(self.sorted, [start, start + n])
            part.sorted = self.sorted[a:b]
        return part

    def unique(self, start: int, n: int) -> np.ndarray:
        """Mask of the rows [start, start+n) that are the first row of their uid."""
        if self.bits is not None:
            at = start - self.base
            bits = np.unpackbits(self.bits[at // 8:(at + n + 7) // 8], bitorder="little")
            return bits[at % 8:at % 8 + n] == 0
        mask = np.ones(n, bool)
        a, b = np.searchsorted(self.sorted, [start, start + n])
        mask[self.sorted[a:b] - start] = False
        return mask


@dataclass
class Passes:
    """What the passes over the units share: where their tasks run, the part files' folder, the uid buckets
    (the top `bits` bits of the high half) and, once found, each unit's repeated rows."""
    tasks: TaskMap
    units: list[Unit]
    work: str
    bits: int
    repeats: Optional[list[RepeatedRows]] = None

    def per_unit(self, fn, shared: tuple) -> Iterator:
        """fn(unit, its repeated rows, *shared) for each unit, in unit order."""
        repeats = self.repeats or [None] * len(self.units)
        return self.tasks(fn, list(zip(self.units, repeats)), shared)

    def per_bucket(self, fn, kind: str, counts: list[np.ndarray]) -> Iterator:
        """fn(parts) for each uid bucket that holds rows, in uid order: parts are (part file, first row, end
        row) of the `kind` part files the units wrote, counts[unit][bucket] rows each."""
        files = [part_file(self.work, kind, u) for u in self.units]
        return self.tasks(fn, ((parts,) for parts in bucket_parts(files, np.stack(counts)) if parts), ())


def part_file(work: str, kind: str, unit: Unit) -> str:
    return f"{work}/{kind}/{unit.start:016d}.bin"
