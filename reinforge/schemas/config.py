"""Recipes: one YAML file validated into typed models. Errors name the offending field in one line.

Dotted overrides (`--set teachers.0.batch_size=64`) are applied to the raw YAML before validation,
with values parsed as YAML scalars. The digest covers everything that can change output bytes;
where to write (output), how big the pool is (resources) and the cluster address do not.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal, Optional

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from reinforge.schemas.image import DEFAULT_MAX_PIXELS


class ConfigError(ValueError):
    """Bad recipe or override: the message is one line naming the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(Strict):
    """Per-actor resources of the model-stage pool; not part of the digest."""
    num_actors: Optional[int] = Field(None, ge=1, description="pool size; default: what the cluster fits")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    tasks_in_flight_per_actor: int = Field(2, ge=1)
    overlap_prep: Optional[bool] = Field(
        None, description="prepare the next batch (decode, augment) in a thread while the model runs; "
                          "default: on when the actor has a GPU")
    object_store_memory_mb: int = Field(1024, ge=100, description="cap for an embedded local Ray")
    runner: Literal["auto", "ray", "local"] = Field(
        "auto", description="where tasks run: ray (an actor pool), local (no Ray: one task in the driver's process, "
                            "more on num_actors (default: CPUs / cpus_per_actor) worker processes of this machine), "
                            "auto = local for a job of exactly one task with no cluster address and no GPU, else "
                            "ray (runner.runs_in_process); the outputs are the same bytes")


class InputSpec(Strict):
    format: Literal["imagefolder", "webdataset"]
    path: str = Field(description="ImageFolder root, or shard URL(s): a glob or brace pattern, fsspec URLs allowed")
    samples_per_task: int = Field(1000, ge=1, description="ImageFolder images per task (shards are one task each)")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)


class Teacher(Strict):
    model: str = Field(description="timm model name")
    pretrained: bool = False
    checkpoint: Optional[str] = Field(None, description="local/fsspec path or pkg:<package>/<file>; loaded with weights_only")
    checkpoint_key_map: Literal["exact", "positional"] = Field(
        "exact", description="positional: match tensors by order and shape (checkpoints from other ports)")
    num_classes: Optional[int] = Field(None, ge=2)
    batch_size: int = Field(64, ge=1)


class Augmentation(Strict):
    num_samples: int = Field(10, ge=1, description="N stored augmentations per image")
    image_augmentation: dict[str, Any]
    backend: Literal["pil", "tensor"] = Field(
        "pil", description="how views are rendered from the parameters: pil = torchvision's functional API on "
                           "the PIL image, as Apple's ml-dr and ml-mobileclip trainers replay them (their view is "
                           "the one the teachers must score); tensor = on uint8 tensors (reinforge's reader, GPU)")
    samples_per_batch: int = Field(
        8, ge=1, description="images augmented together; MixUp/CutMix partners come from the same batch. "
                             "Memory: samples_per_batch x num_samples views are held at once")


class Recipe(Strict):
    """What every runner product has: where to write, the error budget, the pool's resources."""
    output: str
    max_error_fraction: float = Field(0.1, ge=0, le=1, description="a task fails above this fraction of skipped samples")
    resources: Resources = Resources()


class ImageNetPlusRecipe(Recipe):
    product: Literal["imagenet_plus"] = "imagenet_plus"
    seed: int = 0
    input: InputSpec
    augmentation: Augmentation
    teachers: list[Teacher] = Field(min_length=1)
    temperature: float = Field(1.0, gt=0, description="softmax temperature of each teacher before averaging")
    top_k: int = Field(10, ge=1)
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    compress_params: bool = Field(True, description="store paug.json.gz instead of paug.json")

    @field_validator("augmentation")
    @classmethod
    def _check_augmentation(cls, value: Augmentation) -> Augmentation:
        from reinforge.schemas.augment import Augmenter
        Augmenter(value.image_augmentation)  # raises ValueError naming the bad transform field
        return value

    @model_validator(mode="after")
    def _check_classes(self) -> "ImageNetPlusRecipe":
        declared = {t.num_classes for t in self.teachers if t.num_classes is not None}
        if len(declared) > 1:
            raise ValueError(f"teachers declare different num_classes {sorted(declared)}")
        return self


Precision = Literal["float32", "bfloat16", "float16"]


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


class DRStorage(Strict):
    format: Literal["npz", "pth.gz"] = "npz"
    dtype: Precision = Field("float16", description="npz: float32/float16; pth.gz: bfloat16 (as DataCompDR)")
    layout: Literal["legacy", "dfndr"] = Field(
        "legacy", description="legacy: text_emb = [GT rows + synthetic rows] (one captioner); dfndr: <syn_key>_emb")

    codec: str = Field("none", description="none: npz / pth.gz as above (what Apple's trainer reads); quant or "
                       "int8_row: a smaller `qemb.npz` member only reinforge's readers decode (schemas.codecs); "
                       "`reinforge export datacompdr` re-expands such a run to format/dtype")
    codec_params: dict[str, Any] = Field({}, description="the codec's parameters, e.g. {step: 0.000244} for quant")

    @model_validator(mode="after")
    def _check(self) -> "DRStorage":
        if self.format == "npz" and self.dtype == "bfloat16":
            raise ValueError("npz cannot hold bfloat16: use format pth.gz, or dtype float16/float32")
        from reinforge.schemas.codecs import NONE, make_codec
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
    product: Literal["mobileclip_dr"]
    seed: int = 0
    input: InputSpec
    mode: Literal["both", "captions", "embeddings"] = "both"
    caption_member: str = Field("txt", description="ground-truth caption member of the input shards")
    augmentation: Augmentation
    captioners: list[CaptionerSpec] = []
    teachers: list[ClipTeacherSpec] = []
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


class ReshardInput(Strict):
    path: str = Field(description="pool shards: a glob or brace pattern of DataComp {:08d}.tar, fsspec URLs allowed")
    uid_field: str = Field("uid", description="field of each sample's json member holding its 32-hex uid")


class ReshardRecipe(Recipe):
    """DataComp resharder: the samples of a uid subset (with multiplicities) into new {:08d}.tar shards."""
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
    dry_run: bool = Field(False, description="plan and report; write no shards, no plan, no run files")

    @model_validator(mode="after")
    def _blur_needs_metadata(self):
        if (self.apply_blur or self.inject_blur_metadata) and not self.blur_metadata:
            raise ValueError("apply_blur / inject_blur_metadata need blur_metadata (the parquet(s) with face_bboxes)")
        return self


class JoinInput(Strict):
    path: str = Field(description="reinforcement-only DataCompDR shards (no images): a glob or brace pattern")
    dr_config: Optional[str] = Field(
        None, description="their trainer config JSON (reinforce.image_augmentation tells which slot is a crop "
                          "box); default: dr_config.json of the run whose shards/ folder holds them")


class JoinRecipe(Recipe):
    """Reinforcement-only shards + the DataComp image shards they came from, by uid -> trainable shards."""
    product: Literal["join"] = "join"
    input: JoinInput
    images: ReshardInput = Field(description="the image pool: DataComp {:08d}.tar shards (jpg + txt + json uid)")
    caption_member: str = Field("txt", description="ground-truth caption member of the image shards")
    max_error_fraction: float = Field(1.0, ge=0, le=1, description="a task fails above this fraction of refused "
                                      "samples; default never: every refusal is counted in errors/<task>.jsonl")


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


class EmbedPoolRecipe(Recipe):
    """Embeddings of a DataComp-style pool (jpg + json uid), one Parquet sidecar per shard."""
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


RECIPES: dict[str, type[BaseModel]] = {"imagenet_plus": ImageNetPlusRecipe, "mobileclip_dr": MobileCLIPRecipe,
                                       "join": JoinRecipe, "reshard": ReshardRecipe, "embed_pool": EmbedPoolRecipe}
NON_SEMANTIC_FIELDS = ("output", "resources", "dry_run")  # dry_run: a plan-only look at the same recipe


def apply_override(raw: dict, dotted: str) -> None:
    if "=" not in dotted:
        raise ConfigError(f"--set {dotted!r}: expected key.path=value")
    path, _, text = dotted.partition("=")
    value = yaml.safe_load(text) if text else ""
    node: Any = raw
    parts = path.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {path}: no list index {part!r} at {'.'.join(parts[:i]) or '<root>'}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {path}: {'.'.join(parts[:i])} is not a mapping or list")


def format_validation_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "<root>"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"config error: {where}: {err['msg']}{more}"


def parse_recipe(raw: Any, overrides: tuple[str, ...] = ()) -> BaseModel:
    if not isinstance(raw, dict):
        raise ConfigError("config error: the recipe must be a YAML mapping")
    for dotted in overrides:
        apply_override(raw, dotted)
    product = raw.get("product", "imagenet_plus")
    if product not in RECIPES:
        raise ConfigError(f"config error: product: unknown {product!r}; known: {sorted(RECIPES)}")
    try:
        return RECIPES[product].model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def parse_yaml(text: str) -> Any:
    """Safe-loaded YAML; a syntax error is one ConfigError line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: invalid YAML: {' '.join(str(exc).split())}") from None


def load_recipe(text: str, overrides: tuple[str, ...] = ()) -> BaseModel:
    return parse_recipe(parse_yaml(text), overrides)


def semantic_dict(recipe: BaseModel) -> dict:
    omit = {name for name in getattr(recipe, "DIGEST_OMITS_DEFAULTS", ())
            if getattr(recipe, name) == type(recipe).model_fields[name].get_default(call_default_factory=True)}
    return recipe.model_dump(mode="json", exclude=set(NON_SEMANTIC_FIELDS) | omit)


def config_digest(recipe: BaseModel) -> str:
    canonical = json.dumps(semantic_dict(recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
