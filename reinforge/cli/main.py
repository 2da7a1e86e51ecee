"""reinforge command line. Thin: parse, load the recipe, call a pipeline; one clear line and exit
code 2 for a bad recipe or argument, exit code 1 when a run leaves failed tasks (cli/common.py)."""
from __future__ import annotations

import json
import sys

import click

from reinforge.cli import filters, inspect_sample, join, ops, retrieval
from reinforge.cli.common import (EXIT_FAILED, EXIT_INCOMPLETE, EXIT_OK, failed_samples_line, load_recipe_file,
                                  redo_changed_option, run_and_exit, runner_option, user_errors)
from reinforge.formats.sources import InputError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reinforge")
def cli():
    """Build reinforced and curated datasets on Ray."""


@cli.command()
@click.argument("config")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="dotted override, e.g. teachers.0.batch_size=64")
@click.option("--address", default=None, help="Ray cluster address (auto, ray://host:10001); default RAY_ADDRESS or an embedded local Ray")
@click.option("--force", is_flag=True, help="redo tasks of a run directory made with a different recipe")
@redo_changed_option
@click.option("--progress/--no-progress", default=True)
@user_errors
def run(config, overrides, address, force, redo_changed, progress):
    """Run a recipe (YAML) end to end; rerunning skips finished tasks.

    \b
    Exit codes: 0 every task done; 1 some task failed (the others finished);
    2 bad recipe, argument or input, or a changed recipe / changed inputs refused."""
    run_and_exit(load_recipe_file(config, overrides), address, force, progress, redo_changed)


@cli.command()
@click.argument("run_dir")
@click.option("--watch", is_flag=True, help="tail RUN_DIR/status.json, a line per update, until the run finishes")
@click.option("--interval", default=2.0, show_default=True, help="seconds between reads with --watch")
@user_errors
def status(run_dir, watch, interval):
    """Done / pending / failed tasks, why each failed, inputs changed since their task ran, and the
    error files; --watch follows a live run. Read-only.

    \b
    Exit codes:
      0  every task done
      1  some task failed (failed/<task>.json; wins over 3)
      2  usage error, or RUN_DIR is not a run directory
      3  incomplete: tasks pending or running, or the run stopped or went
         silent (--watch: no update for 60 s), tasks from an older recipe,
         or done tasks whose inputs changed since they ran"""
    from reinforge.ops.rundir import run_status
    if watch:
        sys.exit(ops.watch_status(run_dir, interval))
    st = run_status(run_dir)
    click.echo(f"{run_dir}: {len(st.done)}/{st.total} tasks done, {len(st.pending)} pending, "
               f"{len(st.failed)} failed, {len(st.stale)} from an older recipe, {len(st.changed)} with changed inputs")
    print_status_details(st)
    sys.exit(EXIT_FAILED if st.failed else EXIT_INCOMPLETE if len(st.done) < st.total else EXIT_OK)


def print_status_details(st) -> None:
    if st.failed:
        click.echo("  " + failed_samples_line(len(st.failed), *st.failed_samples))
    for task, reason in sorted(st.failed.items()):
        record = st.failures.get(task, {})
        read = f" [{record['samples_read']} samples read, {record.get('errors', 0)} with errors]" \
            if "samples_read" in record else ""
        click.echo(f"  failed  {task}: {reason}{read}")
    for task, (old, new) in sorted(st.changed.items()):
        click.echo(f"  changed {task}: input {old} -> {new} (rerun with --redo-changed-inputs)")
    if st.unchecked:
        click.echo(f"  {len(st.unchecked)} done task(s) have no input fingerprint (older manifests): "
                   f"their inputs are not checked")
    for task, n in sorted(st.error_files.items()):
        click.echo(f"  errors  {task}: {n} skipped samples in errors/{task}.jsonl")
    for task in st.pending[:20]:
        click.echo(f"  pending {task}")
    if len(st.pending) > 20:
        click.echo(f"  ... and {len(st.pending) - 20} more pending")


@cli.command()
@click.argument("run_dir")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def stats(run_dir, as_json):
    """Per-stage counters merged over all finished tasks."""
    from dataclasses import asdict

    from reinforge.ops.rundir import merged_stats
    stages, totals = merged_stats(run_dir)
    if as_json:
        click.echo(json.dumps({"totals": totals, "stages": {k: asdict(v) for k, v in stages.items()}}, indent=1))
        return
    click.echo(f"tasks {totals['tasks']}, samples in {totals['samples_in']}, out {totals['samples_out']}, "
               f"{totals['bytes'] / 2**20:.1f} MiB written, {totals['seconds']:.1f} task-seconds")
    click.echo(f"{'stage':<10} {'in':>9} {'out':>9} {'seconds':>9} {'samples/s':>10}  errors")
    for name, st in stages.items():
        rate = st.samples_in / st.seconds if st.seconds else 0.0
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(st.errors.items())) or "-"
        click.echo(f"{name:<10} {st.samples_in:>9} {st.samples_out:>9} {st.seconds:>9.2f} {rate:>10.1f}  {reasons}")


@cli.command()
@click.argument("run_dir")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="processes checking tasks in parallel (0: one per CPU for runs of 1 GiB or more, else 1)")
@click.option("--address", default=None, help="Ray address: check the tasks as Ray tasks on that cluster")
@user_errors
def validate(run_dir, workers, address):
    """Check every shard against its manifest (size, sha256, count), every sample against the schema, and
    every task's inputs against the fingerprint its manifest recorded. Exit 1 on any problem. Read-only."""
    from reinforge.ops.rundir import validate_run
    checked, problems = validate_run(run_dir, workers, address)
    for problem in problems[:50]:
        click.echo(f"INVALID {problem}", err=True)
    if problems:
        click.echo(f"{len(problems)} problems in {run_dir}", err=True)
        sys.exit(1)
    click.echo(f"ok: {checked} samples valid in {run_dir}")


@cli.command()
@click.argument("run_dir")
@user_errors
def gc(run_dir):
    """Remove temporary files left by interrupted writers (run it when no job writes to RUN_DIR)."""
    from reinforge.ops.rundir import collect_garbage
    removed = collect_garbage(run_dir)
    for name in removed:
        click.echo(f"removed {name}")
    click.echo(f"{len(removed)} orphaned temporary files removed")


@cli.group()
def export():
    """Write a finished run in another tool's layout."""


@export.command("ml-dr")
@click.argument("run_dir")
@click.argument("out_dir")
@user_errors
def export_ml_dr(run_dir, out_dir):
    """Apple ML-DR reference trainer layout: config.pth.tar + {index}.pth.tar per image."""
    from reinforge.ops.export_mldr import export_ml_dr as export_fn
    counts = export_fn(run_dir, out_dir)
    click.echo(f"wrote {counts['images']} images, {counts['augmentations']} augmentations to {out_dir}")


@export.command("datacompdr")
@click.argument("run_dir")
@click.argument("out_dir")
@click.option("--format", "format_", type=click.Choice(["npz", "pth.gz"]), default=None,
              help="default: the run's storage.format")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="default: the run's storage.dtype (the format's usual one with --format)")
@user_errors
def export_datacompdr(run_dir, out_dir, format_, dtype):
    """The standard DataCompDR layout Apple's trainer reads (npz / pth.gz) from a run written with a storage codec."""
    from reinforge.ops.export_datacompdr import export_datacompdr as export_fn
    try:
        counts = export_fn(run_dir, out_dir, format_, dtype)
    except ValueError as exc:  # a bad --format/--dtype pair, not a mobileclip_dr run (SchemaError is one)
        raise InputError(str(exc)) from None
    skipped = ", ".join(f"{r}={n}" for r, n in sorted(counts["skipped"].items())) or "none"
    click.echo(f"wrote {counts['samples']} samples in {counts['shards']} shards to {out_dir}; skipped: {skipped}")


@cli.command()
@click.option("--output", default="runs/demo", show_default=True, help="folder for the demo's input and run")
@click.option("--config", default="configs/demo.yaml", show_default=True,
              help="recipe; configs/NAME.yaml falls back to the one the package ships, from any directory")
@click.option("--address", default=None)
@user_errors
def demo(output, config, address):
    """Reinforce real photos with a real ImageNet teacher on a local Ray, and show what was written."""
    from reinforge.ops.demo import run_demo
    run_demo(load_recipe_file(config, (f"output={output}/run", f"input.path={output}/input/demo-*.tar")),
             f"{output}/input", address, echo=click.echo)


@cli.command()
@click.argument("metadata", nargs=-1, required=True)
@click.option("--out", required=True, help="folder for <split>.npy, unknown.npy, out_of_range.npy, sizes.json, splits.json")
@click.option("--uid-column", default="uid", show_default=True)
@click.option("--timestamp-column", default="timestamp", show_default=True)
@click.option("--timestamp-format", default="epoch", show_default=True, help="epoch | epoch_ms | iso | yyyymm")
@click.option("--by", default="tic", show_default=True, help="tic | year | month | boundaries")
@click.option("--boundaries", default=None, help="--by boundaries: ascending labels, e.g. 2014,2017,2019-07,2023")
@click.option("--range", "range_", default=None, help="--by year/month: START:END inclusive, e.g. 2014:2022")
@click.option("--eval-uids", multiple=True, help="subset .npy of evaluation uids to remove (repeatable)")
@click.option("--memory-rows", default=64 << 20, show_default=True,
              help="no longer used (no pass holds the pool); accepted so older commands work")
@click.option("--unit-rows", default=None, type=click.IntRange(min=1),
              help="rows per task, in whole row groups [default: 1,000,000]")
@click.option("--address", default=None,
              help="Ray address for the tasks (default: worker processes of this machine past 256k rows)")
@user_errors
def splits(metadata, out, uid_column, timestamp_column, timestamp_format, by, boundaries, range_, eval_uids,
           memory_rows, unit_rows, address):
    """Time splits (TiC-DataComp) from metadata Parquet or per-period uid files (YYYY.npy / YYYYMM.npy)."""
    from reinforge.curation.split_units import UNIT_ROWS
    from reinforge.curation.time_splits import SplitOptions, build_splits
    options = SplitOptions(uid_column, timestamp_column, timestamp_format, by,
                           boundaries.split(",") if boundaries else None, range_, list(eval_uids), memory_rows,
                           unit_rows or UNIT_ROWS, address)
    m = build_splits(list(metadata), out, options)
    click.echo(f"{len(m['steps'])} splits -> {out}")
    for name in m["steps"]:
        s = m["splits"][name]
        click.echo(f"  {name:<8} {s['uids']:>12,} uids  ({s['first_month']}..{s['last_month']}; rows {s['rows']:,}, "
                   f"duplicates {s['duplicates_dropped']:,}, eval removed {s['eval_removed']:,})")
    u, o = m["unknown"], m["out_of_range"]
    click.echo(f"  unknown  {u['uids']:>12,} uids  (missing timestamp {u['missing']:,}, unparseable {u['unparseable']:,})")
    click.echo(f"  out_of_range {o['uids']:>8,} uids  (below {o['below']:,}, above {o['above']:,}; "
               f"seen {o['earliest']}..{o['latest']})")
    click.echo(f"malformed uids {m['malformed_uids']['rows']:,}, duplicate rows {m['duplicates']['rows']:,}, "
               f"eval uids removed {m['eval']['removed']:,}; {m['rows']:,} rows in {m['seconds']:.1f} s "
               f"({m['rows'] / max(m['seconds'], 1e-9):,.0f} rows/s); details in {out}/splits.json")


@cli.command()
@click.argument("splits_dir")
@click.option("--policy", required=True,
              help="sequential | cumulative-all | cumulative-exp | cumulative-equal | oracle | module:function")
@click.option("--budget", type=int, required=True, help="samples per step")
@click.option("--out", required=True)
@click.option("--seed", default=0, show_default=True, help="picks which uids get the extra copy when upsampling")
@click.option("--new-fraction", default=0.5, show_default=True, help="cumulative-exp/-equal: share of the new split")
@click.option("--shards", "shards_template", default=None,
              help="shard pattern or reshard run folder per split, with {split}, e.g. runs/tic/{split}")
@click.option("--allow-size-mismatch", is_flag=True, help="accept shard folders whose sizes.json differ from the split")
@click.option("--no-subsets", is_flag=True, help="write schedule.json only, no per-step uid files")
@click.option("--buffer", default="independent", show_default=True, type=click.Choice(["independent", "nested"]),
              help="which uids an old split gives at each step. independent: drawn afresh per step (seeded by "
                   "seed, step, split), so dropped uids can come back. nested: a replay buffer as TiC-CLIP's paper "
                   "describes -Exp/-Equal (ml-tic-clip has no code for them): an old split's uids at step t+1 are "
                   "a subset of those at step t, a uid that leaves never returns (fixed priorities from seed, uid)")
@user_errors
def schedule(splits_dir, policy, budget, out, seed, new_fraction, shards_template, allow_size_mismatch, no_subsets,
             buffer):
    """Replay schedule over time splits: per-step sampling weights and uid subsets with multiplicities."""
    from reinforge.curation.replay import build_schedule
    sched = build_schedule(splits_dir, policy, budget, out, seed, new_fraction, shards_template,
                           allow_size_mismatch, write_subsets=not no_subsets, buffer=buffer)
    for step in sched["steps"]:
        parts = ", ".join(f"{s['split']}={s['samples']:,} (x{s['upsampling_factor']:.3g})" for s in step["sources"])
        click.echo(f"step {step['step']}: {step['total']:,} = {parts}")
    click.echo(f"schedule -> {out}/schedule.json")


@cli.command()
@click.argument("subset")
@click.option("--pool", required=True, help="pool shards, e.g. 'pool/{00000000..00000999}.tar' or 'pool/*.tar'")
@click.option("--output", required=True, help="run folder; shards land in OUTPUT/shards")
@click.option("--counts", default="auto", show_default=True, help="auto | none | path to a .counts.npy")
@click.option("--samples-per-shard", default=10000, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--uid-field", default="uid", show_default=True)
@click.option("--allow-missing", is_flag=True, help="reshard without subset uids that are not in the pool (reported)")
@click.option("--first-shard", default=0, show_default=True,
              help="DataComp's --first-shard: use pool shards numbered from this one ({:08d}.tar names)")
@click.option("--num-shards", type=int, default=None,
              help="DataComp's -n: use this many pool shard numbers from --first-shard (default: all); subset "
                   "uids outside them are missing (add --allow-missing)")
@click.option("--shuffle-bufsize", default=0, show_default=True,
              help="shuffle the samples inside each output shard through a buffer of this size (DataComp's "
                   "webdataset shuffle, seeded by --seed and the shard). Which shard a sample lands in is "
                   "always a seeded draw over the whole subset; 0 keeps pool read order inside a shard")
@click.option("--blur-metadata", multiple=True,
              help="metadata parquet(s) with uid + face_bboxes (path, glob or folder; repeatable), or DataComp's "
                   "--blur-metadata-map JSON")
@click.option("--apply-blur", is_flag=True,
              help="blur the faces in face_bboxes as DataComp does; blurred images are re-encoded as webp")
@click.option("--inject-blur-metadata", is_flag=True, help="add face_bboxes to the json member of samples with faces")
@click.option("--reencode-webp-quality", default=100, show_default=True, help="WebP quality of blurred images")
@click.option("--cls-file", default=None,
              help="ml-tic-clip's -c: uid2classid/<year>.pkl (or JSON {uid: class id}); every sample gets a cls member")
@click.option("--dry-run", is_flag=True, help="plan and report (shards, samples, blur, missing); write nothing")
@click.option("--address", default=None)
@click.option("--force", is_flag=True)
@redo_changed_option
@runner_option
@click.option("--progress/--no-progress", default=True)
@user_errors
def reshard(subset, pool, output, counts, samples_per_shard, seed, uid_field, allow_missing, first_shard, num_shards,
            shuffle_bufsize, blur_metadata, apply_blur, inject_blur_metadata, reencode_webp_quality, cls_file, dry_run,
            address, force, redo_changed, runner, progress):
    """DataComp resharder: write the samples of SUBSET (with multiplicities) as new {:08d}.tar shards."""
    from reinforge.products.registry import parse_recipe
    recipe = parse_recipe({"product": "reshard", "output": output, "subset": subset, "counts": counts, "seed": seed,
                           "input": {"path": pool, "uid_field": uid_field}, "samples_per_shard": samples_per_shard,
                           "allow_missing": allow_missing, "first_shard": first_shard, "num_shards": num_shards,
                           "shuffle_bufsize": shuffle_bufsize, "blur_metadata": list(blur_metadata),
                           "apply_blur": apply_blur, "inject_blur_metadata": inject_blur_metadata,
                           "reencode_webp_quality": reencode_webp_quality, "cls_file": cls_file, "dry_run": dry_run})
    if dry_run:
        import json

        from reinforge.products.reshard.pipeline import ReshardPipeline
        report = ReshardPipeline(recipe).dry_run_report()
        out = report["reshard"]["output"]
        click.echo(f"dry run: {out['samples']:,} samples in {out['shards']:,} shards from "
                   f"{report['datacomp_meta']['processed_count']:,} pool samples; nothing written")
        click.echo(json.dumps(report, indent=1))
        return
    run_and_exit(recipe, address, force, progress, redo_changed, runner)


@cli.command("datacompnet-classes")
@click.option("--year2uids", required=True, help="ml-tic-clip's tic-datacompnet_year2uids.pkl {year: {synset: [uids]}}")
@click.option("--class-info", required=True, help="BREEDS dataset_class_info.json [[class id, synset, names], ...]")
@click.option("--out", required=True, help="folder; writes OUT/uid2classid/<year>.pkl (reshard --cls-file)")
@user_errors
def datacompnet_classes(year2uids, class_info, out):
    """TiC DataCompNet labels: uid2classid/<year>.pkl as ml-tic-clip's generate_datacompnet_uid2classid writes them."""
    from reinforge.formats.datacompnet import write_uid2classid
    for year, n in write_uid2classid(year2uids, class_info, out).items():
        click.echo(f"{out}/uid2classid/{year}.pkl: {n:,} uids")


for command in (inspect_sample.inspect, join.join, ops.report, ops.plan, filters.filter_group, retrieval.embed, retrieval.index,
                retrieval.transfer_set):
    cli.add_command(command)


def main():
    cli()


if __name__ == "__main__":
    main()
