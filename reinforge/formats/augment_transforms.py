"""One section per transform of FORMATS §1: how it changes the image size, how its slot is drawn and how
it is replayed (RandAugment in rand_augment.py), and the tables the Augmenter dispatches through."""
from __future__ import annotations

import copy
import math
import random
from typing import Any, Callable

import torch
from PIL import Image
from torchvision.transforms import functional as F

from reinforge.formats.augment_config import interpolation_mode, is_int, is_number
from reinforge.formats.rand_augment import apply_rand_augment, sample_rand_augment


def hw_of(size: int | list[int]) -> tuple[int, int]:
    """(height, width) of a crop size; an int means a square."""
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def _ints(name: str, slot: Any, n: int) -> list[int]:
    if not (isinstance(slot, (list, tuple)) and len(slot) == n and all(is_int(v) for v in slot)):
        raise ValueError(f"{name} slot must be a list of {n} ints, got {slot!r}")
    return list(slot)


def _check_box(name: str, hw: tuple[int, int], top: int, left: int, height: int, width: int) -> None:
    """A box must lie inside the image: torchvision would pad silently, which corrupts a replay."""
    H, W = hw
    if not (height > 0 and width > 0 and top >= 0 and left >= 0 and top + height <= H and left + width <= W):
        raise ValueError(f"{name} box top={top} left={left} height={height} width={width} falls outside "
                         f"the {H}x{W} image (is this the image the entry was drawn for?)")


def image_hw(img: torch.Tensor | Image.Image) -> tuple[int, int]:
    _, h, w = F.get_dimensions(img)
    return int(h), int(w)


# ---------------------------------------------------------------------------------------------
# One section per transform: how it changes the size, how its slot is drawn, how it is applied.
# Samplers take (cfg, rng, hw) and return the slot; appliers take (cfg, img, slot).

def resize_hw(cfg: dict, hw: tuple[int, int]) -> tuple[int, int]:
    size = cfg["size"]
    h, w = F._compute_resized_output_size(hw, [size] if isinstance(size, int) else list(size))
    return int(h), int(w)


def _sample_resize(cfg: dict, rng: random.Random, hw: tuple[int, int]) -> int | list[int]:
    return copy.deepcopy(cfg["size"])  # not random: ml-dr stores Resize's size in the entry


def _apply_resize(cfg: dict, img: torch.Tensor, slot: Any) -> torch.Tensor:
    size = cfg["size"]
    return F.resize(img, [size] if isinstance(size, int) else list(size), interpolation_mode(cfg), antialias=True)


def center_crop_hw(cfg: dict, hw: tuple[int, int]) -> tuple[int, int]:
    h, w = hw_of(cfg["size"])
    if h > hw[0] or w > hw[1]:  # F.center_crop would pad with black
        raise ValueError(f"center_crop {h}x{w} is larger than the {hw[0]}x{hw[1]} image")
    return h, w


def _apply_center_crop(cfg: dict, img: torch.Tensor, slot: None) -> torch.Tensor:
    return F.center_crop(img, list(center_crop_hw(cfg, image_hw(img))))


def _padded_hw(cfg: dict, hw: tuple[int, int]) -> tuple[int, int]:
    return hw[0] + 2 * cfg["padding"], hw[1] + 2 * cfg["padding"]


def _sample_random_crop(cfg: dict, rng: random.Random, hw: tuple[int, int]) -> list[int]:
    H, W = _padded_hw(cfg, hw)
    h, w = hw_of(cfg["size"])
    if h > H or w > W:
        raise ValueError(f"random_crop {h}x{w} is larger than the {H}x{W} (padded) image")
    return [rng.randint(0, H - h), rng.randint(0, W - w)]


def _apply_random_crop(cfg: dict, img: torch.Tensor, slot: Any) -> torch.Tensor:
    top, left = _ints("random_crop", slot, 2)
    if cfg["padding"]:  # explicit, configured padding (torchvision RandomCrop's `padding`)
        img = F.pad(img, [cfg["padding"]], fill=0)
    h, w = hw_of(cfg["size"])
    _check_box("random_crop", image_hw(img), top, left, h, w)
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
    _check_box("random_resized_crop", image_hw(img), top, left, h, w)
    return F.resized_crop(img, top, left, h, w, list(hw_of(cfg["size"])), interpolation_mode(cfg), antialias=True)


def _sample_random_horizontal_flip(cfg: dict, rng: random.Random, hw: tuple[int, int]) -> bool:
    return rng.random() < cfg["p"]


def _apply_random_horizontal_flip(cfg: dict, img: torch.Tensor, slot: Any) -> torch.Tensor:
    if not isinstance(slot, bool):
        raise ValueError(f"random_horizontal_flip slot must be true or false, got {slot!r}")
    return F.hflip(img) if slot else img


def apply_to_tensor(cfg: dict, img: torch.Tensor | Image.Image, slot: None) -> torch.Tensor:
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
    _check_box("random_erase", image_hw(img), i, j, h, w)
    img = img.clone()  # never write into a caller's tensor
    img[:, i:i + h, j:j + w] = 0
    return img


def apply_normalize(cfg: dict, img: torch.Tensor, slot: None) -> torch.Tensor:
    return F.normalize(img, cfg["mean"], cfg["std"])


def _sample_mixup(cfg: dict, rng: random.Random, hw: tuple[int, int]) -> float:
    # rounded before use so that the stored JSON number is exactly the weight applied
    return round(rng.betavariate(cfg["alpha"], cfg["alpha"]) / cfg["div_by"], 6)


def _apply_mixup(cfg: dict, x: torch.Tensor, x2: torch.Tensor, slot: Any) -> torch.Tensor:
    if not (is_number(slot) and 0.0 <= slot <= 1.0):
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
    if not (isinstance(slot, (list, tuple)) and len(slot) == 5 and is_number(slot[0])):
        raise ValueError(f"cutmix slot must be [lam, x1, y1, x2, y2], got {slot!r}")
    x1, y1, x2_, y2 = _ints("cutmix box", slot[1:], 4)
    H, W = image_hw(x)
    if not (0 <= x1 <= x2_ <= H and 0 <= y1 <= y2 <= W):
        raise ValueError(f"cutmix box rows {x1}:{x2_} columns {y1}:{y2} falls outside the {H}x{W} view")
    out = x.clone()
    out[:, x1:x2_, y1:y2] = x2[:, x1:x2_, y1:y2]
    return out


SAMPLERS: dict[str, Callable] = {
    "resize": _sample_resize,
    "random_crop": _sample_random_crop,
    "random_resized_crop": _sample_random_resized_crop,
    "random_horizontal_flip": _sample_random_horizontal_flip,
    "rand_augment": sample_rand_augment,
    "random_erase": _sample_random_erase,
    "mixup": _sample_mixup,
    "cutmix": _sample_cutmix,
}
APPLIERS: dict[str, Callable] = {
    "uint8": lambda cfg, img, slot: img,  # the input is already uint8 (checked in apply)
    "resize": _apply_resize,
    "center_crop": _apply_center_crop,
    "random_crop": _apply_random_crop,
    "random_resized_crop": _apply_random_resized_crop,
    "random_horizontal_flip": _apply_random_horizontal_flip,
    "rand_augment": apply_rand_augment,
    "to_tensor": apply_to_tensor,
    "random_erase": _apply_random_erase,
    "normalize": apply_normalize,
}
MIXERS: dict[str, Callable] = {"mixup": _apply_mixup, "cutmix": _apply_cutmix}
# How each transform changes (height, width); missing = unchanged.
SHAPES: dict[str, Callable] = {
    "resize": resize_hw,
    "center_crop": center_crop_hw,
    "random_crop": lambda cfg, hw: hw_of(cfg["size"]),
    "random_resized_crop": lambda cfg, hw: hw_of(cfg["size"]),
}

