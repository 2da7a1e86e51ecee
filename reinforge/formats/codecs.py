"""Storage codecs for DataCompDR embeddings: fewer bytes per sample than bf16, with a bounded error.

A codec turns a sample's named embedding arrays ({"image_emb": [N, D], "text_emb": [G+S, D], ...}) into
the bytes of one member, `qemb.npz`, and back. The member is an ordinary .npz (arrays.npz_bytes, read with
the bounded arrays.load_npz) holding `__codec__` (the codec's name and parameters as UTF-8 JSON, so a sample
decodes on its own) and the codec's arrays per embedding. Apple's trainer reads only `npz` / `pth.gz`
members: a run written with a codec is for reinforge's readers, and `reinforge export datacompdr` re-expands
it to the standard layout.

Codecs (bench/storage_codecs.py measures them on real embeddings):
- `none`: no codec; the storage format's npz / pth.gz as before (the default, what Apple's trainer reads).
- `quant`: every coordinate rounded to a multiple of an absolute `step` (rows are unit-norm per teacher
  slice, so one step bounds every coordinate's error by step/2, whatever D). Then, losslessly, the
  integers of each array minus their per-column integer mean (the N views of one image, and the captions
  of one image, are strongly correlated, so the residuals are small), zig-zag mapped to unsigned, split
  into byte planes (low bytes, then high bytes) and deflated: the entropy coding. Stored per array as one
  uint8 [2, 1 + rows, D]: row 0 the mean, then the residual rows. `mean_grid` g (a power of two, default 1)
  rounds the mean to a multiple of g steps (row 0 then holds mean / g): the mean row costs fewer bytes and,
  on real features, so do the residuals (a column whose values sit at exactly 0, as pooled ReLU features
  often do, keeps them at 0 when its mean rounds to 0). Lossless either way: the decoded values do not depend
  on g. bench/storage_codecs.py: g=64 takes the real efficientnet_lite0 set from 0.434x to ~0.37x of bf16.
- `int8_row`: each row scaled by its own max |value| / 127 to int8 (float32 scale per row), deflated.
"""
from __future__ import annotations

import json
import math

import numpy as np

from reinforge.formats.arrays import load_npz, npz_bytes
from reinforge.formats.limits import SchemaError

CODEC_MEMBER = "qemb.npz"
HEADER = "__codec__"
NONE = "none"


class CodecError(SchemaError):
    """A `qemb.npz` member that this codec cannot decode (bad header, missing or misshapen arrays)."""


def _zigzag(q: np.ndarray) -> np.ndarray:
    """Signed ints -> unsigned, small magnitudes to small codes: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..."""
    q = q.astype(np.int32)
    return ((q << 1) ^ (q >> 31)).astype(np.uint16)


def _unzigzag(u: np.ndarray) -> np.ndarray:
    u = u.astype(np.int32)
    return (u >> 1) ^ -(u & 1)


def _planes(codes: np.ndarray) -> np.ndarray:
    """uint16 codes -> [2, rows, D] uint8: low bytes, then high bytes (mostly zero, deflates to little)."""
    little = codes.astype("<u2")
    return np.stack([(little & 0xFF).astype(np.uint8), (little >> 8).astype(np.uint8)])


def _unplanes(planes: np.ndarray) -> np.ndarray:
    return planes[0].astype(np.uint16) | (planes[1].astype(np.uint16) << 8)


class Codec:
    """Encode/decode the named float arrays of one sample. `params()` is everything a reader needs."""

    name: str = ""

    def params(self) -> dict:
        return {}

    def describe(self) -> dict:
        return {"codec": self.name, **self.params()}

    def encode_arrays(self, name: str, array: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def encode(self, arrays: dict[str, np.ndarray]) -> bytes:
        """Bytes of the `qemb.npz` member; equal arrays give equal bytes."""
        out = {HEADER: np.frombuffer(json.dumps(self.describe(), sort_keys=True).encode(), np.uint8)}
        for name, array in arrays.items():
            array = np.asarray(array)
            if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
                raise ValueError(f"codec {self.name}: {name} must be a 2-d array of finite floats")
            if "." in name or name == HEADER:
                raise ValueError(f"codec {self.name}: array name {name!r} is not allowed")
            for part, value in self.encode_arrays(name, array).items():
                out[f"{name}.{part}" if part else name] = value
        return npz_bytes(out)

    def decode(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """float32 arrays from a loaded member (its arrays, header included)."""
        grouped: dict[str, dict[str, np.ndarray]] = {}
        for key, value in arrays.items():
            if key == HEADER:
                continue
            name, _, part = key.partition(".")
            grouped.setdefault(name, {})[part] = value
        return {name: self.decode_arrays(name, parts) for name, parts in grouped.items()}


class Quant(Codec):
    """Absolute-step quantisation, per-column integer mean removed, byte planes, deflate."""

    name = "quant"
    MIN_STEP = 2.0 ** -13  # |x| <= 1 per unit-norm slice: residuals (|q - mean| <= 2/step) fit 15 bits

    # 2^-11: the coarsest power of two whose KD targets stay within 1e-4 nats of float32 on every set of
    # bench/storage_codecs.py (real efficientnet_lite0 views 2.6e-5, MiniLM captions 2.1e-5, random-init
    # CLIP 7.2e-5; bf16 itself 1.0-2.3e-5); 2^-10 passes 1e-4 on two of the three
    DEFAULT_STEP = 2.0 ** -11

    MAX_MEAN_GRID = 1 << 12  # residuals stay within +-(2^14 + 2^11): zig-zag codes fit 16 bits

    def __init__(self, step: float = DEFAULT_STEP, mean_grid: int = 1):
        if not (isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step)
                and self.MIN_STEP <= step <= 0.5):
            raise ValueError(f"codec quant: step must be a number in [{self.MIN_STEP:g}, 0.5], got {step!r}")
        if not (isinstance(mean_grid, int) and not isinstance(mean_grid, bool) and 1 <= mean_grid <= self.MAX_MEAN_GRID
                and mean_grid & (mean_grid - 1) == 0):
            raise ValueError(f"codec quant: mean_grid must be a power of two in [1, {self.MAX_MEAN_GRID}], "
                             f"got {mean_grid!r}")
        self.step, self.mean_grid = float(step), mean_grid

    def params(self) -> dict:
        # mean_grid 1 is left out: members written before it existed keep their bytes and header
        return {"step": self.step, **({"mean_grid": self.mean_grid} if self.mean_grid != 1 else {})}

    def encode_arrays(self, name: str, array: np.ndarray) -> dict[str, np.ndarray]:
        if array.size and float(np.abs(array).max()) > 1.0 + 1e-3:
            raise ValueError(f"codec quant: {name} has |values| > 1; it stores unit-norm rows (per teacher slice)")
        q = np.rint(array.astype(np.float64) / self.step).astype(np.int32)
        mean = np.rint(q.mean(axis=0, dtype=np.float64) / self.mean_grid).astype(np.int32) if q.shape[0] else \
            np.zeros(q.shape[1], np.int32)
        # one zip entry per array (each costs ~200 B of headers): row 0 the mean (in grid units), then the residuals
        return {"": _planes(_zigzag(np.concatenate([mean[None], q - mean * self.mean_grid])))}

    def decode_arrays(self, name: str, parts: dict[str, np.ndarray]) -> np.ndarray:
        planes = parts.get("")
        if set(parts) != {""} or planes.ndim != 3 or planes.shape[0] != 2 or planes.shape[1] < 1 \
                or planes.dtype != np.uint8:
            raise CodecError(f"{CODEC_MEMBER}: {name}: expected one uint8 array [2, 1 + rows, D]")
        codes = _unzigzag(_unplanes(planes))
        q = codes[1:] + codes[0] * self.mean_grid
        return (q * np.float32(self.step)).astype(np.float32)


class Int8Row(Codec):
    """Per-row absmax scaling to int8."""

    name = "int8_row"

    def encode_arrays(self, name: str, array: np.ndarray) -> dict[str, np.ndarray]:
        array = array.astype(np.float32)
        scale = (np.abs(array).max(axis=1) / 127).astype(np.float32)
        safe = np.where(scale > 0, scale, 1).astype(np.float32)
        return {"q": np.rint(array / safe[:, None]).astype(np.int8), "scale": scale}

    def decode_arrays(self, name: str, parts: dict[str, np.ndarray]) -> np.ndarray:
        q, scale = parts.get("q"), parts.get("scale")
        if q is None or scale is None or q.ndim != 2 or scale.shape != (q.shape[0],) or q.dtype != np.int8 \
                or scale.dtype != np.float32:
            raise CodecError(f"{CODEC_MEMBER}: {name}: expected q int8 [rows, D] and scale float32 [rows]")
        return q.astype(np.float32) * scale[:, None]


CODECS: dict[str, type[Codec]] = {Quant.name: Quant, Int8Row.name: Int8Row}


def make_codec(name: str, params: dict | None = None) -> Codec:
    """The codec `name` with `params`; ValueError naming what is wrong."""
    if name not in CODECS:
        raise ValueError(f"unknown storage codec {name!r}; known: {sorted([NONE, *CODECS])}")
    params = dict(params or {})
    try:
        return CODECS[name](**params)
    except TypeError:
        raise ValueError(f"codec {name}: unknown parameter(s) {sorted(params)}") from None


def codec_from_header(arrays: dict[str, np.ndarray]) -> Codec:
    header = arrays.get(HEADER)
    if header is None or header.dtype != np.uint8 or header.ndim != 1:
        raise CodecError(f"{CODEC_MEMBER}: no {HEADER} header")
    try:
        spec = json.loads(header.tobytes().decode("utf-8"))
        name = spec.pop("codec")
        return make_codec(name, spec)
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise CodecError(f"{CODEC_MEMBER}: bad {HEADER} header: {exc}") from None


def decode_member(data: bytes, limit: int | None = None) -> dict[str, np.ndarray]:
    """float32 arrays of a `qemb.npz` member, whichever codec wrote it (its header says)."""
    arrays = load_npz(data, limit)
    return codec_from_header(arrays).decode(arrays)
