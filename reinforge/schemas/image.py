"""Image decoding with the guards untrusted data needs; shared by the pipeline and the readers so
that a replay decodes exactly the tensor the teachers saw."""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently padded
DEFAULT_MAX_PIXELS = 64_000_000  # ~8000x8000; above this a file is treated as a decompression bomb

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class ImageDecodeError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def find_image(members: dict) -> tuple[str, bytes] | None:
    """The first image member of a sample (by extension preference), or None."""
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            return ext, members[ext]
    return None


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode to a uint8 CHW RGB tensor. Grayscale/CMYK/palette convert to RGB; alpha is composited on white."""
    if not data:
        raise ImageDecodeError("empty_image", "zero-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size  # read from the header, before any pixel is decoded
            if width * height > max_pixels:
                raise ImageDecodeError(
                    "image_too_large", f"{width}x{height} exceeds max_image_pixels={max_pixels}")
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("image_too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("corrupt_image", "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError("corrupt_image", f"{type(exc).__name__}: {exc}") from exc
    return pil_to_tensor(to_rgb(img))


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping
        array = np.asarray(img, dtype=np.float64)
        peak = max(array.max(), 1.0)
        img = Image.fromarray((array * (255.0 / peak)).round().astype(np.uint8))
    return img.convert("RGB")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
