"""`reinforge join`: reinforcement-only DataCompDR shards + their DataComp image shards -> trainable shards."""
from __future__ import annotations

import click

from reinforge.cli.common import redo_changed_option, run_and_exit, runner_option, user_errors


@click.command()
@click.argument("reinforcement_shards")
@click.option("--images", required=True, help="image pool shards, e.g. 'pool/{00000000..00000999}.tar' or 'pool/*.tar'")
@click.option("--output", required=True, help="run folder; joined shards land in OUTPUT/shards")
@click.option("--dr-config", default=None,
              help="trainer config JSON of the reinforcement shards (default: dr_config.json of their run)")
@click.option("--uid-field", default="uid", show_default=True, help="field of the pool's json member holding the uid")
@click.option("--caption-member", default="txt", show_default=True)
@click.option("--max-error-fraction", default=1.0, show_default=True,
              help="fail a shard above this fraction of refused samples (refusals are always counted)")
@click.option("--address", default=None)
@click.option("--force", is_flag=True)
@redo_changed_option
@runner_option
@click.option("--progress/--no-progress", default=True)
@user_errors
def join(reinforcement_shards, images, output, dr_config, uid_field, caption_member, max_error_fraction, address,
         force, redo_changed, runner, progress):
    """Join REINFORCEMENT_SHARDS with the image shards they came from, by uid, checking each image's sha256
    and crop boxes; refused samples are counted by reason in OUTPUT/errors/."""
    from reinforge.products.registry import parse_recipe
    recipe = parse_recipe({"product": "join", "output": output,
                           "input": {"path": reinforcement_shards, "dr_config": dr_config},
                           "images": {"path": images, "uid_field": uid_field}, "caption_member": caption_member,
                           "max_error_fraction": max_error_fraction})
    run_and_exit(recipe, address, force, progress, redo_changed, runner)
