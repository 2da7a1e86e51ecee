"""Pool embeddings: the per-task Parquet sidecar written by `embed_pool`, and the one loader that also
reads DataComp's own metadata (parquet with `uid` + paired `.npz` with row-aligned `l14_img`, ...).

Sidecar `embeddings/<task>.parquet`: `uid` (32 hex), `sha256` (of the image bytes), `image_emb` and
optionally `text_emb` as float16 little-endian `fixed_size_binary(2*D)`, L2-normalised (a
`list<float16>` column is ~40x slower to write and read). Schema metadata: `dim`, `dtype`, `encoder`.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reinforge.formats.subset import UID_OK, UID_STATUS_NAMES, make_subset, parse_hex_uids

FORMAT = "reinforge.embeddings/1"
IMAGE_KEY, TEXT_KEY = "image_emb", "text_emb"
DATACOMP_KEYS = ("l14_img", "b32_img", "l14_txt", "b32_txt")  # default order when key=None
SAMPLE = 5


class EmbeddingError(ValueError):
    """Unusable embeddings: empty pool, mismatched dimensions, unreadable files. Names the file."""


def fp16_bytes(vectors: np.ndarray) -> pa.FixedSizeBinaryArray:
    """[N, D] floats -> one fixed_size_binary(2*D) value per row (float16, little-endian)."""
    rows = np.ascontiguousarray(vectors, "<f2")
    width = 2 * rows.shape[1]
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(rows), [None, pa.py_buffer(rows.tobytes())])


def fp16_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The inverse of fp16_bytes, as float32 [N, D]; null rows become NaN (and are then rejected)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.byte_width
    data = np.frombuffer(column.buffers()[1], np.uint8)[column.offset * width:(column.offset + len(column)) * width]
    out = data.view("<f2").reshape(len(column), width // 2).astype(np.float32)
    if column.null_count:
        out[np.asarray(column.is_null())] = np.nan
    return out


def embeddings_table(uids: list[str], sha256: list[str], image_emb: np.ndarray,
                     text_emb: np.ndarray | None, encoder: dict) -> pa.Table:
    columns = {"uid": pa.array(uids, pa.string()), "sha256": pa.array(sha256, pa.string()),
               IMAGE_KEY: fp16_bytes(image_emb)}
    if text_emb is not None:
        columns[TEXT_KEY] = fp16_bytes(text_emb)
    meta = {"format": FORMAT, "dim": str(image_emb.shape[1]), "dtype": "float16",
            "encoder": json.dumps(encoder, sort_keys=True)}
    return pa.table(columns).replace_schema_metadata(meta)


def table_bytes(table: pa.Table) -> bytes:
    """Parquet bytes; deterministic for a given pyarrow version (no timestamps are stored)."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()


@dataclass
class Embeddings:
    """Rows in file order (files sorted), after dropping unusable rows; `row` of the index = row here."""
    uids: np.ndarray  # u8,u8 (hi, lo) per row, not sorted
    vectors: np.ndarray  # float32 [N, D], L2-normalised
    sha256: list | None  # per row, where the source has it
    key: str
    files: list[str]
    file_rows: list[int]  # usable rows per file, in file order
    skipped: dict = field(default_factory=dict)  # reason -> rows dropped
    skipped_sample: list = field(default_factory=list)

    def __iter__(self):  # `uids, vectors = load_embeddings(...)`
        return iter((self.uids, self.vectors))

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def resolve_paths(paths_or_run_dir: str | Sequence[str]) -> list[str]:
    """A run directory (the embeddings/*.parquet its finished tasks wrote), a folder of parquet files,
    globs, or files."""
    from reinforge.io.manifest import TMP_MARKER
    from reinforge.io.runs import committed_outputs, is_run_dir
    from reinforge.io.storage import filesystem, list_files
    items = [paths_or_run_dir] if isinstance(paths_or_run_dir, str) else list(paths_or_run_dir)
    files: list[str] = []
    for item in items:
        item = item.rstrip("/")
        fs, path = filesystem(item)
        if any(c in path for c in "*?["):
            prefix = item.split("://")[0] + "://" if "://" in item else ""
            files += [m if m.startswith(prefix) else prefix + m for m in sorted(fs.glob(path))]
        elif is_run_dir(item):  # an embed_pool run: the tables of its finished tasks only
            files += [table.url for table in committed_outputs(item, ".parquet")]
        elif fs.isdir(path):
            folder = f"{item}/embeddings" if fs.isdir(f"{path}/embeddings") else item
            files += [u for u in list_files(folder, ".parquet") if not u.rpartition("/")[2].startswith(TMP_MARKER)]
        elif fs.exists(path):
            files.append(item)
        else:
            raise EmbeddingError(f"embeddings: {item} not found")
    if not files:
        raise EmbeddingError(f"embeddings: no parquet files in {paths_or_run_dir}")
    return files


def _read_file(url: str, key: str | None) -> tuple[pa.Array, np.ndarray, list | None, str]:
    from reinforge.io.storage import filesystem
    fs, path = filesystem(url)
    try:
        table = pq.read_table(io.BytesIO(fs.cat_file(path)))
    except (OSError, pa.ArrowInvalid) as exc:
        raise EmbeddingError(f"{url}: not a readable parquet file ({exc})") from None
    if "uid" not in table.column_names:
        raise EmbeddingError(f"{url}: no uid column (columns: {table.column_names[:8]})")
    sha = table.column("sha256").to_pylist() if "sha256" in table.column_names else None
    ours = (table.schema.metadata or {}).get(b"format") == FORMAT.encode()
    if ours:
        key = key or IMAGE_KEY
        if key not in table.column_names:
            raise EmbeddingError(f"{url}: no {key!r} column (has {table.column_names})")
        return table.column("uid"), fp16_matrix(table.column(key)), sha, key
    # DataComp metadata: embeddings live in the .npz beside the parquet, row-aligned
    npz_url = url[:-len(".parquet")] + ".npz" if url.endswith(".parquet") else url + ".npz"
    nfs, npz_path = filesystem(npz_url)
    if not nfs.exists(npz_path):
        raise EmbeddingError(f"{url}: neither a reinforge embeddings file nor DataComp metadata with {npz_url}")
    try:
        npz = np.load(io.BytesIO(nfs.cat_file(npz_path)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise EmbeddingError(f"{npz_url}: not a readable .npz ({exc})") from None
    key = key or next((k for k in DATACOMP_KEYS if k in npz.files), None)
    if key is None or key not in npz.files:
        raise EmbeddingError(f"{npz_url}: no {key or 'l14_img/b32_img'} array (has {npz.files})")
    vectors = np.asarray(npz[key], np.float32)
    if vectors.ndim != 2 or len(vectors) != table.num_rows:
        raise EmbeddingError(f"{npz_url}: {key} has shape {vectors.shape}, the parquet has {table.num_rows} rows")
    return table.column("uid"), vectors, sha, key


def count_rows(url: str) -> int:
    """Rows of an embeddings or DataComp metadata parquet file, from its footer (nothing else is read)."""
    from reinforge.io.storage import filesystem
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    except (OSError, pa.ArrowInvalid) as exc:
        raise EmbeddingError(f"{url}: not a readable parquet file ({exc})") from None


def iter_embeddings(files: Sequence[str], key: str | None = None, normalise: bool = True) -> Iterator[Embeddings]:
    """One Embeddings per file (possibly empty), in order, so a caller holds one file at a time. Rows with
    NaN/inf, a zero vector or a malformed uid are dropped and counted (`skipped`); a file whose dim differs
    from the first file's is an error."""
    dim = None
    for url in files:
        uid_col, vectors, sha, file_key = _read_file(url, key)
        if dim is None:
            dim, first = vectors.shape[1], url
        elif vectors.shape[1] != dim:
            raise EmbeddingError(f"{url}: embeddings of dim {vectors.shape[1]}, {first} has dim {dim}")
        hi, lo, status = parse_hex_uids(uid_col)
        finite = np.isfinite(vectors).all(axis=1)
        norms = np.linalg.norm(np.where(finite[:, None], vectors, 0), axis=1)
        reasons = np.where(status != UID_OK, status.astype(np.int16), 0)
        reasons[(reasons == 0) & ~finite] = -1
        reasons[(reasons == 0) & (norms == 0)] = -2
        skipped: dict[str, int] = {}
        sample: list = []
        for code in np.unique(reasons[reasons != 0]):
            name = {-1: "nan_or_inf", -2: "zero_vector"}.get(int(code)) or f"uid_{UID_STATUS_NAMES[int(code)]}"
            rows = np.flatnonzero(reasons == code)
            skipped[name] = len(rows)
            sample += [{"file": url, "row": int(r), "reason": name} for r in rows[:SAMPLE - len(sample)]]
        ok = reasons == 0
        vectors = vectors[ok]
        if normalise:
            vectors /= norms[ok, None]
        yield Embeddings(make_subset(hi[ok], lo[ok]), np.ascontiguousarray(vectors),
                         None if sha is None else [s for s, keep in zip(sha, ok) if keep],
                         file_key, [url], [len(vectors)], skipped, sample)


def merge_skipped(parts: Sequence[Embeddings | dict]) -> tuple[dict, list]:
    """Skipped-row counts and the first examples of several parts (Embeddings or their dicts)."""
    skipped: dict[str, int] = {}
    sample: list = []
    for part in parts:
        counts, examples = (part.skipped, part.skipped_sample) if isinstance(part, Embeddings) else \
            (part["skipped"], part["skipped_sample"])
        for name, n in counts.items():
            skipped[name] = skipped.get(name, 0) + n
        sample += examples[:SAMPLE - len(sample)]
    return skipped, sample


def load_embeddings(paths_or_run_dir: str | Sequence[str], key: str | None = None,
                    normalise: bool = True) -> Embeddings:
    """Every usable row of the given embedding files in one matrix (iter_embeddings, concatenated);
    an empty result is an error."""
    files = resolve_paths(paths_or_run_dir)
    parts = list(iter_embeddings(files, key, normalise))
    skipped, sample = merge_skipped(parts)
    if not sum(len(p.vectors) for p in parts):
        raise EmbeddingError(f"embeddings: no usable rows in {len(files)} file(s) ({files[0]}, ...); "
                             f"skipped: {skipped or 'none (the files are empty)'}")
    have_sha = all(p.sha256 is not None for p in parts)
    return Embeddings(np.concatenate([p.uids for p in parts]), np.concatenate([p.vectors for p in parts]),
                      [s for p in parts for s in p.sha256] if have_sha else None, parts[0].key, files,
                      [len(p.vectors) for p in parts], skipped, sample)
