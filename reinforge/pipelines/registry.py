"""Recipe product name -> pipeline class (imported on use: a product's models load only when it runs)."""
from __future__ import annotations

import importlib

from pydantic import BaseModel

from reinforge.pipelines.base import Pipeline

PIPELINES = {
    "imagenet_plus": "reinforge.pipelines.imagenet_plus:ImageNetPlusPipeline",
    "mobileclip_dr": "reinforge.pipelines.mobileclip_dr:MobileCLIPPipeline",
    "join": "reinforge.pipelines.join:JoinPipeline",
    "reshard": "reinforge.pipelines.reshard:ReshardPipeline",
    "embed_pool": "reinforge.pipelines.embed_pool:EmbedPoolPipeline",
}


def build_pipeline(recipe: BaseModel) -> Pipeline:
    if recipe.product not in PIPELINES:
        raise ValueError(f"unknown product {recipe.product!r}")
    module, _, name = PIPELINES[recipe.product].partition(":")
    return getattr(importlib.import_module(module), name)(recipe)
