"""Draw N replayable augmentations per image and render them for the teachers.

Every draw comes from random.Random(entry_seed(seed, key, n)), so an image's augmentations do not
depend on batching, worker or order. A mixing partner is another image of the same batch, chosen
by that generator and recorded by key (the reader finds it by key).
"""
from __future__ import annotations

import random

import torch

from reinforge.schemas.augment import Augmenter, entry_seed
from reinforge.stages.base import Batch, Stage, sample_error


class Augment(Stage):
    name = "augment"

    def __init__(self, image_augmentation: dict, num_samples: int, seed: int):
        self.augmenter = Augmenter(image_augmentation)
        self.num_samples = num_samples
        self.seed = seed

    def _views(self, sample: dict, batch: list[dict]) -> tuple[list, torch.Tensor]:
        entries, views = [], []
        image = sample["image"]
        for n in range(self.num_samples):
            rng = random.Random(entry_seed(self.seed, sample["__key__"], n))
            partner = None
            if self.augmenter.uses_partner:
                others = [s for s in batch if s is not sample] or [sample]
                partner = others[rng.randrange(len(others))]
            entry = self.augmenter.sample(
                rng, tuple(image.shape[-2:]),
                partner=partner["__key__"] if partner else None,
                partner_hw=tuple(partner["image"].shape[-2:]) if partner else None)
            views.append(self.augmenter.apply(entry, image, partner["image"] if partner else None))
            entries.append(entry)
        return entries, torch.stack(views)

    def __call__(self, batch: Batch) -> Batch:
        kept, errors = [], list(batch.errors)
        for sample in batch.samples:
            try:
                sample["entries"], sample["views"] = self._views(sample, batch.samples)
                kept.append(sample)
            except Exception as exc:  # noqa: BLE001
                errors.append(sample_error(sample, self.name, exc))
        return Batch(kept, errors)
