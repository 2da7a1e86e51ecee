"""Decode the image member and parse the class label of each sample."""
from __future__ import annotations

from reinforge.formats.image import DEFAULT_MAX_PIXELS, decode_rgb, find_image
from reinforge.stages.base import MapStage, SkipSample


class DecodeImage(MapStage):
    name = "decode"

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, threads: int = 1):
        self.max_pixels = max_pixels
        self.threads = threads

    def process(self, sample: dict) -> dict:
        if "__error__" in sample:  # the reader could not read this sample's member(s)
            raise SkipSample(*sample["__error__"])
        found = find_image(sample)
        if found is None:
            raise SkipSample("missing_image", f"no image member among {sorted(k for k in sample if not k.startswith('__'))}")
        sample["image_ext"], sample["image_bytes"] = found
        sample["image"] = decode_rgb(found[1], self.max_pixels)
        return sample


class ParseLabel(MapStage):
    name = "label"

    def __init__(self, num_classes: int, member: str = "cls"):
        self.num_classes = num_classes
        self.member = member

    def process(self, sample: dict) -> dict:
        raw = sample.get(self.member)
        if raw is None:
            raise SkipSample("missing_label", f"no {self.member!r} member")
        try:
            label = int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise SkipSample("bad_label", f"{self.member!r} is not an integer: {raw[:20]!r}") from None
        if not 0 <= label < self.num_classes:
            raise SkipSample("label_out_of_range", f"label {label} outside [0, {self.num_classes})")
        sample["label"] = label
        return sample
