"""Pass 0 of `filter score` for the image-based filter: train the k-means centroids over the pool's
image embeddings (or read given ones), then count the target images each centroid holds. What is
trained on, and how, is clusters.py's; this module streams the pool into it, as tasks over the score
pass's units (the caption filter is per-row Python, as costly as scoring): each unit picks its rows'
training candidates, the driver merges them in input order (the same sample as one stream) and trains."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from reinforge.curation.filters.clusters import (DATACOMP_MAX_POINTS_PER_CENTROID, KMEANS, FilterError,
                                                 InputOrderSample, TrainSample, assign, read_matrix, train_centroids,
                                                 unit_rows, usable_rows)
from reinforge.curation.filters.metadata import MetadataUnit, read_unit
from reinforge.formats.subset import UID_OK

if TYPE_CHECKING:
    from reinforge.curation.filters.scores import ScoreOptions
    from reinforge.runtime.ray_session import TaskMap


@dataclass
class Clustering:
    centroids: np.ndarray
    target_hits: np.ndarray  # per centroid
    report: dict


def caption_rows(table: pa.Table) -> np.ndarray:
    """DataComp's caption filter (English, > 1 fastText token, > 5 chars): its k-means saw only these rows."""
    from reinforge.curation.filters.text import _language_identifier
    from reinforge.curation.filters.wordnet import fasttext_words
    if "text" not in table.column_names:
        return np.zeros(table.num_rows, bool)
    identify = _language_identifier().classify
    return np.array([t is not None and fasttext_words(t) > 1 and len(t) > 5
                     and identify(t.replace("\n", " "))[0] == "en" for t in table.column("text").to_pylist()], bool)


def _new_sample(options: ScoreOptions) -> tuple[TrainSample | InputOrderSample, int]:
    sampled = options.train_size or (0 if options.kmeans == "datacomp" else 256 * options.clusters)
    return (TrainSample(sampled, options.seed) if sampled else InputOrderSample()), sampled


def train_candidates(unit: MetadataUnit, options: ScoreOptions) -> tuple[TrainSample | InputOrderSample, int, int]:
    """One unit's share of the k-means training set (a task): its rows' sample (a TrainSample keeps the
    unit's own N smallest-hash rows, the only ones that can be among the pool's N smallest), the dim of
    its file's embeddings, and its usable rows left out."""
    sample, sampled = _new_sample(options)
    dim, left_out = 0, 0
    for _, table, hi, lo, status, vectors in read_unit(unit, ("uid", "text"), options.embedding_key):
        dim = vectors.shape[1]
        x, ok = usable_rows(vectors, options.kmeans)
        if sampled:  # the uid-hash sample needs a uid; DataComp's own training set does not
            ok &= status == UID_OK
        if options.cluster_train == "caption":
            ok &= caption_rows(table)
        left_out += int(len(ok) - ok.sum())
        sample.add(hi[ok], lo[ok], x[ok])
    return sample, dim, left_out


def training_sample(units: list[MetadataUnit], options: ScoreOptions, tasks: TaskMap):
    """One pass over the pool embeddings, unit by unit (as `tasks`), merged in input order: (the k-means
    training rows, dim, usable rows left out). The driver holds the sample and one unit's part."""
    sample, sampled = _new_sample(options)
    dim, left_out = None, 0
    for unit, (part, part_dim, part_left_out) in zip(units, tasks(train_candidates, [(u,) for u in units],
                                                                  (options,))):
        if dim is not None and part_dim != dim:
            raise FilterError(f"embeddings {unit.emb_url}: {options.embedding_key} has dim {part_dim}, "
                              f"earlier files have {dim}")
        dim = part_dim
        left_out += part_left_out
        sample.extend(part)
    if dim is None:
        raise FilterError("clustering: the metadata files hold no rows")
    vectors = sample.vectors
    if vectors is None or not len(vectors):
        raise FilterError(f"clustering: no usable pool embedding to train on (--cluster-train {options.cluster_train})")
    how = (f"the {sampled} rows with the smallest seeded hash of their uid" if sampled else
           "every row, in input order (DataComp's training set)")
    return vectors, dim, left_out, how


def cluster_pool(units: list[MetadataUnit], options: ScoreOptions, tasks: TaskMap) -> Clustering:
    """Train the centroids over the units' rows (or read given ones), then assign the targets."""
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
        sample, dim, left_out, how = training_sample(units, options, tasks)
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
