"""`reinforge filter`: DataComp-style filtering as two passes, scores first (stats, once), decisions
after (cheap, any number of rules over the same scores)."""
from __future__ import annotations

import click

from reinforge.cli.common import user_errors
from reinforge.curation.filters.rules import BASELINES


@click.group("filter")
def filter_group():
    """DataComp baseline filters: `score` metadata once, then `apply` rules to the scores."""


@filter_group.command("score")
@click.argument("metadata", nargs=-1, required=True)
@click.option("--out", required=True, help="folder for the scores (scores/*.parquet) and score_report.json")
@click.option("--embeddings", multiple=True,
              help="row-aligned .npz per metadata file, in order (repeatable); default: paired <stem>.npz")
@click.option("--embedding-key", default="l14_img", show_default=True, help="array in the embeddings .npz")
@click.option("--clusters", default=0, show_default=True, help="k-means centroids for the image-based filter (0: none)")
@click.option("--cluster-targets", default=None, help=".npy/.npz of target image embeddings (e.g. ImageNet-1k)")
@click.option("--target-key", default=None,
              help="array in the targets .npz (default: --embedding-key or its only array)")
@click.option("--train-size", default=0, show_default=True,
              help="k-means training sample by uid hash (0: datacomp every caption row, spherical 256 per centroid)")
@click.option("--niter", default=20, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--cluster-train", type=click.Choice(["caption", "all"]), default="caption", show_default=True,
              help="k-means trains on the caption-filtered rows (English, > 1 word, > 5 chars), as DataComp did, or all")
@click.option("--kmeans", type=click.Choice(["datacomp", "spherical"]), default="datacomp", show_default=True,
              help="datacomp: DataComp's faiss L2 k-means on raw embeddings, dot-product assignment; "
                   "spherical: L2-normalised vectors, inner product throughout")
@click.option("--centroids", default=None, help=".npy/.npz of centroids to use instead of training (e.g. DataComp's)")
@click.option("--cld3", is_flag=True, help="also score CLD3's language (lang_cld3) for the laion2b baseline")
@click.option("--unit-rows", default=None, type=click.IntRange(min=1),
              help="rows per task, in whole row groups, and per part of the scores [default: 1,000,000]")
@click.option("--address", default=None,
              help="Ray address for the tasks (default: worker processes of this machine past 256k rows)")
@user_errors
def score(metadata, out, embeddings, embedding_key, clusters, cluster_targets, target_key, train_size, niter, seed,
          cluster_train, kmeans, centroids, cld3, unit_rows, address):
    """Score DataComp metadata Parquet (files or folders): caption, language, size, CLIP, synset and cluster stats."""
    import time

    from reinforge.curation.filters.scores import UNIT_ROWS, ScoreOptions, score_metadata
    started = time.perf_counter()
    options = ScoreOptions(list(embeddings), embedding_key, clusters, cluster_targets, target_key, train_size,
                           niter, seed, cluster_train, kmeans, centroids, cld3)
    report = score_metadata(list(metadata), out, options, unit_rows or UNIT_ROWS, address)
    seconds = time.perf_counter() - started
    bad = report["malformed_uids"]
    click.echo(f"scored {report['scored']:,} of {report['rows']:,} rows from {len(report['inputs'])} files in "
               f"{seconds:.1f} s ({report['rows'] / max(seconds, 1e-9):,.0f} rows/s) -> {out}")
    invalid = ", ".join(f"{k}={v:,}" for k, v in sorted(report["invalid"].items()) if v) or "none"
    click.echo(f"malformed uids {bad['rows']:,} {bad['by_reason'] or ''}; english {report['language']['english']:,}; "
               f"invalid values {invalid}")
    if "clusters" in report:
        c = report["clusters"]
        source = f"trained on {c['train_rows']:,} rows" if "train_rows" in c else f"from {c['centroids']}"
        click.echo(f"clusters ({c['kmeans']}): k={c['k']} {source}; {c['targets']['rows']:,} targets hit "
                   f"{c['targets']['centroids_hit']} centroids ({c['targets']['invalid']} invalid targets)")


@filter_group.command("apply")
@click.argument("scores_dir")
@click.option("--baseline", type=click.Choice(sorted(BASELINES)), default=None,
              help="one of DataComp's baselines by its name (ANDed with --rule and --top-fraction)")
@click.option("--rule", default=None,
              help="e.g. 'basic & top(clip_l14, 0.3)', 'english & text', 'clip_b32>=0.28 | image'")
@click.option("--top-fraction", type=float, default=None, help="keep the top fraction by --score (ANDed with --rule)")
@click.option("--score", "score_column", default="clip_l14", show_default=True, help="column ranked by --top-fraction")
@click.option("--out", required=True, help="DataComp subset file (.npy, sorted u8,u8 uids)")
@click.option("--report", default=None, help="JSON report (default: <out stem>.report.json)")
@click.option("--semantics", type=click.Choice(["datacomp", "exact"]), default="datacomp", show_default=True,
              help="datacomp: DataComp's own decisions (top keeps ties, float32 compares, its text/caption "
                   "filters); exact: exactly round(f*n) rows, float64 compares, reinforge's synset matcher")
@click.option("--unit-rows", default=None, type=click.IntRange(min=1),
              help="rows per task, in whole row groups [default: 1,000,000]")
@click.option("--address", default=None,
              help="Ray address for the tasks (default: worker processes of this machine past 256k rows)")
@user_errors
def apply(scores_dir, baseline, rule, top_fraction, score_column, out, report, semantics, unit_rows, address):
    """Apply a filter rule to stored scores: write the subset file and a report (counts, resolved thresholds)."""
    from reinforge.curation.filters.clusters import FilterError
    from reinforge.curation.filters.decide import decide, default_report_path
    from reinforge.curation.filters.scores import UNIT_ROWS
    parts = [f"({p})" for p in (BASELINES.get(baseline), rule) if p]
    if top_fraction is not None:
        parts.append(f"top({score_column}, {top_fraction!r})")
    if not parts:
        raise FilterError("give --baseline, --rule and/or --top-fraction")
    rule = parts[0][1:-1] if len(parts) == 1 else " & ".join(parts)
    r = decide(scores_dir, rule, out, report, semantics, unit_rows or UNIT_ROWS, address)
    click.echo(f"kept {r['kept']:,} of {r['unique']:,} unique uids ({r['rows_in']:,} rows in: "
               f"{r['malformed_uids']:,} malformed, {r['duplicate_uids']['rows']:,} duplicates) -> {out}")
    for a in r["atoms"]:
        extra = f", threshold {a['threshold']:.6g}" if "threshold" in a else ""
        click.echo(f"  {a['atom']:<22} pass {a['pass']:>10,}  fail {a['fail']:>10,}  invalid {a['invalid']:>8,}{extra}")
    click.echo(f"report -> {report or default_report_path(out)}")
