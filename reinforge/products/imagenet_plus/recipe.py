"""The ImageNet+ recipe: timm teachers' sparse probabilities of N stored augmentations."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from reinforge.formats.recipe import Augmentation, InputSpec, Recipe
from reinforge.models.specs import teacher_spec

# the ensemble averages class probabilities: every teacher is a classifier
ClassifierTeacher = teacher_spec("timm", ("timm",), "imagenet_plus teachers")


class ImageNetPlusRecipe(Recipe):
    pipeline: ClassVar[str] = "reinforge.products.imagenet_plus.pipeline:ImageNetPlusPipeline"
    product: Literal["imagenet_plus"] = "imagenet_plus"
    seed: int = 0
    input: InputSpec
    augmentation: Augmentation
    teachers: list[ClassifierTeacher] = Field(min_length=1)
    temperature: float = Field(1.0, gt=0, description="softmax temperature of each teacher before averaging")
    top_k: int = Field(10, ge=1)
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    compress_params: bool = Field(True, description="store paug.json.gz instead of paug.json")

    @field_validator("augmentation")
    @classmethod
    def _check_augmentation(cls, value: Augmentation) -> Augmentation:
        from reinforge.formats.augment import Augmenter
        Augmenter(value.image_augmentation)  # raises ValueError naming the bad transform field
        return value

    @model_validator(mode="after")
    def _check_classes(self) -> "ImageNetPlusRecipe":
        declared = {t.num_classes for t in self.teachers if t.num_classes is not None}
        if len(declared) > 1:
            raise ValueError(f"teachers declare different num_classes {sorted(declared)}")
        return self
