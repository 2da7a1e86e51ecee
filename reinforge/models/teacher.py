"""A loaded teacher, whatever its kind: what a model stage needs from it, and the kind -> loader table.

Adding a kind: its spec in models/specs.py TEACHER_SPECS, a loader here in LOADERS that returns a
Teacher. Stages only see this protocol.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from reinforge.models.precision import autocast
from reinforge.models.specs import TeacherSpec

# kind -> "module:function" (spec, device, precision, *, pooled, image_size) -> Teacher; imported on use
LOADERS = {"timm": "reinforge.models.timm:load_timm_teacher",
           "open_clip": "reinforge.models.open_clip:load_clip_teacher"}


class Teacher(Protocol):
    spec: TeacherSpec
    model: torch.nn.Module
    device: str
    precision: str
    size: tuple[int, int]                # input (H, W)
    mean: tuple[float, ...]              # per channel, inputs in [0, 1]
    std: tuple[float, ...]
    dim: int                             # width of a row of images() / texts()
    num_classes: Optional[int]           # a classifier's: images() gives its logits
    logit_scale: Optional[float]         # an image-text model's
    text_tower: bool                     # texts() works
    version: dict                        # what the task manifest records about the weights

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] on the device -> the model's input (its mean/std)."""

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Model inputs [N, 3, H, W] -> float32 [N, dim] on the device (logits or unnormalised embeddings)."""

    def texts(self, texts: list[str]) -> torch.Tensor:
        """Strings -> float32 [N, dim] on the device, with the model's own tokenizer."""


def load_teacher(spec: TeacherSpec, device: str, precision: str, *, pooled: bool = False,
                 image_size: Optional[int] = None) -> Teacher:
    """The teacher of spec, on device, running at precision. pooled: a classifier's pooled features
    instead of its logits; image_size: the input size of a model that takes any (default: its own)."""
    module, _, name = LOADERS[spec.kind].partition(":")
    return getattr(importlib.import_module(module), name)(spec, device, precision, pooled=pooled,
                                                           image_size=image_size)


@dataclass
class LoadedTeacher:
    """The Teacher both loaders return: forward passes in chunks of the spec's batch size, under its precision."""
    spec: TeacherSpec
    model: torch.nn.Module
    device: str
    precision: str
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dim: int
    version: dict
    encode_image: Callable[[torch.Tensor], torch.Tensor]
    encode_text: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    tokenizer: Optional[Callable[[list[str]], torch.Tensor]] = None
    num_classes: Optional[int] = None
    logit_scale: Optional[float] = None

    def __post_init__(self):
        self._mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    @property
    def text_tower(self) -> bool:
        return self.encode_text is not None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._mean) / self._std

    def _chunks(self, x: torch.Tensor, encode: Callable) -> torch.Tensor:
        out = []
        for start in range(0, x.shape[0], self.spec.batch_size):
            with autocast(self.device, self.precision):
                out.append(encode(x[start:start + self.spec.batch_size]).float())
        if not out:
            return torch.zeros(0, self.dim, device=self.device)
        rows = torch.cat(out)
        if rows.shape[-1] != self.dim:
            raise RuntimeError(f"teacher {self.spec.model}: outputs of dim {rows.shape[-1]}, its config says {self.dim}")
        return rows

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return self._chunks(x.to(self.device), self.encode_image)

    def texts(self, texts: list[str]) -> torch.Tensor:
        if self.encode_text is None:
            raise ValueError(f"teacher {self.spec.model}: a {self.spec.kind} model has no text tower")
        tokens = self.tokenizer(texts) if texts else torch.zeros(0, 1, dtype=torch.long)
        return self._chunks(tokens.to(self.device), self.encode_text)
