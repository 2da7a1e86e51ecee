"""Every product by name, found from its folder: reinforge/products/<folder>/recipe.py defines one Recipe
subclass whose `product` literal names it. YAML (and --set overrides) is parsed into the right recipe, and
the tools ask a product for its optional parts (report.py, inspect_view.py) by the same name."""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from functools import cache
from types import ModuleType
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

import reinforge.products
from reinforge.formats.recipe import ConfigError, Recipe, apply_override, format_validation_error, parse_yaml


@cache
def recipes() -> dict[str, type[Recipe]]:
    """{product name: recipe class}, one per product folder, sorted by name."""
    found = {}
    for folder in pkgutil.iter_modules(reinforge.products.__path__):
        if not folder.ispkg:
            continue
        module = importlib.import_module(f"{reinforge.products.__name__}.{folder.name}.recipe")
        defined = [c for c in vars(module).values()
                   if isinstance(c, type) and issubclass(c, Recipe) and c.__module__ == module.__name__]
        if len(defined) != 1:
            raise TypeError(f"{module.__name__} defines {len(defined)} Recipe classes, a product folder needs one")
        (name,) = get_args(defined[0].model_fields["product"].annotation)
        found[name] = defined[0]
    return dict(sorted(found.items()))


def product_part(product: str, part: str) -> ModuleType | None:
    """The module `part` of a product's folder (e.g. "report"), or None: an unknown product, or one
    without that part."""
    recipe = recipes().get(product) if isinstance(product, str) else None
    if recipe is None:
        return None
    name = f"{recipe.__module__.rpartition('.')[0]}.{part}"
    return importlib.import_module(name) if importlib.util.find_spec(name) is not None else None


def product_parts(part: str) -> list[ModuleType]:
    """The module `part` of every product that has one, in product-name order."""
    return [module for name in recipes() if (module := product_part(name, part)) is not None]


def parse_recipe(raw: Any, overrides: tuple[str, ...] = ()) -> BaseModel:
    if not isinstance(raw, dict):
        raise ConfigError("config error: the recipe must be a YAML mapping")
    for dotted in overrides:
        apply_override(raw, dotted)
    product = raw.get("product", "imagenet_plus")
    known = recipes()
    if product not in known:
        raise ConfigError(f"config error: product: unknown {product!r}; known: {sorted(known)}")
    try:
        return known[product].model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_recipe(text: str, overrides: tuple[str, ...] = ()) -> BaseModel:
    return parse_recipe(parse_yaml(text), overrides)
