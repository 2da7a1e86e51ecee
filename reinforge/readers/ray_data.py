"""Ray Data access to a run: its committed shards as a `ray.data.Dataset`, and the replay of stored
augmentations as a map function, so a Ray Train job streams reinforced data.

    from reinforge.readers.ray_data import Replay, read_run
    ds = read_run("runs/demo/run")                                   # members decoded
    train = read_run("runs/demo/run", decode=False).flat_map(Replay("runs/demo/run"))

Ray is imported inside the functions: reinforge.readers stays importable without it.
"""
from __future__ import annotations

import json
import random

import fsspec
import numpy as np

from reinforge.formats.augment import replay_augmenter
from reinforge.formats.image import IMAGE_EXTENSIONS, decode_rgb
from reinforge.formats.imagenet_plus import META_MEMBER, SchemaError, decode_sample, densify, sha256_hex
from reinforge.formats.members import decode_members
from reinforge.formats.seeds import entry_seed
from reinforge.io.manifest import RunLayout
from reinforge.io.runs import committed_shards


def read_run(run: str, decode: bool = True, **read_webdataset_args):
    """`ray.data.read_webdataset` over the run's committed shards (per its manifests; the json/md files
    beside them are not read as tars). decode=True: JSON members as Python objects (exactly as stored),
    txt as str, cls as int, npz as {name: array}, pth.gz as {name: tensor} (`weights_only=True`, dtype
    kept: bfloat16 stays bfloat16), gz unpacked; images stay bytes (a replay needs the exact bytes).
    decode=False: every member as bytes, what `Replay` takes."""
    import ray.data
    urls = [s.url for s in committed_shards(run)]
    if not urls:
        raise ValueError(f"{run} has no finished shards")
    return ray.data.read_webdataset(urls, decoder=decode_members if decode else None, file_extensions=["tar"],
                                    **read_webdataset_args)


def _untokenized(text: str) -> list[str]:
    return [text]


class Replay:
    """A `flat_map` function over `read_run(run, decode=False)` rows: each sample's stored augmentation j
    replayed on its image bytes (bit-identical to what the teachers saw) with its targets.

    ImageNet+ rows -> {"__key__", "image" float32 CHW, "target" float32 [C] (densified top-k), "label",
    "aug_index"}; MixUp/CutMix partners come from the same shard (the run mixed within a batch).
    DataCompDR rows -> MobileCLIPDRDataset's items ("image", "text", "syn_text", "image_emb", "text_emb",
    "syn_emb", "uid", "aug_index", "syn_index"; text as str unless a tokenizer is given); a sample that
    cannot be replayed is skipped and logged, as that reader does.
    j: mode "random" draws it from a generator seeded by (seed, key, epoch); "epoch" takes epoch mod N.
    """

    def __init__(self, run: str, mode: str = "random", seed: int = 0, epoch: int = 0, tokenizer=None,
                 p_plain: float = 0.0):
        if mode not in ("random", "epoch"):
            raise ValueError(f"mode must be 'random' or 'epoch', not {mode!r}")
        self.run, self.mode, self.seed, self.epoch, self.p_plain = run.rstrip("/"), mode, int(seed), int(epoch), p_plain
        self.tokenizer = tokenizer or _untokenized
        with fsspec.open(RunLayout(self.run).run_file, "r") as f:
            self.product = json.load(f)["product"]
        with fsspec.open(RunLayout(self.run).dr_config, "r") as f:
            self.config = json.load(f)
        self._dr = None  # built on first use, in the worker that runs the map
        self._aug = None
        self._partners: tuple[str, dict] | None = None  # (shard url, {key: {ext: (offset, size)}})

    def __call__(self, row: dict) -> list[dict]:
        if not all(isinstance(v, bytes) for k, v in row.items() if not k.startswith("__")):
            raise TypeError("Replay takes raw rows: read_run(run, decode=False)")
        return self._imagenet_plus(row) if self.product == "imagenet_plus" else self._datacomp_dr(row)

    # --- DataCompDR / DFNDR: MobileCLIPDRDataset's own per-sample code --------------------------------
    def _datacomp_dr(self, row: dict) -> list[dict]:
        if self._dr is None:
            from reinforge.readers.mobileclip import MobileCLIPDRDataset
            self._dr = MobileCLIPDRDataset(self.run, self.tokenizer, mode=self.mode, seed=self.seed)
            self._dr.set_epoch(self.epoch)
        item = self._dr._item(row, row.get("__url__", "?"), self.epoch)
        if item is None:
            return []
        return [{k: v.numpy() if hasattr(v, "numpy") else v for k, v in item.items()}]

    # --- ImageNet+ -------------------------------------------------------------------------------
    def _augmenter(self):
        if self._aug is None:
            self._aug = replay_augmenter(self.config.get("reinforce"))
        return self._aug

    def _partner_image(self, url: str, partner: str):
        from reinforge.readers.imagenet_plus import index_shard
        if self._partners is None or self._partners[0] != url:
            self._partners = (url, dict(index_shard(url)))
        members = self._partners[1].get(partner)
        if members is None:
            raise SchemaError(f"mixing partner {partner!r} is not in {url}")
        data = {}
        with fsspec.open(url, "rb") as f:
            for ext, (offset, size) in members.items():
                if ext == META_MEMBER or ext in IMAGE_EXTENSIONS:
                    f.seek(offset)
                    data[ext] = f.read(size)
        image = next((data[e] for e in IMAGE_EXTENSIONS if e in data), None)
        if image is None or json.loads(data.get(META_MEMBER, b"{}")).get("sha256") != sha256_hex(image):
            raise SchemaError(f"mixing partner {partner}: no image, or its sha256 does not match")
        return decode_rgb(image)

    def _imagenet_plus(self, row: dict) -> list[dict]:
        sample = decode_sample(row)
        num_classes = self.config.get("num_classes", self.config.get("reinforce", {}).get("num_classes"))
        if sample.meta.get("sha256") != sha256_hex(sample.image):
            raise SchemaError(f"sample {sample.key}: sha256 in {META_MEMBER!r} does not match the image bytes")
        image = decode_rgb(sample.image)
        augmenter = self._augmenter()
        rng = random.Random(entry_seed(self.seed, sample.key, self.epoch, "imagenet_plus"))
        plain = rng.random() < self.p_plain
        j = rng.randrange(sample.num_augmentations) if self.mode == "random" else self.epoch % sample.num_augmentations
        if plain:
            view = augmenter.plain(image).float()
            target = np.eye(num_classes, dtype=np.float32)[sample.label]
            j = -1
        else:
            entry = sample.entries[j]
            partner = entry[0] if augmenter.uses_partner and isinstance(entry, list) else None
            partner_image = self._partner_image(row["__url__"], partner) if partner is not None else None
            view = augmenter.apply(entry, image, partner_image)
            target = densify(sample.values[j], sample.ids[j], num_classes).numpy()
        return [{"__key__": sample.key, "image": view.numpy(), "target": target, "label": sample.label,
                 "aug_index": j}]
