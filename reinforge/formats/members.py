"""WebDataset member decoding by extension, the convention webdataset, Hugging Face and Ray share
(`.gz` is gunzipped first, then the inner extension decides), but exact and safe: JSON through
Python's own parser (every float exactly as stored), npz without pickles, pth with
`weights_only=True`. Image bytes are returned as they are: a replay needs the exact bytes.
"""
from __future__ import annotations

import gzip
import io
import json

import numpy as np

from reinforge.formats.arrays import load_npz
from reinforge.formats.codecs import CODEC_MEMBER
from reinforge.formats.codecs import decode_member as decode_codec_member

TEXT = ("txt", "text", "transcript")
INTEGER = ("cls", "cls2", "index", "inx", "id")


def inner_extension(ext: str) -> str:
    """The extension that says how a member decodes: `paug.json.gz` -> `json`, `pth.gz` -> `pth`."""
    parts = ext.lower().split(".")
    if parts[-1] == "gz" and len(parts) > 1:
        parts.pop()
    return parts[-1]


def load_pth(data: bytes):
    import torch
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def decode_member(ext: str, data: bytes):
    """One member's value: dict/list for JSON, str for text, int for labels, {name: array} for npz (and
    for a storage codec's qemb.npz: the decoded float32 embeddings),
    the saved object for pth (tensors keep their dtype, bfloat16 included), bytes otherwise."""
    if ext.lower() == CODEC_MEMBER:  # a storage codec's embeddings: decoded to {name: float32 array}
        return decode_codec_member(data)
    if ext.lower().endswith(".gz") or ext.lower() == "gz":
        data = gzip.decompress(data)
    kind = inner_extension(ext)
    if kind == "json":
        return json.loads(data)
    if kind in TEXT:
        return data.decode("utf-8")
    if kind in INTEGER:
        return int(data.decode("ascii").strip())
    if kind == "npz":
        return load_npz(data)
    if kind == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if kind in ("pth", "pt"):
        return load_pth(data)
    return data


def decode_members(sample: dict) -> dict:
    """Every member of a sample decoded; `__key__`, `__url__` and other dunder fields kept as they are."""
    return {k: v if k.startswith("__") or not isinstance(v, bytes) else decode_member(k, v)
            for k, v in sample.items()}
