"""The Hugging Face side of a run's shards: the features its webdataset builder needs to decode every
member (its own inference fails on param_aug's mixed lists), and the dataset card that declares them.
Pure code: the run writes the card (formats/loader_files.py), readers/hf.py reads it back.
"""
from __future__ import annotations

import numpy as np
import yaml

from reinforge.formats.members import INTEGER, TEXT, decode_member, inner_extension

# The extensions Hugging Face's webdataset builder turns into an Image feature (its IMAGE_EXTENSIONS,
# the ones a shard may realistically hold)
HF_IMAGE_EXTENSIONS = ("jpg", "jpeg", "jpe", "jfif", "png", "apng", "webp", "bmp", "dib", "gif", "tif", "tiff",
                       "ppm", "pgm", "pbm", "pnm")


class Unsupported(ValueError):
    """A member whose decoded value has no Hugging Face feature; the card then lets the builder infer."""


def _dtype_name(array) -> str:
    name = str(array.dtype).removeprefix("torch.")
    return "float32" if name == "bfloat16" else np.dtype(name).name  # Arrow has no bfloat16; float32 holds it exactly


def _array_feature(array) -> dict:
    dtype = _dtype_name(array)
    if array.ndim == 0:
        return {"dtype": dtype}
    if array.ndim == 1:
        return {"list": dtype}
    if array.ndim > 5:
        raise Unsupported(f"{array.ndim}-d array")
    # the first axis (augmentations, captions) may differ between samples
    return {"dtype": {f"array{array.ndim}_d": {"shape": [None, *array.shape[1:]], "dtype": dtype}}}


def _value_feature(value) -> dict:
    if isinstance(value, dict):
        return {"struct": [{"name": k, **_value_feature(v)} for k, v in value.items()]}
    if hasattr(value, "ndim") and hasattr(value, "dtype"):
        return _array_feature(value)
    raise Unsupported(type(value).__name__)


def member_feature(ext: str, data: bytes) -> dict:
    """The Hugging Face feature (YAML form, without its name) of one member, as its webdataset builder decodes it."""
    kind = inner_extension(ext)
    if ext.rsplit(".", 1)[-1].lower() in HF_IMAGE_EXTENSIONS:
        return {"dtype": "image"}
    if kind == "json":
        return {"dtype": "json"}  # param_aug mixes lists, bools and numbers: no Arrow struct holds it
    if kind in TEXT:
        return {"dtype": "string"}
    if kind in INTEGER:
        return {"dtype": "int64"}
    if kind in ("npz", "npy", "pth", "pt"):
        return _value_feature(decode_member(ext, data))
    return {"dtype": "binary"}


def hf_features(sample: dict) -> list[dict] | None:
    """Features of a sample's members in member order, then the builder's __key__ and __url__."""
    try:
        members = [{"name": ext, **member_feature(ext, data)} for ext, data in sample.items()
                   if not ext.startswith("__")]
    except Unsupported:
        return None
    return members + [{"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]


def dataset_card(data_files, features: list[dict] | None, samples: int) -> bytes:
    info = {"config_name": "default", **({"features": features} if features else {})}
    meta = {"configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_files}]}],
            "dataset_info": info, "tags": ["webdataset", "reinforge"]}
    body = f"""# reinforge shards

{samples} samples written by reinforge, as WebDataset tars.

```python
from datasets import load_dataset
ds = load_dataset("path/to/this/folder", split="train")   # or streaming=True
```

Images decode to PIL images, npz / pth.gz arrays come out bit for bit (bfloat16 as float32, same values), JSON
members as Python objects through the `Json` feature, whose parser may return a float one unit in the last
place off. To replay stored augmentations use `reinforge.readers.hf.load_run(run)`: the same columns, every
JSON number exactly as stored.
"""
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n{body}".encode()


def card_features(card: str) -> list[dict] | None:
    """The features a dataset card declares (its YAML front matter), or None."""
    if not card.startswith("---\n"):
        return None
    front = card[4:].split("\n---\n", 1)[0]
    info = (yaml.safe_load(front) or {}).get("dataset_info") or {}
    return info.get("features") if isinstance(info, dict) else None
