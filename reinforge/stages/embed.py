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

from reinforge.models.specs import ClipTeacherSpec, EmbedEncoder, Teacher
from reinforge.stages.base import Batch, MapStage, Stage
from reinforge.stages.base import run_isolated
from reinforge.stages.clip_teachers import autocast, fit_views, load_open_clip


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
        self.model = None
        self.tokenizer = None

    def setup(self) -> None:
        if self.model is not None:  # idempotent: the pipeline sets it up early to learn the input size
            return
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        s = self.spec
        if s.kind == "open_clip":
            import open_clip

            from reinforge.stages.clip_teachers import clip_teacher_info
            self.dim = clip_teacher_info(ClipTeacherSpec(model=s.model, pretrained=s.pretrained))["embed_dim"]
            self.model, _, self.tokenizer, self.version, _ = load_open_clip(s.model, s.pretrained, self.device)
            cfg = open_clip.get_model_preprocess_cfg(self.model)
            size, mean, std = cfg["size"], cfg["mean"], cfg["std"]
        else:
            import timm
            from reinforge.stages.teachers import load_teacher
            model, self.version = load_teacher(Teacher(model=s.model, checkpoint=s.checkpoint,
                                                       checkpoint_key_map=s.checkpoint_key_map))
            model.reset_classifier(0)  # pooled backbone features
            cfg = timm.data.resolve_data_config({}, model=model)
            size, mean, std = s.image_size or cfg["input_size"][1:], cfg["mean"], cfg["std"]
            self.model, self.dim = model.to(self.device), int(model.num_features)
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.version.update(kind=s.kind, dim=self.dim, image_size=list(self.size), mean=list(mean), std=list(std),
                            precision=s.precision)

    def versions(self) -> dict:
        return {"encoder": self.version}

    def _encode(self, x: torch.Tensor, fn) -> np.ndarray:
        out = []
        for start in range(0, x.shape[0], self.spec.batch_size):
            with autocast(self.device, self.spec.precision):
                features = fn(x[start:start + self.spec.batch_size])
            out.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    @torch.inference_mode()
    def embed_views(self, views: torch.Tensor) -> np.ndarray:
        """[N, 3, H, W] in [0, 1] at the input size -> float32 [N, D], unit norm."""
        x = (views.to(self.device, torch.float32) - self.mean) / self.std
        encode = self.model.encode_image if self.spec.kind == "open_clip" else self.model
        return self._encode(x, encode)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise ValueError(f"encoder {self.spec.model}: a timm backbone has no text tower")
        return self._encode(self.tokenizer(texts).to(self.device), self.model.encode_text)

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

