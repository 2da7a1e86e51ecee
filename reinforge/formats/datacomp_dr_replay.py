"""Can a DataCompDR sample's stored augmentations be replayed faithfully on these image bytes? The sha256
in its `json` member must match them, and every crop box must lie inside the decoded image."""
from __future__ import annotations

import torch

from reinforge.formats.augment import Augmenter
from reinforge.formats.augment_transforms import center_crop_hw, hw_of, resize_hw
from reinforge.formats.datacomp_dr import META_MEMBER, DRSample
from reinforge.formats.image import ImageDecodeError, decode_rgb
from reinforge.formats.imagenet_plus import SchemaError, sha256_hex


class ReplayError(SchemaError):
    """A stored augmentation cannot be replayed faithfully on these image bytes. `reason` is a short
    code for counters: missing_image, missing_sha256, sha256_mismatch, corrupt_image, bad_params,
    crop_out_of_bounds."""

    def __init__(self, reason: str, message: str):
        super().__init__(message, reason)


def _as_augmenter(augmentation: Augmenter | dict) -> Augmenter:
    return augmentation if isinstance(augmentation, Augmenter) else Augmenter(augmentation)


def check_crop_boxes(entries: list, augmentation: Augmenter | dict, image_hw: tuple[int, int], uid: str = "?") -> None:
    """Every random_crop / random_resized_crop box of every entry lies inside the image it is cut from.
    torchvision pads a box that sticks out with black without a word, so the public generator's boxes
    (drawn on full-resolution images, replayed on <=512 px downloads) would replay silently wrong.
    Only the sample's own view is checked; a mixing partner's half is checked when its image is known."""
    augmenter = _as_augmenter(augmentation)
    config, layout = augmenter.config(), augmenter.layout()
    for n, entry in enumerate(entries):
        if not isinstance(entry, list) or len(entry) != len(layout):
            raise ReplayError("bad_params", f"sample {uid}: param_aug[{n}] has "
                              f"{len(entry) if isinstance(entry, list) else type(entry).__name__} slots, "
                              f"this augmentation expects {layout}")
        slots = dict(zip(layout, entry))
        mixed = slots.get("partner") is not None
        hw = image_hw
        # walk the geometric transforms in TRANSFORM_ORDER, with apply()'s own size rules
        for name in ("resize", "center_crop", "random_crop", "random_resized_crop"):
            if name not in config:
                continue
            cfg = config[name]
            if name == "resize":
                hw = resize_hw(cfg, hw)
                continue
            if name == "center_crop":
                try:
                    hw = center_crop_hw(cfg, hw)
                except ValueError as exc:
                    raise ReplayError("crop_out_of_bounds", f"sample {uid}: {exc}") from None
                continue
            slot = slots[name][0] if mixed and isinstance(slots[name], list) else slots[name]
            size = 4 if name == "random_resized_crop" else 2
            if not (isinstance(slot, list) and len(slot) == size
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in slot)):
                raise ReplayError("bad_params", f"sample {uid}: param_aug[{n}] {name} slot must be {size} ints, "
                                  f"got {slot!r}")
            if name == "random_crop":
                pad = cfg["padding"]
                (top, left), (h, w) = slot, hw_of(cfg["size"])
                bound = (hw[0] + 2 * pad, hw[1] + 2 * pad)
            else:
                top, left, h, w = slot
                bound = hw
            if not (h > 0 and w > 0 and top >= 0 and left >= 0 and top + h <= bound[0] and left + w <= bound[1]):
                raise ReplayError("crop_out_of_bounds",
                                  f"sample {uid}: param_aug[{n}] {name} box top={top} left={left} height={h} "
                                  f"width={w} falls outside the {bound[0]}x{bound[1]} image (boxes drawn on "
                                  f"another resolution than the stored image?)")
            hw = hw_of(cfg["size"])


def replayable_image(sample: DRSample, image_bytes: bytes | None, augmentation: Augmenter | dict) -> torch.Tensor:
    """check_replayable, returning the decoded uint8 CHW image so that a reader decodes once."""
    if image_bytes is None:
        raise ReplayError("missing_image", f"sample {sample.uid}: no image bytes to replay on")
    expected = sample.meta.get("sha256")
    if not expected:
        raise ReplayError("missing_sha256", f"sample {sample.uid}: {META_MEMBER!r} has no sha256, so the "
                          f"image the crop boxes refer to cannot be confirmed")
    actual = sha256_hex(image_bytes)
    if actual != expected:
        raise ReplayError("sha256_mismatch", f"sample {sample.uid}: image bytes hash to {actual[:12]}..., but the "
                          f"crop boxes refer to the image with sha256 {str(expected)[:12]}...")
    try:
        image = decode_rgb(image_bytes)
    except ImageDecodeError as exc:
        raise ReplayError("corrupt_image", f"sample {sample.uid}: {exc}") from None
    check_crop_boxes(sample.entries, augmentation, (int(image.shape[-2]), int(image.shape[-1])), sample.uid)
    return image


def check_replayable(sample: DRSample, image_bytes: bytes | None, augmentation: Augmenter | dict) -> None:
    """Raise ReplayError (a SchemaError) unless every stored augmentation replays faithfully on
    `image_bytes`: the sha256 in `json` matches them, and every crop box lies inside the decoded image.
    `augmentation` (an Augmenter or its image_augmentation dict) tells which slot is which."""
    replayable_image(sample, image_bytes, augmentation)
