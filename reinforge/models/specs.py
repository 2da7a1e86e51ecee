"""What a recipe says about a model: a teacher of some `kind` (a timm model, an open_clip CLIP), a CoCa
captioner, a pool embedding encoder.

A teacher spec is one of TEACHER_SPECS, chosen by its `kind`. Each place in a recipe that holds
teachers has a default kind (imagenet_plus: timm, mobileclip_dr: open_clip), so recipes written
before kinds existed parse, dump and digest as they always did: `kind` is written out only when
it differs from the place's default, and a place that cannot use a kind says so in one line.
Nothing here imports torch or a model library: parsing a recipe loads no model.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional, Union

from pydantic import Field, ValidationError, WrapValidator, field_validator, model_serializer, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from reinforge.formats.recipe import Precision, Strict


class KindSpec(Strict):
    """A teacher spec; its `kind` is written out only when it was given (see teacher_spec)."""
    kind: str
    text_tower: ClassVar[bool] = False  # texts(list[str]) -> embeddings

    @model_serializer(mode="wrap")
    def _omit_implied_kind(self, handler):
        data = handler(self)
        if "kind" not in self.model_fields_set:
            data.pop("kind", None)
        return data


class TimmTeacherSpec(KindSpec):
    """A timm classifier (its logits) or backbone (its pooled features)."""
    kind: Literal["timm"] = "timm"
    model: str = Field(description="timm model name")
    pretrained: bool = False
    checkpoint: Optional[str] = Field(None, description="local/fsspec path or pkg:<package>/<file>; loaded with weights_only")
    checkpoint_key_map: Literal["exact", "positional"] = Field(
        "exact", description="positional: match tensors by order and shape (checkpoints from other ports)")
    num_classes: Optional[int] = Field(None, ge=2)
    batch_size: int = Field(64, ge=1)


class OpenClipTeacherSpec(KindSpec):
    """An open_clip image-text model; embeddings are L2-normalised per teacher, then concatenated."""
    kind: Literal["open_clip"] = "open_clip"
    text_tower: ClassVar[bool] = True
    model: str
    pretrained: Optional[str] = None
    batch_size: int = Field(64, ge=1)
    logit_scale: Optional[float] = Field(None, gt=0, description="default: the model's own (100 for random init)")
    precision: Precision = "float32"


# kind -> spec; the loaders of each kind are in models/teacher.py LOADERS
TEACHER_SPECS: dict[str, type[KindSpec]] = {"timm": TimmTeacherSpec, "open_clip": OpenClipTeacherSpec}
TeacherSpec = Union[TimmTeacherSpec, OpenClipTeacherSpec]


def _kind_error(message: str, kind) -> ValidationError:
    """An error located at `kind`, so the recipe's message names e.g. teachers.0.kind."""
    return ValidationError.from_exception_data("TeacherSpec", [InitErrorDetails(
        type=PydanticCustomError("teacher_kind", message), loc=("kind",), input=kind)])


def check_kind(kind) -> str:
    if kind not in TEACHER_SPECS:
        raise ValueError(f"unknown teacher kind {kind!r}; known: {', '.join(sorted(TEACHER_SPECS))}")
    return kind


def teacher_spec(default: str, accepts: tuple[str, ...], role: str):
    """The field type of a place holding a teacher: `kind` defaults to `default` there and must be one
    of `accepts` (else: "<role> must be of kind ..."). The default kind is never written out."""
    assert default in accepts and all(kind in TEACHER_SPECS for kind in accepts)

    def pick(value, handler):
        if isinstance(value, KindSpec):
            kind, fields = value.kind, value.model_dump() | {"kind": value.kind}
        elif isinstance(value, dict):
            kind, fields = value.get("kind", default), dict(value)
        else:
            raise PydanticCustomError("teacher_type", "Input should be a mapping (a teacher spec)")
        if kind not in TEACHER_SPECS:
            raise _kind_error(f"unknown teacher kind {kind!r}; known: {', '.join(sorted(TEACHER_SPECS))}", kind)
        if kind not in accepts:
            raise _kind_error(f"{role} must be of kind {' or '.join(accepts)}, not {kind!r}", kind)
        if kind == default:
            fields.pop("kind", None)  # implied here: dumps and digests stay as before kinds existed
        return TEACHER_SPECS[kind].model_validate(fields)

    return Annotated[TeacherSpec, WrapValidator(pick)]


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


class EmbedEncoder(Strict):
    """The image encoder of a pool embedding: a teacher of any kind (an open_clip model, also its text
    tower; a timm backbone's pooled features). Its fields are those of every kind side by side, as
    run.json has always recorded them; teacher() is the spec of its kind."""
    kind: str = Field("open_clip", description="a teacher kind: open_clip or timm")
    model: str = Field(description="open_clip name / hf-hub: / local-dir:, or a timm model name")
    pretrained: Optional[str] = Field(None, description="open_clip: tag, hf-hub: id or checkpoint; timm: unused")
    checkpoint: Optional[str] = Field(None, description="timm: local/fsspec path or pkg:<package>/<file>")
    checkpoint_key_map: Literal["exact", "positional"] = "exact"
    image_size: Optional[int] = Field(None, ge=8, description="timm: input size (default: the model's); open_clip: its own")
    batch_size: int = Field(64, ge=1)
    precision: Precision = "float32"
    text: bool = Field(False, description="open_clip: also embed the caption member (text_emb)")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        return check_kind(kind)

    @model_validator(mode="after")
    def _check(self) -> "EmbedEncoder":
        if self.text and not TEACHER_SPECS[self.kind].text_tower:
            raise ValueError(f"text: a {self.kind} model has no text tower; use an open_clip encoder")
        if self.kind == "timm" and self.pretrained:
            raise ValueError("pretrained: timm weights come from `checkpoint`")
        return self

    def teacher(self) -> TeacherSpec:
        """The spec of this encoder's kind, from the fields that kind has (the others do not apply to it)."""
        spec = TEACHER_SPECS[self.kind]
        fields = {name: value for name, value in self.model_dump(exclude={"kind"}).items()
                  if name in spec.model_fields and value is not None}
        if not self.pretrained:
            fields.pop("pretrained", None)  # timm's is a flag; a falsy open_clip tag is no tag
        return spec.model_validate(fields)
