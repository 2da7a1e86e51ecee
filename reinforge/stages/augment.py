"""Draw N replayable augmentations per image and render them for the teachers.

Every draw comes from random.Random(entry_seed(seed, key, n)), so an image's augmentations do not
depend on batching, worker or order. A mixing partner is another image of the same batch, chosen
by that generator and recorded by key (the reader finds it by key). Views are rendered by the
recipe's replay backend (formats/augment.py), so the teachers score the view the consumer's
trainer will make from the stored entry.
"""
from __future__ import annotations

import random

import torch

from reinforge.formats.augment import Augmenter
from reinforge.formats.seeds import entry_seed
from reinforge.stages.base import Batch, MapStage


class Augment(MapStage):
    name = "augment"

    def __init__(self, image_augmentation: dict, num_samples: int, seed: int, threads: int = 1,
                 backend: str = "pil"):
        self.augmenter = Augmenter(image_augmentation, backend)
        self.num_samples = num_samples
        self.seed = seed
        self.threads = threads
        self._batch: list[dict] = []
        self._sources: dict[int, object] = {}

    def _source(self, sample: dict):
        """The sample's image in the backend's form, converted once per batch (it is lossless)."""
        if id(sample) not in self._sources:
            self._sources[id(sample)] = self.augmenter.source(sample["image"])
        return self._sources[id(sample)]

    def _views(self, sample: dict, batch: list[dict]) -> tuple[list, torch.Tensor]:
        entries, views = [], []
        image = self._source(sample)
        hw = tuple(sample["image"].shape[-2:])
        for n in range(self.num_samples):
            rng = random.Random(entry_seed(self.seed, sample["__key__"], n))
            partner = None
            if self.augmenter.uses_partner:
                others = [s for s in batch if s is not sample] or [sample]
                partner = others[rng.randrange(len(others))]
            entry = self.augmenter.sample(
                rng, hw, partner=partner["__key__"] if partner else None,
                partner_hw=tuple(partner["image"].shape[-2:]) if partner else None)
            views.append(self.augmenter.apply(entry, image, self._source(partner) if partner else None))
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
            self._batch, self._sources = [], {}
