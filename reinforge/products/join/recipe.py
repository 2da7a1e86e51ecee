"""The join recipe: reinforcement-only shards + their image pool, by uid."""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field

from reinforge.formats.recipe import Recipe, Strict
from reinforge.products.reshard.recipe import ReshardInput


class JoinInput(Strict):
    path: str = Field(description="reinforcement-only DataCompDR shards (no images): a glob or brace pattern")
    dr_config: Optional[str] = Field(
        None, description="their trainer config JSON (reinforce.image_augmentation tells which slot is a crop "
                          "box); default: dr_config.json of the run whose shards/ folder holds them")


class JoinRecipe(Recipe):
    """Reinforcement-only shards + the DataComp image shards they came from, by uid -> trainable shards."""
    pipeline: ClassVar[str] = "reinforge.products.join.pipeline:JoinPipeline"
    product: Literal["join"] = "join"
    input: JoinInput
    images: ReshardInput = Field(description="the image pool: DataComp {:08d}.tar shards (jpg + txt + json uid)")
    caption_member: str = Field("txt", description="ground-truth caption member of the image shards")
    max_error_fraction: float = Field(1.0, ge=0, le=1, description="a task fails above this fraction of refused "
                                      "samples; default never: every refusal is counted in errors/<task>.jsonl")
