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

Transforms always run in TRANSFORM_ORDER, whatever order the config lists them in:
geometry and RandAugment on the image, then float [0, 1], random erasing, normalisation, and finally
MixUp or CutMix with a partner image that went through the same pipeline with its own parameters.

Nothing here touches the global torch / Python / NumPy random state.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import math
import numbers
import random
import sys
from collections.abc import Mapping
from typing import Any, Callable

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import RandAugment as _TorchvisionRandAugment
from torchvision.transforms import functional as F
from torchvision.transforms.autoaugment import _apply_op

from reinforge.formats.image import pixel_limit

TRANSFORM_ORDER: tuple[str, ...] = (
    "uint8", "resize", "center_crop", "random_crop", "random_resized_crop", "random_horizontal_flip",
    "rand_augment", "to_tensor", "random_erase", "normalize", "mixup", "cutmix",
)
# Index into this tuple is the `op` stored in a rand_augment slot (torchvision's own order).
RAND_AUGMENT_OPS: tuple[str, ...] = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)

IMPLICIT = ("uint8", "to_tensor")  # always applied; accepted in a config for ml-dr compatibility
MIXING = ("mixup", "cutmix")
# Every transform but the parameter-free ones has a slot, as ml-dr's Compose.compress writes it:
# resize too (it stores its fixed size, which replay ignores).
VIEW_SLOTS = ("resize", "random_crop", "random_resized_crop", "random_horizontal_flip", "rand_augment",
              "random_erase")
BACKENDS = ("pil", "tensor")  # see the module docstring

_INTERPOLATION = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}
_REQUIRED = object()
# Field defaults per transform, as torchvision / ml-dr define them.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "uint8": {},
    "resize": {"size": _REQUIRED, "interpolation": "bilinear"},
    "center_crop": {"size": _REQUIRED},
    "random_crop": {"size": _REQUIRED, "padding": 0},
    "random_resized_crop": {"size": _REQUIRED, "scale": [0.08, 1.0], "ratio": [3.0 / 4.0, 4.0 / 3.0],
                            "interpolation": "bilinear"},
    "random_horizontal_flip": {"p": 0.5},
    "rand_augment": {"p": 1.0, "num_ops": 2, "magnitude": 9, "num_magnitude_bins": 31, "interpolation": "nearest"},
    "to_tensor": {},
    "random_erase": {"p": 0.5, "scale": [0.02, 0.33], "ratio": [0.3, 3.3], "value": 0},
    "normalize": {"mean": _REQUIRED, "std": _REQUIRED},
    "mixup": {"alpha": 1.0, "p": 1.0, "div_by": 1.0},
    "cutmix": {"alpha": 1.0, "p": 1.0},
}
assert tuple(_DEFAULTS) == TRANSFORM_ORDER


# ---------------------------------------------------------------------------------------------
# Config validation. Every message starts with "image_augmentation.<key>" so users find the field.

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad(where: str, message: str) -> ValueError:
    return ValueError(f"image_augmentation.{where}: {message}")


def _check_size(where: str, v: Any) -> int | list[int]:
    if isinstance(v, (list, tuple)) and len(v) == 1:
        v = v[0]
    if _is_int(v) and v > 0:
        return v
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v):
        return [int(v[0]), int(v[1])]
    raise _bad(where, f"size must be a positive int or [height, width], got {v!r}")


def _check_prob(where: str, v: Any) -> float:
    if not (_is_number(v) and 0.0 <= v <= 1.0):
        raise _bad(where, f"must be a probability in [0, 1], got {v!r}")
    return float(v)


def _check_pair(where: str, v: Any, low: float, high: float, low_open: bool = False) -> list[float]:
    ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) for x in v)
    if ok:
        a, b = float(v[0]), float(v[1])
        ok = (a > low if low_open else a >= low) and a <= b <= high and b > 0
    if not ok:
        raise _bad(where, f"must be [min, max] with {low} {'<' if low_open else '<='} min <= max <= {high}, "
                          f"got {v!r}")
    return [a, b]


def _check_interpolation(where: str, v: Any, allowed=tuple(_INTERPOLATION)) -> str:
    if v not in allowed:
        raise _bad(where, f"interpolation must be one of {list(allowed)}, got {v!r}")
    return v


def _check_int(where: str, v: Any, low: int) -> int:
    if not (_is_int(v) and v >= low):
        raise _bad(where, f"must be an int >= {low}, got {v!r}")
    return v


def _check_rgb(where: str, v: Any, positive: bool) -> list[float]:
    if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_number(x) for x in v)
            and (not positive or all(x > 0 for x in v))):
        raise _bad(where, f"must be 3 {'positive ' if positive else ''}numbers (RGB), got {v!r}")
    return [float(x) for x in v]


def _check_positive(where: str, v: Any, low: float = 0.0, inclusive: bool = False) -> float:
    if not (_is_number(v) and (v >= low if inclusive else v > low)):
        raise _bad(where, f"must be a number {'>=' if inclusive else '>'} {low}, got {v!r}")
    return float(v)


def _check_fields(key: str, cfg: dict) -> dict:
    """Validate one enabled transform's fields and return them with defaults filled, JSON-safe."""
    out = {}
    for field, default in _DEFAULTS[key].items():
        if field not in cfg:
            if default is _REQUIRED:
                raise _bad(f"{key}.{field}", "is required")
            out[field] = copy.deepcopy(default)
            continue
        v, where = cfg[field], f"{key}.{field}"
        if field == "size":
            out[field] = _check_size(where, v)
        elif field == "interpolation":
            # RandAugment's affine ops on tensors support only nearest and bilinear
            allowed = ("nearest", "bilinear") if key == "rand_augment" else tuple(_INTERPOLATION)
            out[field] = _check_interpolation(where, v, allowed)
        elif field == "p":
            out[field] = _check_prob(where, v)
        elif field == "scale":
            out[field] = _check_pair(where, v, 0.0, 1.0)
        elif field == "ratio":
            out[field] = _check_pair(where, v, 0.0, math.inf, low_open=True)
        elif field == "padding":
            out[field] = _check_int(where, v, 0)
        elif field == "num_ops":
            out[field] = _check_int(where, v, 1)
        elif field == "magnitude":
            out[field] = _check_int(where, v, 0)
        elif field == "num_magnitude_bins":
            out[field] = _check_int(where, v, 2)
        elif field in ("mean", "std"):
            out[field] = _check_rgb(where, v, positive=field == "std")
        elif field == "alpha":
            out[field] = _check_positive(where, v)
        elif field == "div_by":
            out[field] = _check_positive(where, v, 1.0, inclusive=True)
        elif field == "value":
            # ml-dr's replay zeroes the box whatever RandomErasing's value says
            if not (_is_number(v) and v == 0):
                raise _bad(where, f"must be 0 (the reference trainers always erase with 0), got {v!r}")
            out[field] = 0
        else:  # pragma: no cover - every default field has a check above
            raise AssertionError(field)
    if key == "rand_augment" and out["magnitude"] >= out["num_magnitude_bins"]:
        raise _bad(f"{key}.magnitude", f"{out['magnitude']} must be < num_magnitude_bins={out['num_magnitude_bins']}")
    return out


def _normalise_config(image_augmentation: Any) -> dict[str, dict]:
    if not isinstance(image_augmentation, Mapping):
        raise ValueError(f"image_augmentation must be a dict, got {type(image_augmentation).__name__}")
    enabled = {}
    for key, cfg in image_augmentation.items():
        if key not in _DEFAULTS:
            raise _bad(str(key), f"unknown transform {key!r}; known: {list(TRANSFORM_ORDER)}")
        cfg = {} if cfg is None else cfg  # YAML `to_tensor:` with no body
        if not isinstance(cfg, Mapping):
            raise _bad(key, f"must be a dict of fields, got {cfg!r}")
        unknown = sorted(set(cfg) - set(_DEFAULTS[key]) - {"enable"})
        if unknown:
            raise _bad(f"{key}.{unknown[0]}", f"unknown field(s) {unknown} for {key!r}; "
                                              f"known: {sorted(_DEFAULTS[key]) + ['enable']}")
        enable = cfg.get("enable", True)
        if not isinstance(enable, bool):
            raise _bad(f"{key}.enable", f"must be true or false, got {enable!r}")
        if enable:
            enabled[key] = _check_fields(key, {k: v for k, v in cfg.items() if k != "enable"})
    for key in IMPLICIT:
        enabled.setdefault(key, {})
    return {key: enabled[key] for key in TRANSFORM_ORDER if key in enabled}


# ---------------------------------------------------------------------------------------------
# Helpers shared by the transforms.

def _hw_of(size: int | list[int]) -> tuple[int, int]:
    """(height, width) of a crop size; an int means a square."""
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def _ints(name: str, slot: Any, n: int) -> list[int]:
    if not (isinstance(slot, (list, tuple)) and len(slot) == n and all(_is_int(v) for v in slot)):
        raise ValueError(f"{name} slot must be a list of {n} ints, got {slot!r}")
    return list(slot)


def _check_box(name: str, hw: tuple[int, int], top: int, left: int, height: int, width: int) -> None:
    """A box must lie inside the image: torchvision would pad silently, which corrupts a replay."""
    H, W = hw
    if not (height > 0 and width > 0 and top >= 0 and left >= 0 and top + height <= H and left + width <= W):
        raise ValueError(f"{name} box top={top} left={left} height={height} width={width} falls outside "
                         f"the {H}x{W} image (is this the image the entry was drawn for?)")


def _image_hw(img: torch.Tensor | Image.Image) -> tuple[int, int]:
    _, h, w = F.get_dimensions(img)
    return int(h), int(w)


def _interp(cfg: dict) -> InterpolationMode:
    return _INTERPOLATION[cfg["interpolation"]]


# ---------------------------------------------------------------------------------------------
# One section per transform: how it changes the size, how its slot is drawn, how it is applied.
# Samplers take (cfg, rng, hw) and return the slot; appliers take (cfg, img, slot).

def _resize_hw(cfg: dict, hw: tuple[int, int]) -> tuple[int, int]:
    size = cfg["size"]
    h, w = F._compute_resized_output_size(hw, [size] if isinstance(size, int) else list(size))
    return int(h), int(w)


def _sample_resize(cfg: dict, rng: random.Random, hw: tuple[int, int]) -> int | list[int]:
    return copy.deepcopy(cfg["size"])  # not random: ml-dr stores Resize's size in the entry


def _apply_resize(cfg: dict, img: torch.Tensor, slot: Any) -> torch.Tensor:
    size = cfg["size"]
    return F.resize(img, [size] if isinstance(size, int) else list(size), _interp(cfg), antialias=True)


def _center_crop_hw(cfg: dict, hw: tuple[int, int]) -> tuple[int, int]:
    h, w = _hw_of(cfg["size"])
    if h > hw[0] or w > hw[1]:  # F.center_crop would pad with black
        raise ValueError(f"center_crop {h}x{w} is larger than the {hw[0]}x{hw[1]} image")
    return h, w


def _apply_center_crop(cfg: dict, img: torch.Tensor, slot: None) -> torch.Tensor:
    return F.center_crop(img, list(_center_crop_hw(cfg, _image_hw(img))))


def _padded_hw(cfg: dict, hw: tuple[int, int]) -> tuple[int, int]:
    return hw[0] + 2 * cfg["padding"], hw[1] + 2 * cfg["padding"]


def _sample_random_crop(cfg: dict, rng: random.Random, hw: tuple[int, int]) -> list[int]:
    H, W = _padded_hw(cfg, hw)
    h, w = _hw_of(cfg["size"])
    if h > H or w > W:
        raise ValueError(f"random_crop {h}x{w} is larger than the {H}x{W} (padded) image")
    return [rng.randint(0, H - h), rng.randint(0, W - w)]


def _apply_random_crop(cfg: dict, img: torch.Tensor, slot: Any) -> torch.Tensor:
    top, left = _ints("random_crop", slot, 2)
    if cfg["padding"]:  # explicit, configured padding (torchvision RandomCrop's `padding`)
        img = F.pad(img, [cfg["padding"]], fill=0)
    h, w = _hw_of(cfg["size"])
    _check_box("random_crop", _image_hw(img), top, left, h, w)
    return F.crop(img, top, left, h, w)


def _sample_random_resized_crop(cfg: dict, rng: random.Random, hw: tuple[int, int]) -> list[int]:
    """torchvision RandomResizedCrop.get_params, drawing from `rng`."""
    H, W = hw
    area = H * W
    (s0, s1), (r0, r1) = cfg["scale"], cfg["ratio"]
    log_r0, log_r1 = math.log(r0), math.log(r1)
    for _ in range(10):
        target_area = area * rng.uniform(s0, s1)
        aspect = math.exp(rng.uniform(log_r0, log_r1))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return [rng.randint(0, H - h), rng.randint(0, W - w), h, w]
    # fallback: central crop with the aspect ratio clamped into the allowed range
    in_ratio = W / H
    if in_ratio < r0:
        w, h = W, int(round(W / r0))
    elif in_ratio > r1:
        h, w = H, int(round(H * r1))
    else:
        h, w = H, W
    return [(H - h) // 2, (W - w) // 2, h, w]


def _apply_random_resized_crop(cfg: dict, img: torch.Tensor, slot: Any) -> torch.Tensor:
    top, left, h, w = _ints("random_resized_crop", slot, 4)
    _check_box("random_resized_crop", _image_hw(img), top, left, h, w)
    return F.resized_crop(img, top, left, h, w, list(_hw_of(cfg["size"])), _interp(cfg), antialias=True)


def _sample_random_horizontal_flip(cfg: dict, rng: random.Random, hw: tuple[int, int]) -> bool:
    return rng.random() < cfg["p"]


def _apply_random_horizontal_flip(cfg: dict, img: torch.Tensor, slot: Any) -> torch.Tensor:
    if not isinstance(slot, bool):
        raise ValueError(f"random_horizontal_flip slot must be true or false, got {slot!r}")
    return F.hflip(img) if slot else img


@functools.lru_cache(maxsize=1024)
def _rand_augment_table(num_bins: int, magnitude: int, hw: tuple[int, int]) -> tuple[tuple[float, bool], ...]:
    """(unsigned magnitude, signed) per op for this bin, read from torchvision's own augmentation
    space so the values are torchvision's (translate scales with the current image size)."""
    space = _TorchvisionRandAugment()._augmentation_space(num_bins, hw)
    assert tuple(space) == RAND_AUGMENT_OPS, "torchvision changed its RandAugment op order"
    return tuple((float(m[magnitude].item()) if m.ndim > 0 else 0.0, bool(signed)) for m, signed in space.values())


def _quantise_magnitude(op_name: str, value: float) -> int | float:
    """The exact value to store and apply: it must survive JSON unchanged."""
    if op_name in ("Identity", "AutoContrast", "Equalize"):
        return 0.0
    if op_name in ("TranslateX", "TranslateY", "Posterize"):
        return int(value)  # _apply_op truncates these with int() anyway
    return round(value, 4)


def _sample_rand_augment(cfg: dict, rng: random.Random, hw: tuple[int, int]) -> list | None:
    if not rng.random() < cfg["p"]:
        return None
    table = _rand_augment_table(cfg["num_magnitude_bins"], cfg["magnitude"], hw)
    ops = []
    for _ in range(cfg["num_ops"]):
        op = rng.randrange(len(RAND_AUGMENT_OPS))
        value, signed = table[op]
        if signed and rng.random() < 0.5:
            value = -value
        ops.append([op, _quantise_magnitude(RAND_AUGMENT_OPS[op], value)])
    return ops


def _apply_rand_augment(cfg: dict, img: torch.Tensor, slot: Any) -> torch.Tensor:
    if slot is None:
        return img
    if not (isinstance(slot, (list, tuple)) and len(slot) == cfg["num_ops"]):
        raise ValueError(f"rand_augment slot must be null or {cfg['num_ops']} [op, magnitude] pairs, got {slot!r}")
    for pair in slot:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and _is_int(pair[0])
                and 0 <= pair[0] < len(RAND_AUGMENT_OPS) and _is_number(pair[1])):
            raise ValueError(f"rand_augment op must be [op index 0..{len(RAND_AUGMENT_OPS) - 1}, magnitude], "
                             f"got {pair!r}")
        img = _apply_op(img, RAND_AUGMENT_OPS[pair[0]], float(pair[1]), interpolation=_interp(cfg), fill=None)
    return img


def _apply_to_tensor(cfg: dict, img: torch.Tensor | Image.Image, slot: None) -> torch.Tensor:
    if isinstance(img, Image.Image):
        return F.to_tensor(img)
    return (img / 255.0).to(torch.float32)  # as ml-dr's ToTensor on uint8 tensors: the same float32 values


def _sample_random_erase(cfg: dict, rng: random.Random, hw: tuple[int, int]) -> list[int] | None:
    """torchvision RandomErasing.get_params, drawing from `rng`; None when skipped or when no box
    fits in 10 attempts (torchvision then returns the image unchanged)."""
    if not rng.random() < cfg["p"]:
        return None
    H, W = hw
    area = H * W
    (s0, s1), (r0, r1) = cfg["scale"], cfg["ratio"]
    log_r0, log_r1 = math.log(r0), math.log(r1)
    for _ in range(10):
        erase_area = area * rng.uniform(s0, s1)
        aspect = math.exp(rng.uniform(log_r0, log_r1))
        h = int(round(math.sqrt(erase_area * aspect)))
        w = int(round(math.sqrt(erase_area / aspect)))
        if h < H and w < W:
            return [rng.randint(0, H - h), rng.randint(0, W - w), h, w]
    return None


def _apply_random_erase(cfg: dict, img: torch.Tensor, slot: Any) -> torch.Tensor:
    if slot is None:
        return img
    i, j, h, w = _ints("random_erase", slot, 4)
    _check_box("random_erase", _image_hw(img), i, j, h, w)
    img = img.clone()  # never write into a caller's tensor
    img[:, i:i + h, j:j + w] = 0
    return img


def _apply_normalize(cfg: dict, img: torch.Tensor, slot: None) -> torch.Tensor:
    return F.normalize(img, cfg["mean"], cfg["std"])


def _sample_mixup(cfg: dict, rng: random.Random, hw: tuple[int, int]) -> float:
    # rounded before use so that the stored JSON number is exactly the weight applied
    return round(rng.betavariate(cfg["alpha"], cfg["alpha"]) / cfg["div_by"], 6)


def _apply_mixup(cfg: dict, x: torch.Tensor, x2: torch.Tensor, slot: Any) -> torch.Tensor:
    if not (_is_number(slot) and 0.0 <= slot <= 1.0):
        raise ValueError(f"mixup slot must be a number in [0, 1], got {slot!r}")
    return slot * x + (1.0 - slot) * x2


def _sample_cutmix(cfg: dict, rng: random.Random, hw: tuple[int, int]) -> list:
    """ml-dr's CutMix.rand_bbox: lam ~ Beta(alpha, alpha), box sides sqrt(1 - lam) of the view, a
    uniform centre, clipped. As in ml-dr, x runs along the height (rows x1:x2) and y along the width
    (columns y1:y2), and lam is the Beta draw, not the area actually kept."""
    H, W = hw
    lam = round(rng.betavariate(cfg["alpha"], cfg["alpha"]), 6)
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(H * cut), int(W * cut)
    cx, cy = rng.randrange(H), rng.randrange(W)
    x1, x2 = min(max(cx - cut_h // 2, 0), H), min(max(cx + cut_h // 2, 0), H)
    y1, y2 = min(max(cy - cut_w // 2, 0), W), min(max(cy + cut_w // 2, 0), W)
    return [lam, x1, y1, x2, y2]


def _apply_cutmix(cfg: dict, x: torch.Tensor, x2: torch.Tensor, slot: Any) -> torch.Tensor:
    """Rows x1:x2 and columns y1:y2 come from x2 (ml-dr's `mixed_x[:, bbx1:bbx2, bby1:bby2]`)."""
    if not (isinstance(slot, (list, tuple)) and len(slot) == 5 and _is_number(slot[0])):
        raise ValueError(f"cutmix slot must be [lam, x1, y1, x2, y2], got {slot!r}")
    x1, y1, x2_, y2 = _ints("cutmix box", slot[1:], 4)
    H, W = _image_hw(x)
    if not (0 <= x1 <= x2_ <= H and 0 <= y1 <= y2 <= W):
        raise ValueError(f"cutmix box rows {x1}:{x2_} columns {y1}:{y2} falls outside the {H}x{W} view")
    out = x.clone()
    out[:, x1:x2_, y1:y2] = x2[:, x1:x2_, y1:y2]
    return out


_SAMPLERS: dict[str, Callable] = {
    "resize": _sample_resize,
    "random_crop": _sample_random_crop,
    "random_resized_crop": _sample_random_resized_crop,
    "random_horizontal_flip": _sample_random_horizontal_flip,
    "rand_augment": _sample_rand_augment,
    "random_erase": _sample_random_erase,
    "mixup": _sample_mixup,
    "cutmix": _sample_cutmix,
}
_APPLIERS: dict[str, Callable] = {
    "uint8": lambda cfg, img, slot: img,  # the input is already uint8 (checked in apply)
    "resize": _apply_resize,
    "center_crop": _apply_center_crop,
    "random_crop": _apply_random_crop,
    "random_resized_crop": _apply_random_resized_crop,
    "random_horizontal_flip": _apply_random_horizontal_flip,
    "rand_augment": _apply_rand_augment,
    "to_tensor": _apply_to_tensor,
    "random_erase": _apply_random_erase,
    "normalize": _apply_normalize,
}
_MIXERS: dict[str, Callable] = {"mixup": _apply_mixup, "cutmix": _apply_cutmix}
# How each transform changes (height, width); missing = unchanged.
_SHAPES: dict[str, Callable] = {
    "resize": _resize_hw,
    "center_crop": _center_crop_hw,
    "random_crop": lambda cfg, hw: _hw_of(cfg["size"]),
    "random_resized_crop": lambda cfg, hw: _hw_of(cfg["size"]),
}


# ---------------------------------------------------------------------------------------------

def _check_hw(name: str, hw: Any) -> tuple[int, int]:
    if not (isinstance(hw, (list, tuple)) and len(hw) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in hw)):
        raise ValueError(f"{name} must be (height, width) of positive ints, got {hw!r}")
    return int(hw[0]), int(hw[1])


def _check_partner_id(partner: Any) -> None:
    if not (isinstance(partner, str) or _is_int(partner)):
        raise ValueError(f"partner id must be a key (str) or a dataset index (int), got {partner!r}")


class Augmenter:
    """Draws and replays augmentation entries for one `image_augmentation` config, rendering views
    with one backend: "pil" (the reference trainers' own computation) or "tensor"."""

    def __init__(self, image_augmentation: dict, backend: str = "pil"):
        if backend not in BACKENDS:
            raise ValueError(f"replay backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.backend = backend
        self._config = _normalise_config(image_augmentation)
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
                return _hw_of(self._config[key]["size"])
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
            if key in _SAMPLERS:
                slots[key] = _SAMPLERS[key](cfg, rng, hw)
            if key in _SHAPES:
                hw = _SHAPES[key](cfg, hw)
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
        mix_slot = _SAMPLERS[mixing](self._config[mixing], rng, out_hw)
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
                img = _APPLIERS[key](self._config[key], img, slots.get(key))
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
                x = _MIXERS[key](self._config[key], x, x2, mix[key])
        return x

    def augment(self, rng: random.Random, image: torch.Tensor | Image.Image, partner: str | int | None = None,
                partner_image: torch.Tensor | Image.Image | None = None) -> tuple[list, torch.Tensor]:
        partner_hw = _image_hw(partner_image) if partner_image is not None else None
        entry = self.sample(rng, _image_hw(image), partner, partner_hw)
        return entry, self.apply(entry, image, partner_image)

    def plain(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        """The un-augmented view: resize to cover the output size (bilinear, antialias), center crop,
        float, normalize. Without a fixed output size the geometry is left as is."""
        image = self.source(image)
        out = self.output_size
        if out is not None:
            H, W = out
            h, w = _image_hw(image)
            if H == W:
                size = [H]  # the usual shorter-side resize
            else:
                scale = max(H / h, W / w)
                size = [max(H, int(round(h * scale))), max(W, int(round(w * scale)))]
            image = F.center_crop(F.resize(image, size, InterpolationMode.BILINEAR, antialias=True), [H, W])
        x = _apply_to_tensor({}, image, None)
        if "normalize" in self._config:
            x = _apply_normalize(self._config["normalize"], x, None)
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


def entry_seed(seed: int, key: str, index: int, *extra: str) -> int:
    """A stable 64-bit seed for random.Random from (run seed, sample key, augmentation index, ...).
    blake2b over length-prefixed parts, so it is the same on every machine and Python version."""
    h = hashlib.blake2b(digest_size=8)
    for part in (str(seed), str(key), str(index), *map(str, extra)):
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(4, "big"))
        h.update(data)
    return int.from_bytes(h.digest(), "big")
