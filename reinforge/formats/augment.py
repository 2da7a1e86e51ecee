"""Replayable image augmentations: the entry format of FORMATS.md section 1.

An `Augmenter` is built from an ml-dr style `image_augmentation` dict. `sample()` draws one entry
(a plain JSON list) from a caller-owned `random.Random`; `apply()` replays an entry on the decoded
image. Generation and replay share the same apply code, so a stored entry reproduces the tensor the
teachers saw bit for bit (same library versions).

What a replay computes is defined by the consumers' trainers (FORMATS §1): Apple's ml-dr and
ml-mobileclip (`dr/transforms.py`) rebuild each view with torchvision's functional API on the PIL
image, then `to_tensor`, erase, normalise, mix. The `pil` backend makes exactly those calls with the
same arguments; the `tensor` backend renders geometry and RandAugment on uint8 tensors instead (the
same parameters give pixels up to 9/255 apart, more after Solarize/Equalize), for reinforge's own
reader and GPU augmentation. A run records its backend; the teachers score the backend's view.

Transforms always run in augment_config.TRANSFORM_ORDER, whatever order the config lists them in:
geometry and RandAugment on the image, then float [0, 1], random erasing, normalisation, and finally
MixUp or CutMix with a partner image that went through the same pipeline with its own parameters.
The config's validation lives in augment_config.py, each transform in augment_transforms.py.

Nothing here touches the global torch / Python / NumPy random state.
"""
from __future__ import annotations

import copy
import numbers
import random
import sys
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from reinforge.formats.augment_config import MIXING, VIEW_SLOTS, is_int, normalise_config
from reinforge.formats.augment_transforms import (APPLIERS, MIXERS, SAMPLERS, SHAPES, apply_normalize, apply_to_tensor,
                                                  hw_of, image_hw)
from reinforge.formats.image import pixel_limit

BACKENDS = ("pil", "tensor")  # see the module docstring


def _check_hw(name: str, hw: Any) -> tuple[int, int]:
    if not (isinstance(hw, (list, tuple)) and len(hw) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in hw)):
        raise ValueError(f"{name} must be (height, width) of positive ints, got {hw!r}")
    return int(hw[0]), int(hw[1])


def _check_partner_id(partner: Any) -> None:
    if not (isinstance(partner, str) or is_int(partner)):
        raise ValueError(f"partner id must be a key (str) or a dataset index (int), got {partner!r}")


class Augmenter:
    """Draws and replays augmentation entries for one `image_augmentation` config, rendering views
    with one backend: "pil" (the reference trainers' own computation) or "tensor"."""

    def __init__(self, image_augmentation: dict, backend: str = "pil"):
        if backend not in BACKENDS:
            raise ValueError(f"replay backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.backend = backend
        self._config = normalise_config(image_augmentation)
        self._pipeline = tuple(k for k in self._config if k not in MIXING)
        self._view_slots = tuple(k for k in VIEW_SLOTS if k in self._config)
        self._mix_slots = tuple(k for k in MIXING if k in self._config)
        self._entry_len = int(self.uses_partner) + len(self._view_slots) + len(self._mix_slots)

    def __repr__(self) -> str:
        return f"Augmenter({self._config!r}, backend={self.backend!r})"

    @property
    def uses_partner(self) -> bool:
        return bool(self._mix_slots)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every view when the config fixes it: the last crop, or a resize to [h, w]."""
        for key in ("random_resized_crop", "random_crop", "center_crop"):
            if key in self._config:
                return hw_of(self._config[key]["size"])
        size = self._config.get("resize", {}).get("size")
        return tuple(size) if isinstance(size, list) else None

    def config(self) -> dict:
        return copy.deepcopy(self._config)

    def layout(self) -> list[str]:
        """Slot names of an entry, in order (for messages and documentation)."""
        return (["partner"] if self.uses_partner else []) + list(self._view_slots) + list(self._mix_slots)

    # -- drawing -------------------------------------------------------------------------------

    def _sample_view(self, rng: random.Random, hw: tuple[int, int]) -> tuple[dict, tuple[int, int]]:
        """Draw every per-view slot, tracking the image size through the pipeline."""
        slots = {}
        for key in self._pipeline:
            cfg = self._config[key]
            if key in SAMPLERS:
                slots[key] = SAMPLERS[key](cfg, rng, hw)
            if key in SHAPES:
                hw = SHAPES[key](cfg, hw)
        return slots, hw

    def _draw_mixing(self, rng: random.Random) -> str | None:
        """At most one of mixup / cutmix per entry: pick one (0.5 each if both), then apply its p."""
        name = self._mix_slots[0]
        if len(self._mix_slots) == 2 and rng.random() >= 0.5:
            name = self._mix_slots[1]
        return name if rng.random() < self._config[name]["p"] else None

    def sample(self, rng: random.Random, image_hw: tuple[int, int], partner: str | int | None = None,
               partner_hw: tuple[int, int] | None = None) -> list:
        if not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
        hw = _check_hw("image_hw", image_hw)
        mixing = None
        if self.uses_partner:
            if partner is None or partner_hw is None:
                raise ValueError("this config mixes images (mixup/cutmix): pass partner and partner_hw")
            _check_partner_id(partner)
            partner_hw = _check_hw("partner_hw", partner_hw)
            mixing = self._draw_mixing(rng)

        own, out_hw = self._sample_view(rng, hw)
        if mixing is None:
            head = [None] if self.uses_partner else []
            return head + [own[k] for k in self._view_slots] + [None] * len(self._mix_slots)

        other, other_hw = self._sample_view(rng, partner_hw)
        if other_hw != out_hw:
            raise ValueError(f"{mixing} needs views of one size, got {out_hw} and partner {other_hw}; "
                             f"configure a crop to a fixed size")
        mix_slot = SAMPLERS[mixing](self._config[mixing], rng, out_hw)
        return ([partner] + [[own[k], other[k]] for k in self._view_slots]
                + [mix_slot if k == mixing else None for k in self._mix_slots])

    # -- replay --------------------------------------------------------------------------------

    def _unpack(self, entry: Any) -> tuple[Any, dict, dict | None, dict]:
        """Split an entry into (partner id, own slots, partner slots, mixing slots), checking shape."""
        if not isinstance(entry, (list, tuple)):
            raise ValueError(f"an entry must be a list, got {type(entry).__name__}")
        if len(entry) != self._entry_len:
            raise ValueError(f"entry has {len(entry)} slots but this config expects {self._entry_len}: "
                             f"{self.layout()}")
        start = int(self.uses_partner)
        partner = entry[0] if self.uses_partner else None
        views = entry[start:start + len(self._view_slots)]
        mix = dict(zip(self._mix_slots, entry[start + len(self._view_slots):]))
        if partner is None:
            if any(v is not None for v in mix.values()):
                raise ValueError("entry has a mixing slot set but no partner in slot 0")
            return None, dict(zip(self._view_slots, views)), None, mix
        _check_partner_id(partner)
        if all(v is None for v in mix.values()):
            raise ValueError("entry names a partner in slot 0 but neither mixup nor cutmix is set")
        for key, pair in zip(self._view_slots, views):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise ValueError(f"with mixing, the {key} slot must be a [self, partner] pair, got {pair!r}")
        own = {k: pair[0] for k, pair in zip(self._view_slots, views)}
        other = {k: pair[1] for k, pair in zip(self._view_slots, views)}
        return partner, own, other, mix

    def source(self, image: torch.Tensor | Image.Image) -> torch.Tensor | Image.Image:
        """The decoded image (uint8 CHW RGB tensor, or an RGB PIL image) in this backend's form; the
        conversion is lossless, so convert once per image and render many views from it."""
        if isinstance(image, Image.Image):
            if image.mode != "RGB":
                raise ValueError(f"image must be an RGB PIL image, got mode {image.mode}")
            return image if self.backend == "pil" else F.pil_to_tensor(image)
        if not (isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3
                and image.shape[0] == 3):
            raise ValueError(f"image must be a uint8 CHW RGB tensor, got "
                             f"{getattr(image, 'dtype', type(image).__name__)} {tuple(getattr(image, 'shape', ()))}")
        return F.to_pil_image(image) if self.backend == "pil" else image

    def _render(self, image: torch.Tensor | Image.Image, slots: dict) -> torch.Tensor:
        img = self.source(image)
        # PIL checks every crop against its own bomb limit (89.5 MP), whatever a run's max_image_pixels
        # says; the image is decoded already (under that limit), and a crop of it allocates no more
        with pixel_limit(sys.maxsize):
            for key in self._pipeline:
                img = APPLIERS[key](self._config[key], img, slots.get(key))
        return img.contiguous()

    def apply(self, entry: list, image: torch.Tensor | Image.Image,
              partner_image: torch.Tensor | Image.Image | None = None) -> torch.Tensor:
        partner, own, other, mix = self._unpack(entry)
        x = self._render(image, own)
        if partner is None:
            return x  # no mixing fired: a partner image, if given, is not used
        if partner_image is None:
            raise ValueError(f"entry mixes with partner {partner!r}: pass partner_image")
        x2 = self._render(partner_image, other)
        if x2.shape != x.shape:
            raise ValueError(f"mixing needs views of one shape, got {tuple(x.shape)} and {tuple(x2.shape)}")
        for key in self._mix_slots:  # ml-dr order; our own entries set only one of them
            if mix[key] is not None:
                x = MIXERS[key](self._config[key], x, x2, mix[key])
        return x

    def augment(self, rng: random.Random, image: torch.Tensor | Image.Image, partner: str | int | None = None,
                partner_image: torch.Tensor | Image.Image | None = None) -> tuple[list, torch.Tensor]:
        partner_hw = image_hw(partner_image) if partner_image is not None else None
        entry = self.sample(rng, image_hw(image), partner, partner_hw)
        return entry, self.apply(entry, image, partner_image)

    def plain(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        """The un-augmented view: resize to cover the output size (bilinear, antialias), center crop,
        float, normalize. Without a fixed output size the geometry is left as is."""
        image = self.source(image)
        out = self.output_size
        if out is not None:
            H, W = out
            h, w = image_hw(image)
            if H == W:
                size = [H]  # the usual shorter-side resize
            else:
                scale = max(H / h, W / w)
                size = [max(H, int(round(h * scale))), max(W, int(round(w * scale)))]
            image = F.center_crop(F.resize(image, size, InterpolationMode.BILINEAR, antialias=True), [H, W])
        x = apply_to_tensor({}, image, None)
        if "normalize" in self._config:
            x = apply_normalize(self._config["normalize"], x, None)
        return x.contiguous()


def replay_augmenter(reinforce: dict | None, image_augmentation: dict | None = None,
                     backend: str | None = None) -> Augmenter:
    """The Augmenter that replays a run's entries, from its dr_config.json `reinforce` block (either
    argument overrides it). The backend is the one the run recorded; runs written before it was
    recorded rendered on tensors; without any run config, the reference trainers' pil."""
    reinforce = reinforce or {}
    if image_augmentation is None:
        image_augmentation = reinforce.get("image_augmentation")
    if image_augmentation is None:
        raise ValueError("no augmentation config: pass a run directory (dr_config.json) or image_augmentation")
    if backend is None:
        backend = reinforce.get("replay_backend", "tensor" if reinforce else "pil")
    return Augmenter(image_augmentation, backend)
