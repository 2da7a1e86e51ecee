"""Retrieval curation commands: embed a pool, index it, curate a transfer set (thin, as main.py)."""
from __future__ import annotations

import json

import click

from reinforge.cli.common import load_recipe_file, load_yaml_file, redo_changed_option, run_and_exit, user_errors
from reinforge.formats.recipe import ConfigError


@click.command()
@click.argument("config")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="dotted override, e.g. encoder.batch_size=128")
@click.option("--address", default=None)
@click.option("--force", is_flag=True)
@redo_changed_option
@click.option("--progress/--no-progress", default=True)
@user_errors
def embed(config, overrides, address, force, redo_changed, progress):
    """Embed a pool (an embed_pool recipe): one embeddings/<shard>.parquet per pool shard."""
    recipe = load_recipe_file(config, overrides)
    if recipe.product != "embed_pool":
        raise ConfigError(f"config error: product: embed expects embed_pool, got {recipe.product!r}")
    run_and_exit(recipe, address, force, progress, redo_changed)


@click.command()
@click.argument("embeddings", nargs=-1, required=True)
@click.option("--out", required=True, help="index folder: index.faiss, index.json, uids.npy")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="index setting, e.g. kind=ivf_pq, nlist=4096, nprobe=64, pq_m=64, ef_search=128, groups=8")
@click.option("--address", default=None, help="Ray address for the parallel build (default: this machine's worker "
              "processes)")
@user_errors
def index(embeddings, out, overrides, address):
    """Build a faiss index over embed_pool run dirs, embedding parquet files or DataComp metadata."""
    from reinforge.curation.index import build_index, parse_index_spec
    from reinforge.formats.recipe import apply_override
    raw: dict = {}
    for dotted in overrides:
        apply_override(raw, dotted)
    meta = build_index(list(embeddings), out, parse_index_spec(raw), address)
    recall = meta["recall"]
    click.echo(f"{meta['kind']} index ({meta['factory']}, {meta['search']}) of {meta['ntotal']:,} x {meta['dim']} "
               f"-> {out}; built in {meta['seconds']['total']:.1f} s")
    click.echo(f"recall@{meta['config']['recall_k']} vs exact on {recall['queries']} held-out queries: "
               f"{recall['recall@' + str(meta['config']['recall_k'])]:.3f}; skipped rows: {meta['skipped_rows'] or 0}")


@click.command("transfer-set")
@click.argument("config")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="dotted override, e.g. selection.budget=5000")
@click.option("--address", default=None, help="Ray address for the optional reshard")
@user_errors
def transfer_set(config, overrides, address):
    """Curate a transfer set (YAML config): neighbours of target images or prompts -> subset files + report."""
    from reinforge.curation.transfer_set import build_transfer_set
    from reinforge.curation.transfer_spec import parse_transfer_spec
    spec = parse_transfer_spec(load_yaml_file(config, overrides))
    report = build_transfer_set(spec, address)
    q = report["queries"]
    click.echo(f"{report['selected']:,} selected from {report['candidates']:,} candidates of {q['count']} queries "
               f"({q['without_neighbours']} without neighbours above the threshold) -> {spec.output}")
    click.echo("removed: " + json.dumps(report["removed"]))
    click.echo("per class: " + json.dumps(report["per_class"]))
