"""Bringing shared views to a model's input size, as the model's own eval transform would."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_views(views: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Views [N, 3, h, w] in [0, 1] at a teacher's input size (H, W): unchanged when equal, else
    resized (bicubic, antialias) to cover it and center-cropped, as open_clip's eval transform does
    (a plain resize for square views and a square teacher). Clamped to [0, 1]: bicubic overshoots,
    where the PIL pipeline the teacher was trained with would saturate."""
    h, w = views.shape[-2:]
    H, W = size
    if (h, w) == (H, W):
        return views
    scale = max(H / h, W / w)
    rh, rw = max(H, round(h * scale)), max(W, round(w * scale))
    x = F.interpolate(views, size=(rh, rw), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
    top, left = int(round((rh - H) / 2.0)), int(round((rw - W) / 2.0))  # torchvision center_crop
    return x[..., top:top + H, left:left + W]
