"""Teacher ensemble for classification: classifiers' softmax averaged over teachers, top-k sparsified.

One actor holds the whole ensemble, so each batch of views is built and moved to the device once.
The views come already normalised by the augmentation (its `normalize`), at the teachers' input size.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from reinforge.formats.imagenet_plus import sparsify
from reinforge.models.specs import TimmTeacherSpec
from reinforge.models.teacher import Teacher, load_teacher
from reinforge.models.timm import num_classes
from reinforge.stages.base import Batch, Stage, run_isolated


def ensemble_num_classes(teachers: list[TimmTeacherSpec]) -> int:
    """The ensemble's class count without loading weights."""
    counts = {num_classes(spec) for spec in teachers}
    if len(counts) != 1:
        raise ValueError(f"teachers disagree on num_classes: {sorted(counts)}")
    return counts.pop()


class TeacherEnsemble(Stage):
    name = "teachers"
    is_model = True

    def __init__(self, teachers: list[TimmTeacherSpec], top_k: int, temperature: float = 1.0,
                 precision: str = "float32", device: str | None = None):
        self.specs = teachers
        self.top_k = top_k
        self.temperature = temperature
        self.precision = precision
        self.device = device
        self.teachers: list[Teacher] = []

    def setup(self) -> None:
        if self.teachers:  # idempotent: the pipeline may set up the ensemble early to learn num_classes
            return
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.teachers = [load_teacher(spec, self.device, self.precision) for spec in self.specs]
        classes = {t.num_classes for t in self.teachers}
        if len(classes) != 1:
            raise ValueError(f"teachers disagree on num_classes: {sorted(classes)}")
        self.num_classes = classes.pop()

    def versions(self) -> dict:
        return {"teachers": [t.version for t in self.teachers], "device": str(self.device),
                "precision": self.precision}

    @torch.inference_mode()
    def probabilities(self, views: torch.Tensor) -> torch.Tensor:
        """Mean over teachers of softmax(logits / T) for a [V, C, H, W] float tensor; float32 on the CPU."""
        views = views.to(self.device, non_blocking=True)
        total = None
        for teacher in self.teachers:
            probs = torch.softmax(teacher.images(views) / self.temperature, dim=-1)
            total = probs if total is None else total + probs
        return (total / len(self.teachers)).cpu()

    def _score(self, samples: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(top-k values, ids) of each sample's views."""
        values, ids = sparsify(self.probabilities(torch.cat([s["views"] for s in samples])), self.top_k)
        ends = list(itertools.accumulate(len(s["views"]) for s in samples))[:-1]
        return list(zip(np.split(values, ends), np.split(ids, ends)))

    def __call__(self, batch: Batch) -> Batch:
        if not batch.samples:
            return batch
        kept, failed = run_isolated(self.name, batch.samples, self._score)  # one bad sample costs only itself
        for sample, (values, ids) in kept:
            sample.pop("views")
            sample["values"], sample["ids"] = values, ids
        return Batch([sample for sample, _ in kept], list(batch.errors) + failed)
