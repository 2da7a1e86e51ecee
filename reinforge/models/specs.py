"""What a recipe says about a model: a timm classifier, an open_clip CLIP or CoCa, an embedding encoder."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from reinforge.formats.recipe import Precision, Strict


class Teacher(Strict):
    model: str = Field(description="timm model name")
    pretrained: bool = False
    checkpoint: Optional[str] = Field(None, description="local/fsspec path or pkg:<package>/<file>; loaded with weights_only")
    checkpoint_key_map: Literal["exact", "positional"] = Field(
        "exact", description="positional: match tensors by order and shape (checkpoints from other ports)")
    num_classes: Optional[int] = Field(None, ge=2)
    batch_size: int = Field(64, ge=1)


class CaptionerSpec(Strict):
    """An open_clip CoCa captioner; its captions go to syn.json under `syn_text[_<suffix>]`."""
    model: str = Field(description="open_clip CoCa name, e.g. coca_ViT-L-14")
    pretrained: Optional[str] = Field(None, description="tag, hf-hub: id, local checkpoint or pkg: path; None = random init")
    num_captions: int = Field(5, ge=1)
    generation: Literal["top_p", "beam_search"] = "top_p"
    top_p: float = Field(0.9, gt=0, le=1)
    temperature: float = Field(1.0, gt=0)
    num_beams: int = Field(6, ge=1)
    max_length: int = Field(30, ge=2)
    min_length: int = Field(5, ge=0)
    suffix: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_]+$")
    batch_size: int = Field(32, ge=1)
    precision: Precision = "float32"

    @model_validator(mode="after")
    def _check_lengths(self) -> "CaptionerSpec":
        if self.max_length <= self.min_length:
            raise ValueError(f"max_length {self.max_length} must exceed min_length {self.min_length}")
        if self.generation == "beam_search" and self.num_beams < self.num_captions:
            raise ValueError(f"beam search keeps num_beams={self.num_beams} beams, fewer than "
                             f"num_captions={self.num_captions}")
        return self

    @property
    def syn_key(self) -> str:
        return "syn_text" if self.suffix is None else f"syn_text_{self.suffix}"


class ClipTeacherSpec(Strict):
    """An open_clip image-text teacher; embeddings are L2-normalised per teacher, then concatenated."""
    model: str
    pretrained: Optional[str] = None
    batch_size: int = Field(64, ge=1)
    logit_scale: Optional[float] = Field(None, gt=0, description="default: the model's own (100 for random init)")
    precision: Precision = "float32"


class EmbedEncoder(Strict):
    """The image encoder of a pool embedding: an open_clip model (also its text tower) or a timm backbone."""
    kind: Literal["open_clip", "timm"] = "open_clip"
    model: str = Field(description="open_clip name / hf-hub: / local-dir:, or a timm model name")
    pretrained: Optional[str] = Field(None, description="open_clip: tag, hf-hub: id or checkpoint; timm: unused")
    checkpoint: Optional[str] = Field(None, description="timm: local/fsspec path or pkg:<package>/<file>")
    checkpoint_key_map: Literal["exact", "positional"] = "exact"
    image_size: Optional[int] = Field(None, ge=8, description="timm: input size (default: the model's); open_clip: its own")
    batch_size: int = Field(64, ge=1)
    precision: Precision = "float32"
    text: bool = Field(False, description="open_clip: also embed the caption member (text_emb)")

    @model_validator(mode="after")
    def _check(self) -> "EmbedEncoder":
        if self.kind == "timm" and self.text:
            raise ValueError("text: a timm backbone has no text tower; use an open_clip encoder")
        if self.kind == "timm" and self.pretrained:
            raise ValueError("pretrained: timm weights come from `checkpoint`")
        return self
