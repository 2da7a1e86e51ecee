"""The DataComp resharder recipe: a uid subset (with multiplicities) of a pool into new shards."""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator

from reinforge.formats.recipe import Recipe, Strict


class ReshardInput(Strict):
    path: str = Field(description="pool shards: a glob or brace pattern of DataComp {:08d}.tar, fsspec URLs allowed")
    uid_field: str = Field("uid", description="field of each sample's json member holding its 32-hex uid")


class ReshardRecipe(Recipe):
    """DataComp resharder: the samples of a uid subset (with multiplicities) into new {:08d}.tar shards."""
    pipeline: ClassVar[str] = "reinforge.products.reshard.pipeline:ReshardPipeline"
    # options added after runs existed: left out of the digest at their defaults, so those runs resume
    DIGEST_OMITS_DEFAULTS: ClassVar[tuple[str, ...]] = (
        "first_shard", "num_shards", "shuffle_bufsize", "blur_metadata", "apply_blur", "inject_blur_metadata",
        "reencode_webp_quality", "cls_file")
    product: Literal["reshard"] = "reshard"
    seed: int = Field(0, description="spreads repeated copies; same seed => same shards")
    subset: str = Field(description="DataComp subset .npy (u8,u8, sorted)")
    counts: str = Field("auto", description="multiplicities: auto (<subset stem>.counts.npy if present), none, or a path")
    input: ReshardInput
    samples_per_shard: int = Field(10000, ge=1)
    allow_missing: bool = Field(False, description="skip (and report) subset uids absent from the pool instead of failing")
    max_error_fraction: float = Field(0.0, ge=0, le=1, description="a task fails above this fraction of unreadable samples")
    # DataComp resharder.py options (same names, same meaning; see README "resharding")
    first_shard: int = Field(0, ge=0, description="use only pool shards numbered >= this ({:08d}.tar names)")
    num_shards: Optional[int] = Field(None, ge=1, description="use only pool shards numbered first_shard .. "
                                      "first_shard + num_shards - 1; default: all from first_shard on")
    shuffle_bufsize: int = Field(0, ge=0, description="shuffle each output shard's samples through a buffer of "
                                 "this many (webdataset's algorithm, seeded by seed and shard); 0: pool read order")
    blur_metadata: list[str] = Field(default_factory=list, description="metadata parquet(s) with uid + face_bboxes "
                                     "(paths, globs, folders) or DataComp's --blur-metadata-map JSON")
    apply_blur: bool = Field(False, description="blur the face_bboxes of each sample; the image becomes a webp member")
    inject_blur_metadata: bool = Field(False, description="add face_bboxes to each json member that has boxes")
    reencode_webp_quality: int = Field(100, ge=1, le=100, description="WebP quality of blurred images")
    cls_file: Optional[str] = Field(None, description="ml-tic-clip's uid2classid pickle (or JSON {uid: class id}): "
                                    "every output sample gets a cls member")
    dry_run: bool = Field(False, description="assign and report; write no shards, no assignment, no run files")

    @model_validator(mode="after")
    def _blur_needs_metadata(self):
        if (self.apply_blur or self.inject_blur_metadata) and not self.blur_metadata:
            raise ValueError("apply_blur / inject_blur_metadata need blur_metadata (the parquet(s) with face_bboxes)")
        return self
