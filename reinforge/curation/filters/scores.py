"""Score pass of the DataComp filters: stream metadata Parquet a row group at a time and persist, per
uid, every statistic a filter decision needs later (filters.py applies rules without any model).

Writes under OUT: `scores/NNNNNN.parquet` (one part per unit, in input order; one row per well-formed
input row, one row group per input row group; a Parquet dataset pyarrow, pandas or DuckDB read as one
table), `score_report.json` (the parts and their row groups, inputs, rows, malformed uids, invalid values
per column, the methods used; written last) and, with clustering, `centroids.npy` ([k, d] float32;
clusters.py says how they are trained) and `centroid_targets.npy` (int64 target hits per centroid).
Earlier versions wrote the scores as one `scores.parquet`; `filter apply` still reads that.

Work: the per-caption Python (language id, synset lookup) is the cost (~50 s per million rows on one
core), so the rows are cut into units of whole row groups (~1M rows, `unit_rows`) scored as tasks (Ray,
worker processes, or inline for a small pool: runtime/ray_session.TaskMap); each unit writes its own part,
so the output does not depend on where or in what order units ran, no scored row passes through the
driver (it reads the inputs' footers), and no footer lists more than a unit's row groups.
Memory per worker: one row group plus, with clustering, its file's embeddings. The clustering pass
before it (cluster_pass.py) runs over the same units, as tasks alike; the driver merges their training
candidates and holds the k-means training set (`--kmeans datacomp`: every caption-filtered pool
embedding, float32, as DataComp's script held them) and trains on it.

Columns of the scores (nulls where the input was missing or unusable; a rule on a null fails):
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
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa

from reinforge.curation.filters.cluster_pass import Clustering, cluster_pool
from reinforge.curation.filters.clusters import assign, usable_rows
from reinforge.curation.filters.metadata import (OPTIONAL_COLUMNS, MetadataUnit, embedding_files, metadata_files,
                                                 plan_units, read_unit)
from reinforge.curation.filters.rules import STRING
from reinforge.curation.filters.text import caption_stats, cld3_languages, synset_lemmas
from reinforge.curation.filters.wordnet import WORDNET_PACKAGE, imagenet21k_offsets
from reinforge.formats.arrays import npy_bytes
from reinforge.formats.subset import UID_OK, UID_STATUS_NAMES
from reinforge.io.storage import absolute_url, atomic_open, remove, remove_tree, write_bytes

FORMAT = "reinforge.filter_scores/2"  # /2: the scores as parts listed in the report (/1: one scores.parquet)
PARTS, REPORT, CENTROIDS, CENTROID_TARGETS = "scores", "score_report.json", "centroids.npy", "centroid_targets.npy"
SCORES = "scores.parquet"  # the scores as one file, as earlier versions wrote them (still read)
SAMPLE = 10  # examples kept per reported problem
UNIT_ROWS = 1_000_000  # rows per task (whole row groups): ~1 min of one core, far above a task's start-up
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
        x, usable = usable_rows(vectors[rows], clustering.report["kmeans"])
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

    def merge(self, later: "_Tally") -> None:
        """Add the tally of the rows that follow these (the sample keeps the first SAMPLE in input order)."""
        for name in ("rows", "scored", "english", "english_cld3"):
            setattr(self, name, getattr(self, name) + getattr(later, name))
        for mine, theirs in ((self.malformed, later.malformed), (self.invalid, later.invalid)):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count
        self.sample.extend(later.sample[:SAMPLE - len(self.sample)])


def score_unit(unit: MetadataUnit, part_url: str, options: ScoreOptions, clustering: Optional[Clustering],
               schema: pa.Schema) -> tuple[list[int], _Tally]:
    """Score one unit's row groups into its own part of the scores (a row group per input row group);
    returns the row groups' sizes and the tally."""
    import pyarrow.parquet as pq
    tally, sizes = _Tally(), []
    key = options.embedding_key if clustering else None
    with atomic_open(part_url) as out:
        with pq.ParquetWriter(out.raw, schema, compression="zstd") as writer:
            for start, table, hi, lo, status, vectors in read_unit(unit, ("uid",) + OPTIONAL_COLUMNS, key):
                tally.add_malformed(unit.url, start, table, status)
                scores = _score_group(table, status == UID_OK, unit.file, start, vectors, clustering, schema, hi, lo)
                tally.add_scores(scores)
                writer.write_table(scores)
                sizes.append(scores.num_rows)
                tally.rows += table.num_rows
    return sizes, tally


def score_metadata(inputs: list[str], out_dir: str, options: ScoreOptions, unit_rows: int = UNIT_ROWS,
                   address: Optional[str] = None, where: Optional[str] = None) -> dict:
    """Score every row of the metadata files; write the parts of the scores, then score_report.json (which
    lists them); return the report. Units of ~unit_rows rows are scored as tasks: on Ray (`address`, or
    the Ray of this process), on worker processes for more than a driver's share of rows, else inline
    (`where` names one). Each unit writes its own part, so the files are the same bytes wherever the
    units ran, and no scored row passes through the driver."""
    from importlib.metadata import version

    from reinforge.runtime.ray_session import TaskMap, ray_session, where_to_map
    files = metadata_files(inputs)
    out_dir = absolute_url(out_dir).rstrip("/")
    emb_files = embedding_files(files, options.embeddings) if options.clusters else [None] * len(files)
    units, report_inputs = plan_units(files, emb_files, bool(options.clusters), unit_rows)
    remove(f"{out_dir}/{REPORT}")  # first: the report is what says the scores are complete
    remove(f"{out_dir}/{SCORES}")
    remove_tree(f"{out_dir}/{PARTS}")
    tally, parts = _Tally(), [f"{PARTS}/{u:06d}.parquet" for u in range(len(units))]
    with ray_session(address) if address else nullcontext():
        tasks = TaskMap(where or where_to_map(sum(i["rows"] for i in report_inputs)))
        try:
            clustering = cluster_pool(units, options, tasks) if options.clusters else None
            schema = _schema(clustering is not None, options.cld3)
            row_groups = []
            for sizes, part_tally in tasks(score_unit, [(u, f"{out_dir}/{p}") for u, p in zip(units, parts)],
                                           (options, clustering, schema)):
                row_groups.append(sizes)
                tally.merge(part_tally)
        finally:
            tasks.close()
    lemmas, wnids = synset_lemmas()
    report = {"format": FORMAT, "inputs": report_inputs, "rows": tally.rows, "scored": tally.scored,
              "parts": [{"file": p, "row_groups": sizes} for p, sizes in zip(parts, row_groups)],
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
        write_bytes(f"{out_dir}/{CENTROIDS}", npy_bytes(clustering.centroids))
        write_bytes(f"{out_dir}/{CENTROID_TARGETS}", npy_bytes(clustering.target_hits))
    write_bytes(f"{out_dir}/{REPORT}", json.dumps(report, indent=1, sort_keys=True).encode())
    return report
