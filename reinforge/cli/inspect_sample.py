"""`reinforge inspect`: one sample of a shard, read within the bounds its run declares and described by the
view of the product whose members it holds (products/<name>/inspect_view.py). Registered by cli.main."""
from __future__ import annotations

import json
import sys

import click

from reinforge.cli.common import user_errors
from reinforge.formats.sources import InputError


@click.command()
@click.argument("shard")
@click.option("--key", default=None, help="sample key (default: the first sample)")
@click.option("--augmentations", "-n", default=3, show_default=True, help="stored augmentations to print")
@user_errors
def inspect(shard, key, augmentations):
    """Human-readable dump of one sample of a reinforced shard. Members are read within the bounds its run
    declares (RUN/dr_config.json beside RUN/shards/); a refused sample (member_too_large, bad_key, ...)
    is named with its reason, exit code 1; any other undecodable member is one line, exit code 2."""
    from reinforge.formats.limits import SchemaError
    from reinforge.formats.wds import ShardReadError, iter_samples
    from reinforge.io.storage import filesystem
    from reinforge.products.registry import product_parts
    fs, path = filesystem(shard)
    if not fs.exists(path):
        raise FileNotFoundError(f"shard {shard} not found")
    limits = shard_limits(fs, path)
    try:
        with fs.open(path, "rb") as f:
            for members in iter_samples(f, limits):
                if key is None or members["__key__"] == key:
                    break
            else:
                raise InputError(f"no sample with key {key!r} in {shard}")
    except ShardReadError as exc:
        raise InputError(f"{shard}: {exc}") from None
    click.echo(f"key: {members['__key__']}")
    if "__error__" in members:
        refused(*members["__error__"])
    click.echo("members: " + ", ".join(f"{ext} ({len(v)} B)" for ext, v in members.items() if ext != "__key__"))
    view = next((v for v in product_parts("inspect_view") if v.shows(members)), None)
    try:
        for line in view.describe(members, augmentations, limits) if view is not None else ():
            click.echo(line)
    except SchemaError as exc:
        refused(exc.reason, str(exc))
    except Exception as exc:  # noqa: BLE001 - any other undecodable member is one line, as validate reports it
        raise InputError(f"{shard}: sample {members['__key__']}: {type(exc).__name__}: {exc}") from None


def shard_limits(fs, path: str):
    """What the shard's run declares, when it sits in RUN/shards/ beside RUN/dr_config.json."""
    from reinforge.formats.limits import declared_limits
    from reinforge.io.manifest import RunLayout
    run = RunLayout.holding(path)
    config = None
    if run is not None and fs.exists(run.dr_config):
        try:
            config = json.loads(fs.cat_file(run.dr_config))
        except (ValueError, UnicodeDecodeError):
            pass
    return declared_limits(config)


def refused(reason: str, message: str) -> None:
    click.echo(f"refused: {reason}: {message}", err=True)
    sys.exit(1)
