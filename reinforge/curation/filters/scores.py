"""Score pass of the DataComp filters: stream metadata Parquet a row group at a time and persist, per
uid, every statistic a filter decision needs later (filters.py applies rules without any model).

Writes under OUT: `scores.parquet` (one row per well-formed input row, input order, one row group per
input row group), `score_report.json` (inputs, rows, malformed uids, invalid values per column, the
methods used) and, with clustering, `centroids.npy` ([k, d] float32; clusters.py says how they are
trained) and `centroid_targets.npy` (int64 target hits per centroid). Memory: one row group plus, with
clustering, one file's embeddings and the k-means training set (`--kmeans datacomp`: every
caption-filtered pool embedding, float32, as DataComp's script held them). Single process: pyarrow and numpy do the
columns, the per-caption Python (language id, synset lookup) is the cost.

Columns of scores.parquet (nulls where the input was missing or unusable; a rule on a null fails):
  uid_hi, uid_lo   uint64 halves of the uid        file, row   input file index and row in it
  words, chars     caption word / character count  lang        language code (py3langid)
  synset_hits      caption phrases naming an ImageNet-21k synset; synset: the first one's index
  short_side, aspect   min(w, h) and max(w, h) / min(w, h) of original_width/original_height
  clip_b32, clip_l14   the metadata's CLIP similarity scores, as given (NaN/inf stay; rules skip them)
  lang_cld3        language code (CLD3, the LAION-2B reproduction's identifier)
  cluster, cluster_sim, cluster_targets   centroid of largest dot product with the image embedding, that
                   dot product, and how many target images that centroid holds (only with clustering)
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from reinforge.curation.filters.clusters import (DATACOMP_MAX_POINTS_PER_CENTROID, KMEANS, FilterError,
                                                 InputOrderSample, TrainSample, assign, read_matrix, train_centroids,
                                                 unit_rows, usable_rows)
from reinforge.curation.filters.rules import STRING
from reinforge.curation.filters.text import caption_stats, cld3_languages, synset_lemmas
from reinforge.curation.filters.wordnet import WORDNET_PACKAGE, imagenet21k_offsets
from reinforge.formats.subset import UID_OK, UID_STATUS_NAMES, parse_hex_uids
from reinforge.io.storage import atomic_open, filesystem, write_bytes

FORMAT = "reinforge.filter_scores/1"
SCORES, REPORT, CENTROIDS, CENTROID_TARGETS = ("scores.parquet", "score_report.json", "centroids.npy",
                                                "centroid_targets.npy")
SAMPLE = 10  # examples kept per reported problem
# metadata column -> what it feeds; only uid is required, a missing one makes its scores null (reported)
OPTIONAL_COLUMNS = ("text", "original_width", "original_height", "clip_b32_similarity_score",
                    "clip_l14_similarity_score")
INT_COLUMNS = ("words", "chars", "synset_hits", "synset", "wordnet_hits", "ft_words", "cluster", "cluster_targets")
FLOAT_COLUMNS = ("short_side", "aspect", "clip_b32", "clip_l14", "cluster_sim")


@dataclass
class ScoreOptions:
    embeddings: list[str] = field(default_factory=list)  # one npz per metadata file, or ["paired"]
    embedding_key: str = "l14_img"
    clusters: int = 0  # k; 0 = no image-based clustering
    cluster_targets: Optional[str] = None  # .npy / .npz of target image embeddings (e.g. ImageNet-1k)
    target_key: Optional[str] = None  # array name in a target .npz (default: embedding_key, or its only array)
    train_size: int = 0  # k-means training sample; 0 = datacomp: every row, spherical: 256 per centroid
    niter: int = 20
    seed: int = 0
    cluster_train: str = "caption"  # k-means trains on: "caption" rows (as DataComp did) or "all" rows
    kmeans: str = "datacomp"  # "datacomp" (L2 k-means, raw vectors, dot-product assignment) or "spherical"
    centroids: Optional[str] = None  # .npy/.npz of given centroids (e.g. DataComp's released ones): no training
    cld3: bool = False  # also the CLD3 language (lang_cld3), which DataComp's laion2b baseline filters on


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


def _embedding_files(files: list[str], options: ScoreOptions) -> list[str]:
    given = options.embeddings or ["paired"]
    if given == ["paired"]:  # DataComp layout: <stem>.npz beside <stem>.parquet
        return [f[:-len(".parquet")] + ".npz" if f.endswith(".parquet") else f + ".npz" for f in files]
    if len(given) != len(files):
        raise FilterError(f"--embeddings: {len(given)} files for {len(files)} metadata files "
                          "(give one row-aligned .npz per metadata file, in the same order, or 'paired')")
    return list(given)


def _file_embeddings(url: str, key: str, rows: int, dim: Optional[int]) -> np.ndarray:
    vectors = read_matrix(url, key, "embeddings")
    if len(vectors) != rows:
        raise FilterError(f"embeddings {url}: {key} has {len(vectors)} rows, its metadata file has {rows}")
    if dim is not None and vectors.shape[1] != dim:
        raise FilterError(f"embeddings {url}: {key} has dim {vectors.shape[1]}, earlier files have {dim}")
    return vectors


def _row_groups(pf, columns: tuple[str, ...]) -> Iterator[tuple[int, pa.Table, np.ndarray, np.ndarray, np.ndarray]]:
    """(first row, row group table, hi, lo, uid status) per row group, for the columns that exist."""
    present = [c for c in columns if c in pf.schema_arrow.names]
    start = 0
    for g in range(pf.num_row_groups):
        table = pf.read_row_group(g, columns=present, use_threads=False)
        hi, lo, status = parse_hex_uids(table.column("uid"))
        yield start, table, hi, lo, status
        start += table.num_rows


# ---------------------------------------------------------------- clustering (pass 0)

@dataclass
class Clustering:
    centroids: np.ndarray
    target_hits: np.ndarray  # per centroid
    report: dict


def _caption_rows(table: pa.Table) -> np.ndarray:
    """DataComp's caption filter (English, > 1 fastText token, > 5 chars): its k-means saw only these rows."""
    from reinforge.curation.filters.text import _language_identifier
    from reinforge.curation.filters.wordnet import fasttext_words
    if "text" not in table.column_names:
        return np.zeros(table.num_rows, bool)
    identify = _language_identifier().classify
    return np.array([t is not None and fasttext_words(t) > 1 and len(t) > 5
                     and identify(t.replace("\n", " "))[0] == "en" for t in table.column("text").to_pylist()], bool)


def _training_sample(files: list[str], emb_files: list[str], options: ScoreOptions):
    """Stream the pool embeddings once: (the k-means training rows, dim, usable rows left out)."""
    sampled = options.train_size or (0 if options.kmeans == "datacomp" else 256 * options.clusters)
    sample = TrainSample(sampled, options.seed) if sampled else InputOrderSample()
    dim, left_out = None, 0
    for url, emb_url in zip(files, emb_files):
        with open_metadata(url) as pf:
            vectors = _file_embeddings(emb_url, options.embedding_key, pf.metadata.num_rows, dim)
            dim = vectors.shape[1]
            for start, table, hi, lo, status in _row_groups(pf, ("uid", "text")):
                x, ok = usable_rows(vectors[start:start + len(hi)], options.kmeans)
                if sampled:  # the uid-hash sample needs a uid; DataComp's own training set does not
                    ok &= status == UID_OK
                if options.cluster_train == "caption":
                    ok &= _caption_rows(table)
                left_out += int(len(ok) - ok.sum())
                sample.add(hi[ok], lo[ok], x[ok])
    if dim is None:
        raise FilterError("clustering: the metadata files hold no rows")
    vectors = sample.vectors
    if vectors is None or not len(vectors):
        raise FilterError(f"clustering: no usable pool embedding to train on (--cluster-train {options.cluster_train})")
    how = (f"the {sampled} rows with the smallest seeded hash of their uid" if sampled else
           "every row, in input order (DataComp's training set)")
    return vectors, dim, left_out, how


def _cluster(files: list[str], emb_files: list[str], options: ScoreOptions) -> Clustering:
    """Train the centroids (or read given ones), then assign the targets."""
    if options.kmeans not in KMEANS:
        raise FilterError(f"--kmeans {options.kmeans!r}: choose one of {', '.join(KMEANS)}")
    if not options.cluster_targets:
        raise FilterError("--clusters needs --cluster-targets (embeddings of the target images, e.g. ImageNet-1k)")
    targets = read_matrix(options.cluster_targets, options.target_key or options.embedding_key, "cluster targets",
                          only_array=options.target_key is None)
    k = options.clusters
    report = {"k": k, "kmeans": options.kmeans, "embedding_key": options.embedding_key, "seed": options.seed,
              "niter": options.niter}
    if options.centroids:
        centroids = read_matrix(options.centroids, None, "centroids", only_array=True).astype(np.float32)
        if len(centroids) != k:
            raise FilterError(f"centroids {options.centroids}: {len(centroids)} rows, --clusters is {k}")
        if not np.isfinite(centroids).all():
            raise FilterError(f"centroids {options.centroids}: non-finite values")
        if options.kmeans == "spherical":
            centroids, ok = unit_rows(centroids)
            if not ok.all():
                raise FilterError(f"centroids {options.centroids}: zero rows cannot be normalised")
        dim = centroids.shape[1]
        report["centroids"] = options.centroids
    else:
        sample, dim, left_out, how = _training_sample(files, emb_files, options)
        centroids = train_centroids(sample, k, options.seed, options.niter, options.kmeans)
        report.update(train_rows=len(sample), train_sample=how, train_rows_from=options.cluster_train,
                      pool_rows_left_out=left_out)
        if options.kmeans == "datacomp":
            import faiss
            report["faiss"] = {"version": faiss.__version__, "index": "IndexFlatL2", "nredo": 1, "spherical": False,
                               "max_points_per_centroid": DATACOMP_MAX_POINTS_PER_CENTROID}
    if targets.shape[1] != dim:
        raise FilterError(f"cluster targets {options.cluster_targets}: dim {targets.shape[1]}, "
                          f"pool embeddings ({options.embedding_key}) have dim {dim}")
    x, ok = usable_rows(targets, options.kmeans)
    if not ok.any():
        raise FilterError(f"cluster targets {options.cluster_targets}: no usable (finite) row")
    ids, _ = assign(x[ok], centroids)
    hits = np.bincount(ids, minlength=k).astype(np.int64)
    report.update(dim=int(dim), metric=_METRICS[options.kmeans],
                  targets={"path": options.cluster_targets, "rows": len(targets), "invalid": int((~ok).sum()),
                           "centroids_hit": int((hits > 0).sum())})
    return Clustering(centroids, hits, report)


_METRICS = {"datacomp": "faiss L2 k-means on raw float32 vectors; assignment by largest dot product (DataComp's)",
            "spherical": "spherical k-means on L2-normalised vectors; assignment by inner product"}


# ---------------------------------------------------------------- the score pass

def _ints(x: np.ndarray) -> pa.Array:
    x = np.asarray(x, np.float64)
    null = ~np.isfinite(x) | (x < 0)
    return pa.array(np.where(null, 0, x).astype(np.int32), pa.int32(), mask=null)


def _floats(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return table.column(name).cast(pa.float64()).fill_null(np.nan).to_numpy()


def _schema(clustering: bool, cld3: bool = False) -> pa.Schema:
    names = ["uid_hi", "uid_lo", "file", "row", "words", "chars", "lang", "synset_hits", "synset",
             "wordnet_hits", "ft_words",
             "short_side", "aspect", "clip_b32", "clip_l14"]
    if cld3:
        names.append("lang_cld3")
    if clustering:
        names += ["cluster", "cluster_sim", "cluster_targets"]
    types = {"uid_hi": pa.uint64(), "uid_lo": pa.uint64(), "file": pa.int32(), "row": pa.int64(),
             "lang": pa.dictionary(pa.int32(), pa.string()), "lang_cld3": pa.dictionary(pa.int32(), pa.string())}
    return pa.schema([(n, types.get(n, pa.int32() if n in INT_COLUMNS else pa.float32())) for n in names],
                     metadata={"format": FORMAT})


def _score_group(table: pa.Table, ok: np.ndarray, file_index: int, start: int,
                 vectors: Optional[np.ndarray], clustering: Optional[Clustering], schema: pa.Schema,
                 hi: np.ndarray, lo: np.ndarray) -> pa.Table:
    table = table.filter(pa.array(ok))
    rows = np.flatnonzero(ok)
    texts = table.column("text").to_pylist() if "text" in table.column_names else [None] * len(rows)
    stats = caption_stats(texts)
    w, h = _floats(table, "original_width"), _floats(table, "original_height")
    with np.errstate(invalid="ignore", divide="ignore"):
        short, long_ = np.minimum(w, h), np.maximum(w, h)
        good = np.isfinite(short) & np.isfinite(long_) & (short > 0)
        aspect = np.where(good, long_ / short, np.nan)
    columns = {"uid_hi": pa.array(hi[ok]), "uid_lo": pa.array(lo[ok]),
               "file": pa.array(np.full(len(rows), file_index, np.int32)), "row": pa.array(start + rows),
               "words": _ints(stats["words"]), "chars": _ints(stats["chars"]),
               "lang": pa.array(stats["lang"].tolist(), pa.string()).dictionary_encode(),
               "synset_hits": _ints(stats["synset_hits"]), "synset": _ints(stats["synset"]),
               "wordnet_hits": _ints(stats["wordnet_hits"]), "ft_words": _ints(stats["ft_words"]),
               "short_side": pa.array(np.where(good, short, np.nan), pa.float32()),
               "aspect": pa.array(aspect, pa.float32()),
               "clip_b32": pa.array(_floats(table, "clip_b32_similarity_score"), pa.float32()),
               "clip_l14": pa.array(_floats(table, "clip_l14_similarity_score"), pa.float32())}
    if "lang_cld3" in schema.names:
        columns["lang_cld3"] = pa.array(cld3_languages(texts).tolist(), pa.string()).dictionary_encode()
    if clustering is not None:
        x, usable = usable_rows(vectors[start + rows], clustering.report["kmeans"])
        ids, sims = assign(x, clustering.centroids)
        cluster = np.where(usable, ids, -1)
        columns["cluster"] = _ints(cluster)
        columns["cluster_sim"] = pa.array(np.where(usable, sims, np.nan), pa.float32())
        columns["cluster_targets"] = _ints(np.where(usable, clustering.target_hits[np.maximum(cluster, 0)], -1))
    return pa.table(columns, schema=schema)


@dataclass
class _Tally:
    rows: int = 0
    scored: int = 0
    english: int = 0
    english_cld3: int = 0
    malformed: dict = field(default_factory=dict)
    sample: list = field(default_factory=list)
    invalid: dict = field(default_factory=dict)

    def add_malformed(self, url: str, start: int, table: pa.Table, status: np.ndarray) -> None:
        for r in np.flatnonzero(status != UID_OK):
            reason = UID_STATUS_NAMES[int(status[r])]
            self.malformed[reason] = self.malformed.get(reason, 0) + 1
            if len(self.sample) < SAMPLE:
                self.sample.append({"file": url, "row": int(start + r), "reason": reason,
                                    "value": table.column("uid")[int(r)].as_py()})

    def add_scores(self, scores: pa.Table) -> None:
        import pyarrow.compute as pc
        for name in scores.column_names:
            if name in INT_COLUMNS + FLOAT_COLUMNS + STRING and name != "synset":  # null synset = no match
                col = scores.column(name)
                bad = col.null_count
                if name in FLOAT_COLUMNS:
                    bad += int(pc.sum(pc.invert(pc.is_finite(col))).as_py() or 0)
                self.invalid[name] = self.invalid.get(name, 0) + bad
        self.english += int(pc.sum(pc.equal(scores.column("lang").cast(pa.string()), "en")).as_py() or 0)
        if "lang_cld3" in scores.column_names:
            self.english_cld3 += int(pc.sum(pc.equal(scores.column("lang_cld3").cast(pa.string()), "en")).as_py() or 0)
        self.scored += scores.num_rows


def _score_file(url: str, index: int, emb_url: Optional[str], options: ScoreOptions,
                clustering: Optional[Clustering], writer, tally: _Tally) -> dict:
    with open_metadata(url) as pf:
        vectors = (_file_embeddings(emb_url, options.embedding_key, pf.metadata.num_rows, None)
                   if clustering else None)
        for start, table, hi, lo, status in _row_groups(pf, ("uid",) + OPTIONAL_COLUMNS):
            tally.add_malformed(url, start, table, status)
            scores = _score_group(table, status == UID_OK, index, start, vectors, clustering, writer.schema, hi, lo)
            tally.add_scores(scores)
            writer.write_table(scores)
            tally.rows += table.num_rows
        names = pf.schema_arrow.names
        return {"path": url, "rows": pf.metadata.num_rows, "row_groups": pf.num_row_groups,
                "missing_columns": [c for c in OPTIONAL_COLUMNS if c not in names],
                **({"embeddings": emb_url} if clustering else {})}


def score_metadata(inputs: list[str], out_dir: str, options: ScoreOptions) -> dict:
    """Score every row of the metadata files; write scores.parquet and score_report.json; return the report."""
    from importlib.metadata import version

    import pyarrow.parquet as pq
    files = metadata_files(inputs)
    out_dir = out_dir.rstrip("/")
    emb_files = _embedding_files(files, options) if options.clusters else [None] * len(files)
    clustering = _cluster(files, emb_files, options) if options.clusters else None
    tally = _Tally()
    with atomic_open(f"{out_dir}/{SCORES}") as out:
        with pq.ParquetWriter(out.raw, _schema(clustering is not None, options.cld3), compression="zstd") as writer:
            report_inputs = [_score_file(url, i, emb_files[i], options, clustering, writer, tally)
                             for i, url in enumerate(files)]
    lemmas, wnids = synset_lemmas()
    report = {"format": FORMAT, "inputs": report_inputs, "rows": tally.rows, "scored": tally.scored,
              "malformed_uids": {"rows": tally.rows - tally.scored, "by_reason": tally.malformed,
                                 "sample": tally.sample},
              "invalid": tally.invalid,
              # lang is py3langid's (DataComp used fastText lid.176, which cannot be had here; not compared)
              "language": {"method": f"py3langid {version('py3langid')}", "english": tally.english},
              "synsets": {"source": f"timm {version('timm')} ImageNetInfo('imagenet-21k')",
                          "synsets": len(wnids), "lemmas": sum(i >= 0 for i in lemmas.values())},
              # DataComp's text filter (wordnet_hits): first WordNet sense per whitespace token
              "wordnet": {"source": f"nltk {version('nltk')} reader over {WORDNET_PACKAGE} (WordNet 3.0)",
                          "imagenet21k_offsets": len(imagenet21k_offsets())}}
    if options.cld3:
        report["language_cld3"] = {"method": f"cld3-py {version('cld3-py')} gcld3.NNetLanguageIdentifier"
                                             "(min_num_bytes=0, max_num_bytes=1000)", "english": tally.english_cld3}
    if clustering is not None:
        report["clusters"] = clustering.report
        write_bytes(f"{out_dir}/{CENTROIDS}", _npy(clustering.centroids))
        write_bytes(f"{out_dir}/{CENTROID_TARGETS}", _npy(clustering.target_hits))
    write_bytes(f"{out_dir}/{REPORT}", json.dumps(report, indent=1, sort_keys=True).encode())
    return report


def _npy(array: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
