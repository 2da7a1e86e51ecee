"""Reading DataComp metadata for the filters: the Parquet files (a folder expands to its sorted files),
their columns checked for usable types, cut into units of whole row groups (the tasks of `filter score`'s
passes) read a row group at a time with parsed uids and the row-aligned image embeddings beside them
(DataComp's <stem>.npz, or files given in order)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from reinforge.curation.filters.clusters import FilterError, read_matrix
from reinforge.formats.subset import parse_hex_uids
from reinforge.io.storage import filesystem

# metadata column -> what it feeds; only uid is required, a missing one makes its scores null (reported)
OPTIONAL_COLUMNS = ("text", "original_width", "original_height", "clip_b32_similarity_score",
                    "clip_l14_similarity_score")


def metadata_files(paths: list[str]) -> list[str]:
    """Files as given; a directory expands to its sorted *.parquet files."""
    out = []
    for p in paths:
        fs, path = filesystem(p)
        prefix = p.split("://")[0] + "://" if "://" in p else ""
        if fs.isdir(path):
            found = sorted(f for f in fs.ls(path, detail=False) if f.endswith(".parquet"))
            if not found:
                raise FilterError(f"{p}: directory holds no .parquet files")
            out += [f if f.startswith(prefix) else prefix + f for f in found]
        elif fs.exists(path):
            out.append(p)
        else:
            raise FilterError(f"{p}: no such file")
    if not out:
        raise FilterError("no metadata files given")
    return out


@contextmanager
def open_metadata(url: str) -> Iterator:
    """A metadata ParquetFile whose columns have usable types; errors name the file and column."""
    import pyarrow.parquet as pq
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise FilterError(f"{url}: not a readable Parquet file ({exc})") from None
        schema = pf.schema_arrow
        if "uid" not in schema.names:
            raise FilterError(f"{url}: no column 'uid'; columns: {', '.join(schema.names[:12])}")
        for name in ("uid",) + OPTIONAL_COLUMNS:
            if name in schema.names:
                t = schema.field(name).type
                t = t.value_type if pa.types.is_dictionary(t) else t
                text = name in ("uid", "text")
                if not (pa.types.is_string(t) or pa.types.is_large_string(t) if text else
                        pa.types.is_integer(t) or pa.types.is_floating(t)):
                    raise FilterError(f"{url}: column {name!r} has type {t}, expected "
                                      f"{'strings' if text else 'numbers'}")
        yield pf


def embedding_files(files: list[str], given: list[str]) -> list[str]:
    """The embeddings file of each metadata file: as given, or DataComp's paired <stem>.npz."""
    given = given or ["paired"]
    if given == ["paired"]:  # DataComp layout: <stem>.npz beside <stem>.parquet
        return [f[:-len(".parquet")] + ".npz" if f.endswith(".parquet") else f + ".npz" for f in files]
    if len(given) != len(files):
        raise FilterError(f"--embeddings: {len(given)} files for {len(files)} metadata files "
                          "(give one row-aligned .npz per metadata file, in the same order, or 'paired')")
    return list(given)


def file_embeddings(url: str, key: str, rows: int) -> np.ndarray:
    vectors = read_matrix(url, key, "embeddings")
    if len(vectors) != rows:
        raise FilterError(f"embeddings {url}: {key} has {len(vectors)} rows, its metadata file has {rows}")
    return vectors


@dataclass(frozen=True)
class MetadataUnit:
    """Consecutive row groups of one metadata file: the work of one task (of the score pass, and of the
    k-means training pass before it)."""
    file: int  # index of the file among the inputs (the `file` column)
    url: str
    emb_url: Optional[str]
    groups: range  # row groups
    start: int  # first row of groups[0] in the file


def plan_units(files: list[str], emb_files: list, clustering: bool,
               unit_rows: int) -> tuple[list[MetadataUnit], list[dict]]:
    """Split every file into units of whole row groups of about `unit_rows` rows (from the footers only;
    a bad file or column is refused here, before any pass); and each file's entry of the score report."""
    units, inputs = [], []
    for index, (url, emb_url) in enumerate(zip(files, emb_files)):
        with open_metadata(url) as pf:
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            names = pf.schema_arrow.names
        first, start, rows = 0, 0, 0
        for g, n in enumerate(sizes):
            rows += n
            if rows >= unit_rows or g == len(sizes) - 1:
                units.append(MetadataUnit(index, url, emb_url, range(first, g + 1), start))
                first, start, rows = g + 1, start + rows, 0
        inputs.append({"path": url, "rows": sum(sizes), "row_groups": len(sizes),
                       "missing_columns": [c for c in OPTIONAL_COLUMNS if c not in names],
                       **({"embeddings": emb_url} if clustering else {})})
    return units, inputs


def read_unit(unit: MetadataUnit, columns: tuple[str, ...], embedding_key: Optional[str] = None
              ) -> Iterator[tuple[int, pa.Table, np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]]:
    """(first row in the file, table, hi, lo, uid status, embeddings) per row group of the unit, for the
    `columns` that exist; embeddings: the group's rows of its file's `embedding_key` array (checked
    row-aligned with the file), None without a key."""
    with open_metadata(unit.url) as pf:
        vectors = file_embeddings(unit.emb_url, embedding_key, pf.metadata.num_rows) if embedding_key else None
        present = [c for c in columns if c in pf.schema_arrow.names]
        start = unit.start
        for g in unit.groups:
            table = pf.read_row_group(g, columns=present, use_threads=False)
            hi, lo, status = parse_hex_uids(table.column("uid"))
            yield (start, table, hi, lo, status,
                   None if vectors is None else vectors[start:start + table.num_rows])
            start += table.num_rows
