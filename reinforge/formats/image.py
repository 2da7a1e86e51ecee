"""Image decoding with the guards untrusted data needs; shared by the pipeline and the readers so
that a replay decodes exactly the tensor the teachers saw.

The pixels are torchvision's `default_loader`'s, `PIL.Image.open(f).convert("RGB")`, for every
mode (alpha dropped, 16-bit and 32-bit values as PIL converts them): the consumers' trainers
(ml-dr, ml-mobileclip) decode that way, and the view a teacher scores must be the view they make.
"""
from __future__ import annotations

import io
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently padded
DEFAULT_MAX_PIXELS = 64_000_000  # ~8000x8000; above this a file is treated as a decompression bomb

# Member extensions a sample's image may have, in order of preference; every torchvision ImageFolder
# suffix (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp) has one, and webdataset decodes them all.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff")


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


# --- the pixel limit ----------------------------------------------------------------------------
# PIL runs its own bomb check (Image._decompression_bomb_check, against the process-wide
# Image.MAX_IMAGE_PIXELS, 89.5 MP) while opening and loading; it would cap `max_image_pixels` at
# PIL's value whatever the recipe says. Setting Image.MAX_IMAGE_PIXELS would change every other
# PIL user in the process (a trainer importing our readers) and race between threads with different
# limits; warnings.catch_warnings is process-wide too. Instead the check is wrapped once: on a
# thread inside `pixel_limit(n)` the limit is n (above or below PIL's); everywhere else PIL's own
# check runs unchanged. The limit lives in a threading.local, so concurrent decodes with different
# limits never see each other's, and code outside `pixel_limit` keeps exactly PIL's protection.
_limit = threading.local()


def _limited_bomb_check(size, *args, **kwargs) -> None:
    pixels = getattr(_limit, "pixels", None)
    if pixels is None:
        return _pil_bomb_check(size, *args, **kwargs)
    width, height = size
    if max(1, width) * max(1, height) > pixels:
        raise Image.DecompressionBombError(f"{width}x{height} exceeds max_image_pixels={pixels}")


_pil_bomb_check = getattr(Image._decompression_bomb_check, "__wrapped_pil__", Image._decompression_bomb_check)
_limited_bomb_check.__wrapped_pil__ = _pil_bomb_check  # a re-import wraps PIL's function, not ours
Image._decompression_bomb_check = _limited_bomb_check


@contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """PIL's bomb check on this thread uses `max_pixels` instead of Image.MAX_IMAGE_PIXELS."""
    previous = getattr(_limit, "pixels", None)
    _limit.pixels = max_pixels
    try:
        yield
    finally:
        _limit.pixels = previous


# --- decoding -----------------------------------------------------------------------------------

def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode to a uint8 CHW RGB tensor, pixel for pixel torchvision's default_loader."""
    if not data:
        raise ImageDecodeError("empty_image", "zero-byte image")
    try:
        with pixel_limit(max_pixels):
            img = Image.open(io.BytesIO(data))
            check_pixels(img.size, max_pixels)  # from the header, before any pixel is decoded
            rgb = img.convert("RGB")  # default_loader's decode; loads, so truncation raises here
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("image_too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("corrupt_image", "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated, corrupt, or a mode PIL cannot make RGB
        raise ImageDecodeError("corrupt_image", f"{type(exc).__name__}: {exc}") from exc
    return pil_to_tensor(rgb)


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageDecodeError("image_too_large", f"{width}x{height} exceeds max_image_pixels={max_pixels}")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    import torch  # here, not at module level: tools that never decode (reshard, join) start without torch
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
