"""Every product's recipe by name; YAML (and --set overrides) parsed into the right one."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from reinforge.formats.recipe import ConfigError, apply_override, format_validation_error, parse_yaml
from reinforge.products.embed_pool.recipe import EmbedPoolRecipe
from reinforge.products.imagenet_plus.recipe import ImageNetPlusRecipe
from reinforge.products.join.recipe import JoinRecipe
from reinforge.products.mobileclip_dr.recipe import MobileCLIPRecipe
from reinforge.products.reshard.recipe import ReshardRecipe


RECIPES: dict[str, type[BaseModel]] = {"imagenet_plus": ImageNetPlusRecipe, "mobileclip_dr": MobileCLIPRecipe,
                                       "join": JoinRecipe, "reshard": ReshardRecipe, "embed_pool": EmbedPoolRecipe}


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


def load_recipe(text: str, overrides: tuple[str, ...] = ()) -> BaseModel:
    return parse_recipe(parse_yaml(text), overrides)
