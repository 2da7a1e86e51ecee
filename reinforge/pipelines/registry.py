"""Recipe product name -> pipeline class."""
from __future__ import annotations

from pydantic import BaseModel

from reinforge.pipelines.base import Pipeline


def build_pipeline(recipe: BaseModel) -> Pipeline:
    if recipe.product == "imagenet_plus":
        from reinforge.pipelines.imagenet_plus import ImageNetPlusPipeline
        return ImageNetPlusPipeline(recipe)
    if recipe.product == "mobileclip_dr":
        from reinforge.pipelines.mobileclip_dr import MobileCLIPPipeline
        return MobileCLIPPipeline(recipe)
    if recipe.product == "reshard":
        from reinforge.pipelines.reshard import ReshardPipeline
        return ReshardPipeline(recipe)
    raise ValueError(f"unknown product {recipe.product!r}")
