"""ImageNet+ (Dataset Reinforcement for classification): N replayable augmentations per image, each
with the teacher ensemble's top-k probabilities, written as self-contained WebDataset shards."""
from __future__ import annotations

import json

from reinforge.formats.augment import Augmenter, replay_augmenter
from reinforge.formats.limits import Limits, declared_limits
from reinforge.formats.sources import ImageFolderSource, WebDatasetSource
from reinforge.io.manifest import RunLayout
from reinforge.io.storage import write_bytes
from reinforge.products.imagenet_plus.encode import EncodeImageNetPlus
from reinforge.products.imagenet_plus.recipe import ImageNetPlusRecipe
from reinforge.runtime.pipeline import Pipeline
from reinforge.stages.augment import Augment
from reinforge.stages.base import Stage
from reinforge.stages.decode import DecodeImage, ParseLabel
from reinforge.stages.teachers import TeacherEnsemble, ensemble_num_classes


def trainer_config(recipe: ImageNetPlusRecipe) -> dict:
    """The generation config a trainer needs to replay (ML-DR's `reinforce` block, plus provenance)."""
    return {
        "reinforce": {
            "image_augmentation": Augmenter(recipe.augmentation.image_augmentation).config(),
            "num_samples": recipe.augmentation.num_samples,
            "replay_backend": recipe.augmentation.backend,
            "topk": recipe.top_k,
            "temperature": recipe.temperature,
            "seed": recipe.seed,
        },
        "num_classes": ensemble_num_classes(recipe.teachers),
        "teachers": [t.model_dump(mode="json") for t in recipe.teachers],
        "format": "reinforge.imagenet_plus/1",
    }


class ImageNetPlusPipeline(Pipeline):
    def __init__(self, recipe: ImageNetPlusRecipe):
        self.recipe = recipe
        spec = recipe.input
        inputs = Limits.for_images(spec.max_image_pixels)
        self.source = (ImageFolderSource(spec.path, spec.samples_per_task, inputs.image)
                       if spec.format == "imagefolder" else WebDatasetSource(spec.path, inputs))

    def samples_per_batch(self) -> int:
        # fixed by the recipe, not by teacher batch sizes: mixing partners are drawn from this batch
        return self.recipe.augmentation.samples_per_batch

    def build_stages(self) -> list[Stage]:
        r = self.recipe
        teachers = TeacherEnsemble(r.teachers, r.top_k, r.temperature, r.precision)
        teachers.setup()  # num_classes comes from the loaded models
        threads = max(1, int(r.resources.cpus_per_actor))  # output does not depend on it
        return [
            DecodeImage(r.input.max_image_pixels, threads),
            ParseLabel(teachers.num_classes),
            Augment(r.augmentation.image_augmentation, r.augmentation.num_samples, r.seed, threads,
                    r.augmentation.backend),
            teachers,
            EncodeImageNetPlus(teachers.num_classes, r.compress_params),
        ]

    def sample_checker(self, layout: RunLayout):
        """validate: layout, N, k, class ids, probability mass, sha256, and that the first stored augmentation
        replays inside the image. Members inflate only within the bounds the config declares (N, k)."""
        from reinforge.formats.image import decode_rgb
        from reinforge.formats.imagenet_plus import decode_sample, sha256_hex
        from reinforge.io.runs import require_dr_config

        full = require_dr_config(layout.root)
        config = full["reinforce"]
        augmenter = replay_augmenter(config)
        n, k = config["num_samples"], config["topk"]
        max_pixels = self.max_image_pixels()
        limits = declared_limits(full, max_pixels)

        def check(members: dict) -> None:
            sample = decode_sample(members, limits)
            if sample.num_augmentations != n:
                raise ValueError(f"{sample.num_augmentations} augmentations, recipe says {n}")
            if sample.values.shape[1] != k and sample.values.shape[1] > k:
                raise ValueError(f"top-k width {sample.values.shape[1]} > {k}")
            if (sample.ids < 0).any() or sample.values.min() < 0 or (sample.values.sum(1) > 1.01).any():
                raise ValueError("negative class ids or probabilities, or more than unit mass")
            if sample.meta.get("sha256") != sha256_hex(sample.image):
                raise ValueError("sha256 in json does not match the image bytes")
            first = sample.entries[0]
            if not augmenter.uses_partner or first[0] is None:
                augmenter.apply(first, decode_rgb(sample.image, max_pixels))

        return check

    def prepare(self, layout: RunLayout) -> None:
        write_bytes(layout.dr_config, json.dumps(trainer_config(self.recipe), indent=1, sort_keys=True).encode())
