"""The MobileCLIP (DataCompDR / DFNDR) recipe: captioners, CLIP teachers, how embeddings are stored."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_serializer, model_validator

from reinforge.formats.recipe import Augmentation, InputSpec, Precision, Recipe, Strict
from reinforge.models.specs import CaptionerSpec, teacher_spec

# image-text teachers the MobileCLIP trainer rebuilds with open_clip (dr_config.json model_name)
ClipTeacher = teacher_spec("open_clip", ("open_clip",), "mobileclip_dr teachers")


class DRStorage(Strict):
    format: Literal["npz", "pth.gz"] = "npz"
    dtype: Precision = Field("float16", description="npz: float32/float16; pth.gz: bfloat16 (as DataCompDR)")
    layout: Literal["legacy", "dfndr"] = Field(
        "legacy", description="legacy: text_emb = [GT rows + synthetic rows] (one captioner); dfndr: <syn_key>_emb")

    codec: str = Field("none", description="none: npz / pth.gz as above (what Apple's trainer reads); quant or "
                       "int8_row: a smaller `qemb.npz` member only reinforge's readers decode (formats.codecs); "
                       "`reinforge export datacompdr` re-expands such a run to format/dtype")
    codec_params: dict[str, Any] = Field({}, description="the codec's parameters, e.g. {step: 0.000488, mean_grid: 64} for quant")

    @model_validator(mode="after")
    def _check(self) -> "DRStorage":
        if self.format == "npz" and self.dtype == "bfloat16":
            raise ValueError("npz cannot hold bfloat16: use format pth.gz, or dtype float16/float32")
        from reinforge.formats.codecs import NONE, make_codec
        if self.codec != NONE:
            make_codec(self.codec, self.codec_params)  # ValueError naming a bad name or parameter
        elif self.codec_params:
            raise ValueError("codec_params given with codec none")
        return self

    @model_serializer(mode="wrap")
    def _omit_no_codec(self, handler):
        # without a codec, recipes, digests and dr_config.json stay what they were before codecs existed
        data = handler(self)
        if self.codec == "none" and not self.codec_params:
            data.pop("codec", None)
            data.pop("codec_params", None)
        return data


class MobileCLIPRecipe(Recipe):
    """MobileCLIP multi-modal reinforcement (DataCompDR / DFNDR shards, FORMATS §2)."""
    pipeline: ClassVar[str] = "reinforge.products.mobileclip_dr.pipeline:MobileCLIPPipeline"
    product: Literal["mobileclip_dr"]
    seed: int = 0
    input: InputSpec
    mode: Literal["both", "captions", "embeddings"] = "both"
    caption_member: str = Field("txt", description="ground-truth caption member of the input shards")
    augmentation: Augmentation
    captioners: list[CaptionerSpec] = []
    teachers: list[ClipTeacher] = []
    storage: DRStorage = DRStorage()
    keep_images: bool = Field(True, description="write jpg + txt so the shard is trainable as written")

    @model_validator(mode="after")
    def _check_mode(self) -> "MobileCLIPRecipe":
        if self.input.format != "webdataset":
            raise ValueError("input.format: mobileclip_dr reads webdataset shards (jpg + txt + json uid)")
        if self.mode in ("both", "captions") and not self.captioners:
            raise ValueError(f"captioners: mode {self.mode!r} needs at least one captioner")
        if self.mode in ("both", "embeddings") and not self.teachers:
            raise ValueError(f"teachers: mode {self.mode!r} needs at least one CLIP teacher")
        keys = [c.syn_key for c in self.captioners]
        if len(set(keys)) != len(keys):
            raise ValueError(f"captioners: synthetic caption keys collide: {keys} (set distinct `suffix`es)")
        if self.storage.layout == "legacy" and len(keys) > 1:
            raise ValueError("storage.layout: legacy holds one captioner's captions; use dfndr for several")
        if "normalize" in self.augmentation.image_augmentation:
            raise ValueError("augmentation.image_augmentation.normalize: each CLIP teacher normalises with "
                             "its own mean/std; remove it from the shared augmentation")
        return self
