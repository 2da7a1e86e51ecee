"""The last ImageNet+ stage: a finished sample as the WebDataset members of its layout (FORMATS §1)."""
from __future__ import annotations

from reinforge.formats.imagenet_plus import ReinforcedSample, encode_sample
from reinforge.stages.base import MapStage


class EncodeImageNetPlus(MapStage):
    name = "encode"

    def __init__(self, num_classes: int, compress_params: bool = True):
        self.num_classes = num_classes
        self.compress_params = compress_params

    def process(self, sample: dict) -> dict:
        image = sample["image"]
        meta = {"height": int(image.shape[-2]), "width": int(image.shape[-1])}
        if "__source__" in sample:
            meta["source"] = sample["__source__"]
        record = ReinforcedSample(
            key=sample["__key__"], image_ext=sample["image_ext"], image=sample["image_bytes"],
            label=sample["label"], entries=sample["entries"], values=sample["values"], ids=sample["ids"],
            meta=meta)
        return {"__key__": sample["__key__"], "members": encode_sample(record, self.num_classes, self.compress_params)}
