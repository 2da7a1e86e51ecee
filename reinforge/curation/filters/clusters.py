"""The image-based filter's clustering: k-means centroids of the pool's image embeddings, and which
centroids the target set (e.g. ImageNet-1k image embeddings) hits. Two methods (`--kmeans`):

- `datacomp` (the default) is DataComp's, so its decisions come out uid for uid: faiss `Clustering`
  (L2 k-means, niter 20, the given seed, nredo 1, max_points_per_centroid 10,000,000 so faiss never
  subsamples) with a flat L2 index, on the raw float32 embeddings of every row that passes the caption
  filter, in input order (files in the order given, directories sorted); centroids are kept as trained
  (not normalised); pool and target rows go to the centroid of largest dot product (first one on a tie,
  as torch.argmax). Only non-finite rows are left out (faiss refuses NaN; DataComp would crash).
- `spherical`: spherical k-means on L2-normalised vectors, trained *and* assigned by inner product (one
  metric); the training sample is chosen by uid, not position: the `size` rows with the smallest seeded
  hash of their uid, kept while streaming, so memory holds the sample and never the pool.

With `datacomp` the whole caption-filtered training set is held in memory, as DataComp's script did
(its `--sample_ratio` subsampling drew with replacement from an unseeded generator in worker processes,
so it cannot be reproduced; `--train-size N` takes reinforge's uid-hash sample instead).
"""
from __future__ import annotations

import io

import numpy as np

from reinforge.formats.sources import InputError


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
    """Streaming: keeps the `size` vectors whose uid hash is smallest (ties by uid, then input order), in
    memory. A later part's sample is merged in with `extend`: the `size` smallest of the parts' own
    `size` smallest are the `size` smallest of all, in the same order, so a pass cut into units (merged
    in input order) keeps exactly what one stream keeps."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.keys = np.zeros((0, 3), np.uint64)  # hash, hi, lo
        self.vectors: np.ndarray | None = None

    def add(self, hi: np.ndarray, lo: np.ndarray, unit: np.ndarray) -> None:
        self._keep(np.stack([uid_hash(hi, lo, self.seed), hi, lo], axis=1), unit)

    def extend(self, later: "TrainSample") -> None:
        """Merge the sample of rows that follow all of these."""
        if later.vectors is not None:
            self._keep(later.keys, later.vectors)

    def _keep(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = np.concatenate([self.keys, keys])
        vectors = vectors if self.vectors is None else np.concatenate([self.vectors, vectors])
        order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0]))[:self.size]  # stable: earlier rows first
        self.keys, self.vectors = keys[order], vectors[order]


KMEANS = ("datacomp", "spherical")
DATACOMP_MAX_POINTS_PER_CENTROID = 10_000_000  # DataComp's setting: "otherwise faiss sub-samples"


def usable_rows(vectors: np.ndarray, kmeans: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows as the method uses them, and the mask of usable ones (unusable rows are 0):
    datacomp keeps the raw values (finite rows usable), spherical normalises (finite, non-zero rows)."""
    if kmeans == "spherical":
        return unit_rows(vectors)
    x = np.asarray(vectors, np.float32)
    ok = np.isfinite(x).all(axis=1)
    return np.ascontiguousarray(np.where(ok[:, None], x, 0), np.float32), ok


class InputOrderSample:
    """Every usable row, in input order (DataComp's training set: no sampling)."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []

    def add(self, hi: np.ndarray, lo: np.ndarray, vectors: np.ndarray) -> None:
        self.chunks.append(vectors)

    def extend(self, later: "InputOrderSample") -> None:
        """Append the rows that follow all of these. A Ray task's chunks arrive as read-only views of the
        object store: copied out, so that the store is not filled by the training set."""
        self.chunks.extend(c if c.flags.writeable else c.copy() for c in later.chunks)

    @property
    def vectors(self) -> np.ndarray | None:
        return np.concatenate(self.chunks) if self.chunks else None


def train_centroids(sample: np.ndarray, k: int, seed: int, niter: int, kmeans: str = "spherical") -> np.ndarray:
    """k-means (`kmeans` method, module doc) -> [k, d] float32 centroids."""
    import faiss
    if k < 1:
        raise FilterError(f"--clusters must be >= 1 (got {k})")
    if len(sample) < k:
        raise FilterError(f"--clusters {k}: only {len(sample)} usable pool embeddings to train on")
    sample = np.ascontiguousarray(sample, np.float32)
    if kmeans == "datacomp":
        d = sample.shape[1]
        clustering = faiss.Clustering(d, k)
        clustering.niter, clustering.seed = niter, seed
        clustering.max_points_per_centroid = DATACOMP_MAX_POINTS_PER_CENTROID
        clustering.train(sample, faiss.IndexFlatL2(d))
        return faiss.vector_float_to_array(clustering.centroids).reshape(k, d).astype(np.float32)
    model = faiss.Kmeans(sample.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False,
                         max_points_per_centroid=max(1, -(-len(sample) // k)))  # we sampled already
    model.train(sample)
    assert isinstance(model.index, faiss.IndexFlatIP)  # training assigned by inner product
    centroids = model.centroids.astype(np.float32)
    return centroids / np.linalg.norm(centroids, axis=1, keepdims=True)


def assign(x: np.ndarray, centroids: np.ndarray, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Centroid of largest dot product, the first on a tie (DataComp's torch.argmax over an einsum):
    (cluster id int64, dot product as float32). For unit rows and centroids this is the nearest.
    Summed in float64: a float32 BLAS product changes in its last bits with the thread count (one
    thread in a Ray task, all cores in a process), float64 sums rounded to float32 do not, so a row
    scores the same wherever it runs."""
    centroids = np.asarray(centroids, np.float64)
    ids, sims = np.zeros(len(x), np.int64), np.zeros(len(x), np.float32)
    for i in range(0, len(x), block):
        dots = np.asarray(x[i:i + block], np.float64) @ centroids.T
        ids[i:i + block] = np.argmax(dots, axis=1)
        sims[i:i + block] = dots[np.arange(len(dots)), ids[i:i + block]]
    return ids, sims


def read_matrix(url: str, key: str | None, what: str, only_array: bool = False) -> np.ndarray:
    """A 2-d array from a `.npy`, or the array `key` of a `.npz` (with `only_array`, else its single array)."""
    from reinforge.io.storage import filesystem
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
