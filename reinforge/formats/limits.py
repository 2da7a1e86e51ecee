"""Bounds on what one sample may hold once read or decompressed, derived from what a run declares
(max_image_pixels, N augmentations, top-k, embedding dims, captions) plus slack.

Shards are untrusted input: a 2 MB member can inflate to gigabytes (gzip, a compressed npz, a
.tar.gz shard), and an .npy header can claim any shape. Every reader checks a size against its bound
*before* allocating it: tar members by their header size, gzip by a bounded inflate, npz arrays by
their .npy header (shape x dtype). Over the bound is MemberTooLarge, a SchemaError whose reason
`member_too_large` stages and readers count as a skipped sample.
"""
from __future__ import annotations

import gzip
import io
import zlib
from dataclasses import dataclass

from reinforge.formats.image import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS

SLACK = 1 << 20  # 1 MiB over every bound: headers, metadata, rounding
BYTES_PER_PIXEL = 8  # the largest plain encoding of an image within max_pixels: 16-bit RGBA
ENTRY_BYTES = 1024  # one param_aug entry as JSON: ~300 B with mixing pairs and a partner key
ELEMENT_BYTES = 8  # per stored number: float64 / int64 at most, whatever the writer chose
TEXT_ROWS = 8  # ground-truth caption rows per DataCompDR sample (1 in every release)
# What a shard of undeclared shape may hold: above every released set (ImageNet+ Flowers-102 N=8000,
# DataCompDR N=30, D=1536, S=5) without being unbounded.
DEFAULT_AUGMENTATIONS, DEFAULT_TOPK = 10_000, 1_000
DEFAULT_DR_AUGMENTATIONS, DEFAULT_DIM, DEFAULT_CAPTIONS = 1_000, 4_096, 64
ARRAY_MEMBERS = ("npz", "prob.npz", "pth.gz", "qemb.npz")  # qemb.npz: formats.codecs
PARAMS_MEMBERS = ("paug.json", "paug.json.gz")
TEXT_MEMBERS = ("cls", "txt", "json", "url.txt", "syn.json")  # a label, captions, metadata: never megabytes


class SchemaError(ValueError):
    """A stored sample does not follow its layout. `reason` is the code counters use."""

    reason = "schema"

    def __init__(self, message: str = "", reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class MemberTooLarge(SchemaError):
    """A member would read or inflate past its bound; nothing that size was allocated."""

    reason = "member_too_large"


@dataclass(frozen=True)
class Limits:
    """Byte bounds for the members of one sample."""

    image: int  # one image member
    params: int  # the paug JSON, decompressed
    arrays: int  # all arrays of one npz / pth.gz member together, decompressed

    @property
    def member(self) -> int:
        """Any one tar member of a kind not known below."""
        return max(self.image, self.params, self.arrays) + SLACK

    def bound(self, ext: str) -> int:
        """The most one tar member with this extension may hold (compressed members: their bound
        decompressed, plus slack, since deflate can only grow incompressible data by a little)."""
        if ext in IMAGE_EXTENSIONS:
            return self.image
        if ext in ARRAY_MEMBERS:
            return self.arrays + SLACK
        if ext in PARAMS_MEMBERS:
            return self.params + SLACK
        if ext in TEXT_MEMBERS:
            return SLACK
        return self.member

    @property
    def sample(self) -> int:
        """All members of one sample together."""
        return self.image + self.params + self.arrays + 2 * SLACK

    @classmethod
    def for_images(cls, max_pixels: int = DEFAULT_MAX_PIXELS) -> "Limits":
        """Input shards: an image plus small text members."""
        return cls(image_bytes(max_pixels), SLACK, SLACK)

    @classmethod
    def for_imagenet_plus(cls, num_samples: int, topk: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> "Limits":
        # prob.npz: values and ids, [N, k] each
        return cls(image_bytes(max_pixels), num_samples * ENTRY_BYTES + SLACK,
                   2 * num_samples * topk * ELEMENT_BYTES + SLACK)

    @classmethod
    def for_datacomp_dr(cls, num_samples: int, dim: int, captions: int,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> "Limits":
        # image_emb [N, D], text_emb [G (+S), D], <syn_key>_emb [S, D]
        rows = num_samples + TEXT_ROWS + captions
        return cls(image_bytes(max_pixels), num_samples * ENTRY_BYTES + SLACK, rows * dim * ELEMENT_BYTES + SLACK)

    @classmethod
    def default(cls, max_pixels: int = DEFAULT_MAX_PIXELS) -> "Limits":
        """For shards whose run declares nothing: room for either product at the defaults above."""
        return widest(cls.for_imagenet_plus(DEFAULT_AUGMENTATIONS, DEFAULT_TOPK, max_pixels),
                      cls.for_datacomp_dr(DEFAULT_DR_AUGMENTATIONS, DEFAULT_DIM, DEFAULT_CAPTIONS, max_pixels))


def widest(*limits: Limits) -> Limits:
    return Limits(max(x.image for x in limits), max(x.params for x in limits), max(x.arrays for x in limits))


def image_bytes(max_pixels: int) -> int:
    return max_pixels * BYTES_PER_PIXEL + SLACK


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def declared_limits(config: dict | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Limits:
    """Limits from a run's trainer config (dr_config.json of either product, or Apple's): what it
    declares, the defaults for what it does not."""
    config = config if isinstance(config, dict) else {}
    reinforce = config.get("reinforce") if isinstance(config.get("reinforce"), dict) else {}
    n = _count(reinforce.get("num_samples")) or _count(config.get("num_samples"))
    topk = _count(reinforce.get("topk"))
    dims = config.get("teacher_dims")
    dim = _count(config.get("embedding_dim")) or (
        _count(sum(dims)) if isinstance(dims, list) and all(_count(d) for d in dims) else None)
    captioners = config.get("captioners") if isinstance(config.get("captioners"), list) else []
    captions = sum(_count(c.get("num_captions")) or 0 for c in captioners if isinstance(c, dict))
    if topk is not None:
        return Limits.for_imagenet_plus(n or DEFAULT_AUGMENTATIONS, topk, max_pixels)
    if dim is not None or "teachers" in config:
        return Limits.for_datacomp_dr(n or DEFAULT_DR_AUGMENTATIONS, dim or DEFAULT_DIM,
                                      captions or DEFAULT_CAPTIONS, max_pixels)
    if n is not None:  # e.g. Apple's DataCompDR config: N, no dims
        return widest(Limits.for_imagenet_plus(n, DEFAULT_TOPK, max_pixels),
                      Limits.for_datacomp_dr(n, DEFAULT_DIM, DEFAULT_CAPTIONS, max_pixels))
    return Limits.default(max_pixels)


def too_large(what: str, size: int, limit: int) -> MemberTooLarge:
    return MemberTooLarge(f"{what}: {size} bytes, over its bound of {limit} bytes")


def gunzip(data: bytes, limit: int, what: str) -> bytes:
    """gzip.decompress that inflates at most limit + 1 bytes: MemberTooLarge past the bound."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            out = f.read(limit + 1)  # GzipFile inflates in bounded steps up to the size asked
    except (OSError, EOFError, zlib.error) as exc:
        raise SchemaError(f"{what}: not gzip: {exc}") from None
    if len(out) > limit:
        raise MemberTooLarge(f"{what}: inflates past its bound of {limit} bytes")
    return out
