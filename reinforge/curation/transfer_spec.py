"""The transfer-set config (configs/transfer_set.yaml): targets, selection policy, decontamination."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, ValidationError, model_validator

from reinforge.formats.recipe import ConfigError, Strict, format_validation_error
from reinforge.models.specs import EmbedEncoder


class ImagesSpec(Strict):
    format: Literal["imagefolder", "webdataset"]
    path: str = Field(description="ImageFolder root (class = folder) or shard pattern (class = `cls` member)")


class PromptsSpec(Strict):
    classes: list[str] = Field(min_length=1)
    templates: list[str] = Field(["a photo of a {}."], min_length=1, description="averaged per class")


class DecontaminateSpec(Strict):
    images: Optional[ImagesSpec] = Field(None, description="evaluation images, embedded like the pool")
    embeddings: Optional[str] = Field(None, description="or their embeddings (run dir / parquet / DataComp)")
    threshold: float = Field(0.9, ge=-1, le=1, description="pool items this similar to any eval item are removed")

    @model_validator(mode="after")
    def _one(self) -> "DecontaminateSpec":
        if (self.images is None) == (self.embeddings is None):
            raise ValueError("give exactly one of images or embeddings")
        return self


class SelectionSpec(Strict):
    policy: Literal["knn", "mmr", "cluster"] = "knn"
    k: int = Field(100, ge=1, description="neighbours per query")
    min_similarity: float = Field(-1.0, ge=-1, le=1, description="neighbours below this are dropped")
    per_query: Optional[int] = Field(None, ge=1)
    per_class: Optional[int] = Field(None, ge=1)
    budget: Optional[int] = Field(None, ge=1, description="size of the transfer set at most")
    mmr_lambda: float = Field(0.7, ge=0, le=1)
    clusters: Optional[int] = Field(None, ge=1, description="cluster policy: k-means clusters (default sqrt(candidates))")
    near_duplicate: Optional[float] = Field(0.98, ge=-1, le=1, description="inner product at/above which two "
                                            "pool items are one; null: off")
    dedup_sha256: bool = True


class ReshardSpec(Strict):
    pool: str = Field(description="the pool's shards (jpg + txt + json uid)")
    samples_per_shard: int = Field(10000, ge=1)


class TransferSetSpec(Strict):
    index: str = Field(description="folder written by `reinforge index`")
    output: str
    seed: int = 0
    queries: Optional[ImagesSpec] = None
    prompts: Optional[PromptsSpec] = None
    encoder: Optional[EmbedEncoder] = Field(None, description="default: the encoder of the pool's embed run")
    selection: SelectionSpec = SelectionSpec()
    decontaminate: Optional[DecontaminateSpec] = None
    reshard: Optional[ReshardSpec] = None

    @model_validator(mode="after")
    def _one_target(self) -> "TransferSetSpec":
        if (self.queries is None) == (self.prompts is None):
            raise ValueError("give exactly one of queries (images) or prompts (class names)")
        return self


def parse_transfer_spec(raw) -> TransferSetSpec:
    if not isinstance(raw, dict):
        raise ConfigError("config error: the transfer-set config must be a YAML mapping")
    try:
        return TransferSetSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
