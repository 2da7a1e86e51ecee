"""The last DataCompDR / DFNDR stage: a finished sample as the WebDataset members of its layout (FORMATS §2)."""
from __future__ import annotations

import numpy as np

from reinforge.stages.base import MapStage


class EncodeDataCompDR(MapStage):
    """DataCompDR / DFNDR members (FORMATS §2). Captions-only runs (no teachers) write the image,
    caption, syn.json and json, ready for a later embeddings-only run."""

    name = "encode"

    def __init__(self, storage, keep_images: bool = True, with_embeddings: bool = True):
        self.storage = storage  # reinforge.formats.datacomp_dr.StorageSpec
        self.keep_images = keep_images
        self.with_embeddings = with_embeddings

    def versions(self) -> dict:
        """A storage codec (and its parameters) is recorded in every task manifest; none records nothing."""
        codec = self.storage.encoder() if self.with_embeddings else None
        return {"storage_codec": codec.describe()} if codec is not None else {}

    def process(self, sample: dict) -> dict:
        from reinforge.formats.datacomp_dr import DRSample, encode_dr_sample
        from reinforge.formats.imagenet_plus import dumps_compact, sha256_hex
        uid, image = sample["__key__"], sample["image_bytes"]
        if not self.with_embeddings:
            members = {}
            if sample.get("url"):
                members["url.txt"] = sample["url"].encode()
            members[sample["image_ext"]] = image
            members["txt"] = sample["caption"].encode()
            members["syn.json"] = dumps_compact(sample["syn"])
            members["json"] = dumps_compact({"uid": uid, "sha256": sha256_hex(image)})
            return {"__key__": uid, "members": members}
        record = DRSample(
            uid=uid, image_ext=sample["image_ext"] if self.keep_images else None,
            image=image if self.keep_images else None,
            caption=sample.get("caption") if self.keep_images else None, url=sample.get("url"),
            syn=sample["syn"], entries=sample["entries"], image_emb=_numpy(sample["image_emb"]),
            text_emb=_numpy(sample["text_emb"]), syn_emb={k: _numpy(v) for k, v in sample["syn_emb"].items()},
            meta={})
        return {"__key__": uid, "members": encode_dr_sample(record, self.storage, sha256=sha256_hex(image))}


def _numpy(array) -> "np.ndarray":
    return array.float().numpy() if hasattr(array, "numpy") else np.asarray(array, dtype=np.float32)
