"""The `image_augmentation` config of FORMATS §1: which transforms exist, in which fixed order they
run, their fields and defaults (as torchvision / ml-dr define them), and the validation that fills them in.
Every message starts with "image_augmentation.<key>" so users find the field."""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

from torchvision.transforms import InterpolationMode

TRANSFORM_ORDER: tuple[str, ...] = (
    "uint8", "resize", "center_crop", "random_crop", "random_resized_crop", "random_horizontal_flip",
    "rand_augment", "to_tensor", "random_erase", "normalize", "mixup", "cutmix",
)
IMPLICIT = ("uint8", "to_tensor")  # always applied; accepted in a config for ml-dr compatibility
MIXING = ("mixup", "cutmix")
# Every transform but the parameter-free ones has a slot, as ml-dr's Compose.compress writes it:
# resize too (it stores its fixed size, which replay ignores).
VIEW_SLOTS = ("resize", "random_crop", "random_resized_crop", "random_horizontal_flip", "rand_augment",
              "random_erase")

INTERPOLATION = {
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


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad(where: str, message: str) -> ValueError:
    return ValueError(f"image_augmentation.{where}: {message}")


def _check_size(where: str, v: Any) -> int | list[int]:
    if isinstance(v, (list, tuple)) and len(v) == 1:
        v = v[0]
    if is_int(v) and v > 0:
        return v
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(is_int(x) and x > 0 for x in v):
        return [int(v[0]), int(v[1])]
    raise _bad(where, f"size must be a positive int or [height, width], got {v!r}")


def _check_prob(where: str, v: Any) -> float:
    if not (is_number(v) and 0.0 <= v <= 1.0):
        raise _bad(where, f"must be a probability in [0, 1], got {v!r}")
    return float(v)


def _check_pair(where: str, v: Any, low: float, high: float, low_open: bool = False) -> list[float]:
    ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(is_number(x) for x in v)
    if ok:
        a, b = float(v[0]), float(v[1])
        ok = (a > low if low_open else a >= low) and a <= b <= high and b > 0
    if not ok:
        raise _bad(where, f"must be [min, max] with {low} {'<' if low_open else '<='} min <= max <= {high}, "
                          f"got {v!r}")
    return [a, b]


def _check_interpolation(where: str, v: Any, allowed=tuple(INTERPOLATION)) -> str:
    if v not in allowed:
        raise _bad(where, f"interpolation must be one of {list(allowed)}, got {v!r}")
    return v


def _check_int(where: str, v: Any, low: int) -> int:
    if not (is_int(v) and v >= low):
        raise _bad(where, f"must be an int >= {low}, got {v!r}")
    return v


def _check_rgb(where: str, v: Any, positive: bool) -> list[float]:
    if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(is_number(x) for x in v)
            and (not positive or all(x > 0 for x in v))):
        raise _bad(where, f"must be 3 {'positive ' if positive else ''}numbers (RGB), got {v!r}")
    return [float(x) for x in v]


def _check_positive(where: str, v: Any, low: float = 0.0, inclusive: bool = False) -> float:
    if not (is_number(v) and (v >= low if inclusive else v > low)):
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
            allowed = ("nearest", "bilinear") if key == "rand_augment" else tuple(INTERPOLATION)
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
            if not (is_number(v) and v == 0):
                raise _bad(where, f"must be 0 (the reference trainers always erase with 0), got {v!r}")
            out[field] = 0
        else:  # pragma: no cover - every default field has a check above
            raise AssertionError(field)
    if key == "rand_augment" and out["magnitude"] >= out["num_magnitude_bins"]:
        raise _bad(f"{key}.magnitude", f"{out['magnitude']} must be < num_magnitude_bins={out['num_magnitude_bins']}")
    return out


def normalise_config(image_augmentation: Any) -> dict[str, dict]:
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


def interpolation_mode(cfg: dict) -> InterpolationMode:
    return INTERPOLATION[cfg["interpolation"]]
