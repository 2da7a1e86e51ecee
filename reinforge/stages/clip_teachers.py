"""CLIP teacher ensemble for multi-modal reinforcement (DataCompDR / DFNDR, FORMATS §2).

Every teacher embeds the N shared augmentation views of an image (resized to its own input size,
normalised with its own mean/std) and every caption (with its own tokenizer). Each teacher's
embeddings are L2-normalised on their own and concatenated in teacher order; the concatenation is
not renormalised. One actor holds the whole ensemble, so views are moved to the device once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reinforge.models.preprocess import fit_views
from reinforge.models.specs import OpenClipTeacherSpec
from reinforge.models.teacher import Teacher, load_teacher
from reinforge.stages.base import Batch, SkipSample, Stage, run_isolated, sample_error


class ClipTeacherEnsemble(Stage):
    """Adds image_emb [N, D], text_emb [1, D] ([0, D] without a caption when require_caption=False)
    and syn_emb {syn_key: [S, D]} (float32, CPU) to each sample and drops its views."""

    name = "clip_teachers"
    is_model = True

    def __init__(self, specs: list[OpenClipTeacherSpec], device: str | None = None, require_caption: bool = True):
        if not specs:
            raise ValueError("ClipTeacherEnsemble needs at least one teacher")
        self.specs = list(specs)
        self.device = device
        self.require_caption = require_caption
        self.teachers: list[Teacher] = []

    def setup(self) -> None:
        if self.teachers:  # idempotent
            return
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        for spec in self.specs:
            teacher = load_teacher(spec, self.device, spec.precision)
            teacher.version.update(embed_dim=teacher.dim, image_size=list(teacher.size), mean=list(teacher.mean),
                                   std=list(teacher.std), logit_scale=teacher.logit_scale, precision=spec.precision)
            self.teachers.append(teacher)

    def dims(self) -> list[int]:
        return [t.dim for t in self.teachers]

    def logit_scales(self) -> list[float]:
        return [t.logit_scale for t in self.teachers]

    def versions(self) -> dict:
        # one top-level key: the executor merges every stage's dict into the manifest
        return {"clip_teachers": {"teachers": [t.version for t in self.teachers], "device": str(self.device)}}

    # -- encoding ------------------------------------------------------------------------------

    @torch.inference_mode()
    def embed_views(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per image, its views [N_i, 3, h, w] in [0, 1] -> [N_i, D_total] float32 on the CPU."""
        views = [v.to(self.device, torch.float32, non_blocking=True) for v in views]
        per_teacher = []
        for t in self.teachers:
            x = t.normalize(torch.cat([fit_views(v, t.size) for v in views]))
            per_teacher.append(F.normalize(t.images(x), dim=-1))  # each teacher unit-norm on its own
        emb = torch.cat(per_teacher, dim=-1).cpu()
        return list(emb.split([v.shape[0] for v in views]))

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Captions -> [len(texts), D_total] float32 on the CPU, each teacher with its own tokenizer."""
        return torch.cat([F.normalize(t.texts(texts), dim=-1) for t in self.teachers], dim=-1).cpu()

    def _check(self, sample: dict) -> None:
        views = sample.get("views")
        if not (isinstance(views, torch.Tensor) and views.ndim == 4 and views.shape[1] == 3
                and views.is_floating_point() and views.shape[0] > 0):
            got = f"{getattr(views, 'dtype', type(views).__name__)} {tuple(getattr(views, 'shape', ()))}"
            raise SkipSample("bad_views", f"views must be a float [N, 3, h, w] tensor, got {got}")
        caption = sample.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise SkipSample("bad_caption", f"caption must be a str, got {type(caption).__name__}")
        if self.require_caption and not (caption or "").strip():
            raise SkipSample("missing_caption", "no ground-truth caption to embed")
        syn = sample.get("syn") or {}
        if not (isinstance(syn, dict) and all(isinstance(v, list) and all(isinstance(c, str) for c in v)
                                              for v in syn.values())):
            raise SkipSample("bad_synthetic_captions", "syn must map keys to lists of strings")

    def _embed(self, samples: list[dict]) -> list[dict]:
        image_emb = self.embed_views([s["views"] for s in samples])
        # every caption of the batch in one pass per teacher: ground truth first, then syn lists in order
        texts, layout = [], []
        for s in samples:
            caption = (s.get("caption") or "").strip()
            parts = [("text_emb", [caption] if caption else [])]
            parts += [(key, captions) for key, captions in (s.get("syn") or {}).items()]
            layout.append([(name, len(items)) for name, items in parts])
            texts += [text for _, items in parts for text in items]
        text_emb = self.embed_texts(texts)
        results, offset = [], 0
        for emb, parts in zip(image_emb, layout):
            out = {"image_emb": emb, "syn_emb": {}}
            for name, count in parts:
                rows = text_emb[offset:offset + count]
                offset += count
                if name == "text_emb":
                    out["text_emb"] = rows
                else:
                    out["syn_emb"][name] = rows
            results.append(out)
        return results

    def __call__(self, batch: Batch) -> Batch:
        if not batch.samples:
            return batch
        self.setup()
        valid, errors = [], list(batch.errors)
        for sample in batch.samples:
            try:
                self._check(sample)
                valid.append(sample)
            except SkipSample as exc:
                errors.append(sample_error(sample, self.name, exc))
        kept, failed = run_isolated(self.name, valid, self._embed) if valid else ([], [])
        for sample, result in kept:
            sample.pop("views")  # the views are only teacher inputs; replay rebuilds them from the entries
            sample.update(result)
        return Batch([sample for sample, _ in kept], errors + failed)
