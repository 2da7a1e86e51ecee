"""The embed_pool recipe: one encoder's embeddings of a pool, as Parquet sidecars."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from reinforge.formats.recipe import InputSpec, Recipe
from reinforge.models.specs import EmbedEncoder


class EmbedPoolRecipe(Recipe):
    """Embeddings of a DataComp-style pool (jpg + json uid), one Parquet sidecar per shard."""
    pipeline: ClassVar[str] = "reinforge.products.embed_pool.pipeline:EmbedPoolPipeline"
    product: Literal["embed_pool"] = "embed_pool"
    seed: int = 0
    input: InputSpec
    encoder: EmbedEncoder
    caption_member: str = Field("txt", description="caption member embedded when encoder.text")
    samples_per_batch: int = Field(64, ge=1, description="samples decoded together (the model batch is encoder.batch_size)")

    @model_validator(mode="after")
    def _check_input(self) -> "EmbedPoolRecipe":
        if self.input.format != "webdataset":
            raise ValueError("input.format: embed_pool reads webdataset pool shards (jpg + json uid)")
        return self
