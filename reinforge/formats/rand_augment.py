"""RandAugment as torchvision defines it, drawn from a caller's `random.Random` and stored in an entry's
rand_augment slot: [[op, magnitude], ...] per view, `op` an index into RAND_AUGMENT_OPS and the
magnitude the exact value applied (quantised so that it survives JSON)."""
from __future__ import annotations

import functools
import random
from typing import Any

import torch
from torchvision.transforms import RandAugment as _TorchvisionRandAugment
from torchvision.transforms.autoaugment import _apply_op

from reinforge.formats.augment_config import interpolation_mode, is_int, is_number

# Index into this tuple is the `op` stored in a rand_augment slot (torchvision's own order).
RAND_AUGMENT_OPS: tuple[str, ...] = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)


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


def sample_rand_augment(cfg: dict, rng: random.Random, hw: tuple[int, int]) -> list | None:
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


def apply_rand_augment(cfg: dict, img: torch.Tensor, slot: Any) -> torch.Tensor:
    if slot is None:
        return img
    if not (isinstance(slot, (list, tuple)) and len(slot) == cfg["num_ops"]):
        raise ValueError(f"rand_augment slot must be null or {cfg['num_ops']} [op, magnitude] pairs, got {slot!r}")
    for pair in slot:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and is_int(pair[0])
                and 0 <= pair[0] < len(RAND_AUGMENT_OPS) and is_number(pair[1])):
            raise ValueError(f"rand_augment op must be [op index 0..{len(RAND_AUGMENT_OPS) - 1}, magnitude], "
                             f"got {pair!r}")
        img = _apply_op(img, RAND_AUGMENT_OPS[pair[0]], float(pair[1]), interpolation=interpolation_mode(cfg),
                        fill=None)
    return img
