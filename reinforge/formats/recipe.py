"""Recipe basics: one YAML file validated into typed models. Errors name the offending field in one line.

Dotted overrides (`--set teachers.0.batch_size=64`) are applied to the raw YAML before validation,
with values parsed as YAML scalars. The digest covers everything that can change output bytes;
where to write (output), how big the pool is (resources) and the cluster address do not.

Product recipes live with their products (products/<name>/recipe.py); the registry parses YAML
into them (products/registry.py).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reinforge.formats.image import DEFAULT_MAX_PIXELS


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
    # "module:Class" of the product's pipeline, imported when a run starts (runtime.pipeline.build_pipeline):
    # parsing a recipe never loads a model library
    pipeline: ClassVar[str]
    output: str
    max_error_fraction: float = Field(0.1, ge=0, le=1, description="a task fails above this fraction of skipped samples")
    resources: Resources = Resources()


Precision = Literal["float32", "bfloat16", "float16"]


NON_SEMANTIC_FIELDS = ("output", "resources", "dry_run")  # dry_run: a look at what the same recipe would do


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


def parse_yaml(text: str) -> Any:
    """Safe-loaded YAML; a syntax error is one ConfigError line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: invalid YAML: {' '.join(str(exc).split())}") from None


def semantic_dict(recipe: BaseModel) -> dict:
    omit = {name for name in getattr(recipe, "DIGEST_OMITS_DEFAULTS", ())
            if getattr(recipe, name) == type(recipe).model_fields[name].get_default(call_default_factory=True)}
    return recipe.model_dump(mode="json", exclude=set(NON_SEMANTIC_FIELDS) | omit)


def config_digest(recipe: BaseModel) -> str:
    canonical = json.dumps(semantic_dict(recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
