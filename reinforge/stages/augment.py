"""Draw N replayable augmentations per image and render them for the teachers.

Every draw comes from random.Random(entry_seed(seed, key, n)), so an image's augmentations do not
depend on batching, worker or order. A mixing partner is another image of the same batch, chosen
by that generator and recorded by key (the reader finds it by key).
"""
from __future__ import annotations

import random

import torch

from reinforge.schemas.augment import Augmenter, entry_seed
from reinforge.stages.base import Batch, MapStage


class Augment(MapStage):
    name = "augment"

    def __init__(self, image_augmentation: dict, num_samples: int, seed: int, threads: int = 1):
        self.augmenter = Augmenter(image_augmentation)
        self.num_samples = num_samples
        self.seed = seed
        self.threads = threads
        self._batch: list[dict] = []

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

    def process(self, sample: dict) -> dict:
        sample["entries"], sample["views"] = self._views(sample, self._batch)
        return sample

    def __call__(self, batch: Batch) -> Batch:
        self._batch = batch.samples  # the mixing partners; read-only while samples are processed
        try:
            return super().__call__(batch)
        finally:
            self._batch = []
