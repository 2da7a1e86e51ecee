"""Pool embedding: one image encoder (an open_clip model, or a timm backbone's pooled features) maps
each decoded image to an L2-normalised vector; an open_clip encoder can also embed the caption.

Preprocessing is the eval transform the models were trained with: resize to cover the input size
(bicubic, antialias), center crop, normalise with the model's mean/std. The same encoder embeds
transfer-set queries and evaluation images, so pool and queries live in one space.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from reinforge.models.preprocess import fit_views
from reinforge.models.specs import EmbedEncoder
from reinforge.models.teacher import Teacher, load_teacher
from reinforge.stages.base import Batch, MapStage, Stage, run_isolated


class ImageView(MapStage):
    """uint8 image -> float [3, H, W] in [0, 1] at the encoder's input size; sha256 of the image bytes."""

    name = "view"

    def __init__(self, size: tuple[int, int], threads: int = 1):
        self.size = size
        self.threads = threads

    def process(self, sample: dict) -> dict:
        image = sample.pop("image").to(torch.float32).div_(255)
        sample["view"] = fit_views(image[None], self.size)[0]
        sample["sha256"] = hashlib.sha256(sample["image_bytes"]).hexdigest()
        return sample


class Encoder(Stage):
    """Adds `image_emb` (and `text_emb` with a caption, when encoder.text) as float16 [D] numpy rows."""

    name = "encoder"
    is_model = True

    def __init__(self, spec: EmbedEncoder, device: str | None = None):
        self.spec = spec
        self.device = device
        self.teacher: Teacher | None = None

    def setup(self) -> None:
        if self.teacher is not None:  # idempotent: the pipeline sets it up early to learn the input size
            return
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        s = self.spec
        self.teacher = load_teacher(s.teacher(), self.device, s.precision, pooled=True, image_size=s.image_size)
        self.size, self.dim, self.version = self.teacher.size, self.teacher.dim, self.teacher.version
        self.version.update(kind=s.kind, dim=self.dim, image_size=list(self.size), mean=list(self.teacher.mean),
                            std=list(self.teacher.std), precision=s.precision)

    def versions(self) -> dict:
        return {"encoder": self.version}

    @torch.inference_mode()
    def embed_views(self, views: torch.Tensor) -> np.ndarray:
        """[N, 3, H, W] in [0, 1] at the input size -> float32 [N, D], unit norm."""
        x = self.teacher.normalize(views.to(self.device, torch.float32))
        return F.normalize(self.teacher.images(x), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Strings -> float32 [N, D], unit norm (an encoder with a text tower)."""
        return F.normalize(self.teacher.texts(texts), dim=-1).cpu().numpy()

    def _embed(self, samples: list[dict]) -> list[dict]:
        image = self.embed_views(torch.stack([s["view"] for s in samples]))
        text = self.embed_texts([s["caption"] for s in samples]) if self.spec.text else None
        return [{"image_emb": image[i], **({"text_emb": text[i]} if text is not None else {})}
                for i in range(len(samples))]

    def __call__(self, batch: Batch) -> Batch:
        if not batch.samples:
            return batch
        self.setup()
        kept, failed = run_isolated(self.name, batch.samples, self._embed)
        out = []
        for sample, emb in kept:
            members = {"sha256": sample["sha256"], **{k: v.astype(np.float16) for k, v in emb.items()}}
            out.append({"__key__": sample["__key__"], "members": members})
        return Batch(out, batch.errors + failed)

