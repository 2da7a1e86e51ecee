"""The image-based filter's clustering (DataComp): k-means centroids of the pool's image embeddings,
and which centroids the target set (e.g. ImageNet-1k image embeddings) hits.

One metric throughout: vectors are L2-normalised, centroids are trained with spherical k-means
(faiss assigns by inner product while training and renormalises the centroids every iteration),
and pool and target vectors are assigned by inner product to those unit centroids. DataComp's
public code trained L2 k-means but assigned by dot product, so its assignments were not the ones
its training optimised.

The training sample is chosen by uid, not by position: the `size` rows with the smallest seeded
hash of their uid, kept while streaming, so memory holds the sample and never the pool.
"""
from __future__ import annotations

import io

import numpy as np

from reinforge.pipelines.sources import InputError


class FilterError(InputError):
    """Bad filter input or option; one line naming the file, column, option or rule."""


def unit_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 L2-normalised copy and a mask of usable rows (finite, non-zero); unusable rows are 0."""
    x = np.asarray(vectors, np.float32)
    ok = np.isfinite(x).all(axis=1)
    x = np.where(ok[:, None], x, 0).astype(np.float32)
    norms = np.linalg.norm(x, axis=1)
    ok &= norms > 0
    x[ok] /= norms[ok, None]
    return np.ascontiguousarray(x), ok


def uid_hash(hi: np.ndarray, lo: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (hi, lo, seed): a seeded, position-free sampling key per uid."""
    with np.errstate(over="ignore"):
        z = hi * np.uint64(0x9E3779B97F4A7C15) ^ lo ^ np.uint64(seed & (2**64 - 1))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class TrainSample:
    """Streaming: keeps the `size` vectors whose uid hash is smallest (ties by uid), in memory."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.keys = np.zeros((0, 3), np.uint64)  # hash, hi, lo
        self.vectors: np.ndarray | None = None

    def add(self, hi: np.ndarray, lo: np.ndarray, unit: np.ndarray) -> None:
        keys = np.concatenate([self.keys, np.stack([uid_hash(hi, lo, self.seed), hi, lo], axis=1)])
        vectors = unit if self.vectors is None else np.concatenate([self.vectors, unit])
        order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0]))[:self.size]
        self.keys, self.vectors = keys[order], vectors[order]


def train_centroids(sample: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    """Spherical k-means on unit rows -> [k, d] float32 unit centroids."""
    import faiss
    if k < 1:
        raise FilterError(f"--clusters must be >= 1 (got {k})")
    if len(sample) < k:
        raise FilterError(f"--clusters {k}: only {len(sample)} usable pool embeddings to train on")
    kmeans = faiss.Kmeans(sample.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False,
                          max_points_per_centroid=max(1, -(-len(sample) // k)))  # we sampled already
    kmeans.train(np.ascontiguousarray(sample, np.float32))
    assert isinstance(kmeans.index, faiss.IndexFlatIP)  # training assigned by inner product
    centroids = kmeans.centroids.astype(np.float32)
    return centroids / np.linalg.norm(centroids, axis=1, keepdims=True)


def assign(unit: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product (the training metric): (cluster id int64, similarity float32)."""
    import faiss
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    sims, ids = index.search(np.ascontiguousarray(unit, np.float32), 1)
    return ids[:, 0], sims[:, 0]


def read_matrix(url: str, key: str | None, what: str, only_array: bool = False) -> np.ndarray:
    """A 2-d array from a `.npy`, or the array `key` of a `.npz` (with `only_array`, else its single array)."""
    from reinforge.pipelines.storage import filesystem
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise FilterError(f"{what} {url} not found")
    try:
        loaded = np.load(io.BytesIO(fs.cat_file(path)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise FilterError(f"{what} {url}: not a readable .npy/.npz ({exc})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        names = loaded.files
        name = key if key in names else (names[0] if len(names) == 1 and only_array else None)
        if name is None:
            raise FilterError(f"{what} {url}: no array {key!r} (has {', '.join(names) or 'none'})")
        loaded = loaded[name]
    if loaded.ndim != 2 or loaded.dtype.kind not in "fiu":
        raise FilterError(f"{what} {url}: expected a 2-d numeric array, got {loaded.dtype} {loaded.shape}")
    return loaded
