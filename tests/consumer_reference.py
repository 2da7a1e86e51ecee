"""What Apple's reference trainers compute from our files, written from their behaviour, independently of
reinforge's replay code: ml-dr (`dr/transforms.py` on `transforms.py`: Compose.decompress + reapply, as
`dr.data.ReinforcedDataset` calls them) and ml-mobileclip (`training/dr/transforms.py`, the same code
used by its open_clip patch). The view is built from the PIL image with torchvision's functional API,
then to_tensor, erase, normalise, mix. Tests compare reinforge's views (what its teachers scored) with
these, bit for bit."""
from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.autoaugment import _apply_op

ORDER = ("uint8", "resize", "center_crop", "random_crop", "random_resized_crop", "random_horizontal_flip",
         "rand_augment", "to_tensor", "random_erase", "normalize", "mixup", "cutmix")
NO_PARAM = ("uint8", "center_crop", "to_tensor", "normalize")  # ml-dr NO_PARAM_TRANSFORMS
MIXING = ("mixup", "cutmix")
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")  # ml-dr RandAugment.op_names
# torchvision's defaults: Resize / RandomResizedCrop bilinear, RandAugment nearest
DEFAULT_INTERPOLATION = {"resize": "bilinear", "random_resized_crop": "bilinear", "rand_augment": "nearest"}


def _size(value) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


def _interpolation(name: str, fields: dict) -> InterpolationMode:
    return InterpolationMode(fields.get("interpolation", DEFAULT_INTERPOLATION[name]))


def decompress(config: dict, entry: list) -> tuple[object, dict]:
    """ml-dr Compose.decompress: (partner id or None, {transform: (own,) or (own, partner) or mixing params})."""
    names = [n for n in ORDER if n in config]
    partner = None
    if any(n in MIXING for n in names):
        partner, entry = entry[0], entry[1:]
    params = {}
    for p, name in zip(entry, [n for n in names if n not in NO_PARAM]):
        if p is None:
            continue
        if name in MIXING:
            params[name] = p
        elif partner is not None and len(p) > 1:
            params[name] = (p[0], p[1])
        else:
            params[name] = (p,)
    for name in names:
        if name in NO_PARAM:
            params[name] = ((), ())
    return partner, params


def _apply(name: str, fields: dict, img, p):
    if name == "uint8":
        return img  # ml-dr's ToUint8 passes PIL images through
    if name == "resize":
        return F.resize(img, fields["size"], _interpolation(name, fields), antialias=True)
    if name == "center_crop":
        return F.center_crop(img, _size(fields["size"]))
    if name == "random_crop":
        if fields.get("padding"):
            img = F.pad(img, fields["padding"], fill=0, padding_mode="constant")
        h, w = _size(fields["size"])
        return F.crop(img, p[0], p[1], h, w)
    if name == "random_resized_crop":
        return F.resized_crop(img, *p, _size(fields["size"]), _interpolation(name, fields), antialias=True)
    if name == "random_horizontal_flip":
        return F.hflip(img) if p else img
    if name == "rand_augment":
        for op, magnitude in p:
            img = _apply_op(img, OPS[op], magnitude, interpolation=_interpolation(name, fields), fill=None)
        return img
    if name == "to_tensor":
        return F.to_tensor(img)
    if name == "random_erase":
        x, y, h, w = p
        if x != -1:
            img[:, x:x + h, y:y + w] = 0  # ml-dr zeroes the box whatever RandomErasing's value
        return img
    if name == "normalize":
        return F.normalize(img, fields["mean"], fields["std"])
    raise AssertionError(name)


def _mix(name: str, x: torch.Tensor, x2: torch.Tensor, p) -> torch.Tensor:
    if name == "mixup":
        return p * x + (1 - p) * x2
    lam, x1, y1, x2_, y2 = p  # ml-dr CutMix: bbx along the height (rows), bby along the width
    mixed = x.detach().clone()
    mixed[:, x1:x2_, y1:y2] = x2[:, x1:x2_, y1:y2]
    return mixed


def reapply(config: dict, entry: list, image: Image.Image, partner: Image.Image | None = None) -> torch.Tensor:
    """ml-dr Compose.reapply(img, decompress(entry), img2) on PIL images; config is the image_augmentation
    dict (fields as the trainer's transforms receive them)."""
    partner_id, params = decompress(config, entry)
    img, img2 = image, (partner if partner_id is not None else None)
    for name in [n for n in ORDER if n in config]:
        if name not in params:
            continue
        if name in MIXING:
            img = _mix(name, img, img2, params[name])
            continue
        p = params[name]
        if p[0] is not None:
            img = _apply(name, config[name], img, p[0])
        if img2 is not None and len(p) > 1 and p[1] is not None:
            img2 = _apply(name, config[name], img2, p[1])
    return img


def default_loader(data: bytes) -> Image.Image:
    """torchvision's default_loader on a file's bytes."""
    import io
    return Image.open(io.BytesIO(data)).convert("RGB")
