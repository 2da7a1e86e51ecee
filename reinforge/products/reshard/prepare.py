"""prepare(), on the driver, once per run: plan the subset's copies onto output shards as three passes of
tasks over partitions (partitions.py: pool shards -> uid buckets -> key ranges -> task files), so the
driver holds counts per partition, never an array per sample. The assignment is committed as one small
Parquet per output shard, `plan/tasks/{:08d}.parquet`, then `plan/plan.json` (sizes, meta and the
files' fingerprint; written last, it commits them), then `plan/inputs.json` (what the plan was made
from: the recipe and the versions of the pool shards and files it read). A rerun with the same inputs
plans nothing; one whose inputs changed plans again and keeps every task file whose bytes are the same;
a changed assignment under finished tasks is refused.

Subset uids absent from the pool are a hard error (count and examples) unless `allow_missing`, which
writes them to plan/missing_uids.npy. Face boxes (face_blur.py) and class ids (datacompnet.py) follow the
partitions (extras.py): the blur metadata's rows are routed to the uid buckets by a pass of tasks, the
class file (a dict, read whole by its format: O(file) on the driver) by the driver; each bucket gives its
copies their uid's boxes and class id, and they travel in the assignment (columns face_bboxes, cls), so
workers need neither file.
Beside the shards: meta.json in the schema DataComp's resharder writes, reshard.json with reinforge's
own account, and sample_ids.npy (the subset file, as DataComp copies it).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from reinforge.formats.datacompnet import missing_class_ids
from reinforge.formats.sources import WebDatasetSource
from reinforge.formats.subset import counts_path, write_subset
from reinforge.formats.uid_index import index_cache_dir
from reinforge.io.fingerprint import file_versions, plan_digest
from reinforge.io.manifest import RunLayout
from reinforge.io.storage import atomic_open, exists, filesystem, list_files, read_text, remove, write_bytes
from reinforge.products.reshard import extras, face_blur, partitions
from reinforge.products.reshard.pool import ReshardError, select_shards
from reinforge.products.reshard.recipe import ReshardRecipe
from reinforge.products.reshard.subset_file import BLOCK, SHARD_SAMPLES, SubsetFile, open_subset, partition_size
from reinforge.runtime.ray_session import TaskMap, where_to_map

SHARD_FORMAT, STATS_FORMAT = "{:08d}.tar", "{:08d}_stats.json"
# relative to the run; recorded in plan.json, so the files of another layout are rewritten
TASK_ASSIGNMENTS = "plan/tasks/{:08d}.parquet"
MISSING_UIDS = "plan/missing_uids.npy"


@dataclass
class Sizes:
    """How finely the passes cut the work (tests use tiny ones: any sizes give the same plan)."""
    pool_shards: int = 64  # pool shards per bucketing task
    bucket_rows: Optional[int] = None  # subset rows per uid bucket; None: partition_size
    range_copies: Optional[int] = None  # copies per key range, about; None: partition_size
    where: Optional[str] = None  # inline, processes or ray; None: ray_session.where_to_map decides
    metadata_rows: Optional[int] = None  # blur metadata rows per routing task, about; None: partition_size


def assignment_url(layout: RunLayout, task_id: str) -> str:
    return layout.file(TASK_ASSIGNMENTS.format(int(task_id)))


@dataclass
class Plan:
    """What the passes decided, and where the key ranges' copies are (in plan/work/)."""
    sizes: list[int]  # samples per output shard
    meta: dict  # reshard.json
    pool_samples: int  # samples indexed in the selected pool shards
    urls: list[str]  # pool shard URLs by number
    copy_files: list[str]  # per uid bucket: its copies, grouped by key range
    copy_counts: np.ndarray  # copies per (uid bucket, key range)
    value_counts: Optional[np.ndarray]  # face box values per (uid bucket, key range); None: no face boxes
    columns: dict  # the copies' columns (partitions.copy_columns)
    range_starts: list[int]  # per key range: its first output position
    missing_files: list[str]  # per bucket: its missing uids
    tasks: TaskMap  # where the passes run (close it when done)


@dataclass
class Inputs:
    """The files a plan is made from, listed and stat-ed once: the pool shards (after first_shard /
    num_shards), their versions, and the digest prepare() compares with the committed plan's."""
    urls: list[str]  # pool shard URLs by number
    selection: dict  # what first_shard / num_shards picked ({} without them)
    versions: dict[str, tuple[int, str]]
    digest: str


def read_inputs(r: ReshardRecipe) -> Inputs:
    """The pool's listing and the versions of every file the plan reads: the pool shards, the subset, its
    counts, the face-box metadata and the class file."""
    pool, selection = select_shards(WebDatasetSource(r.input.path).tasks(), r.first_shard, r.num_shards)
    urls = [t.inputs[0] for t in pool]
    files = urls + [r.subset, counts_path(r.subset)]
    files += ([r.counts] if r.counts not in ("auto", "none") else []) + ([r.cls_file] if r.cls_file else [])
    files += face_blur.metadata_files(r.blur_metadata) if r.blur_metadata else []
    versions = file_versions(files)
    digest = plan_digest(TASK_ASSIGNMENTS, r.model_dump(mode="json", exclude={"resources", "output"}), files,
                         versions)
    return Inputs(urls, selection, versions, digest)


def plan_subset(r: ReshardRecipe, layout: RunLayout, work: str, sizes: Sizes = Sizes(),
                inputs: Optional[Inputs] = None) -> Plan:
    """Passes 1 and 2 (partitions.py): every subset uid's pool location, and its copies by key range;
    their files go to `work` (a folder every task can reach). `inputs`: read_inputs(r), if read already."""
    inputs = inputs or read_inputs(r)
    urls, selection, versions = inputs.urls, inputs.selection, inputs.versions
    subset = open_subset(r.subset, r.counts, work, sizes.bucket_rows)
    for url in urls:
        if versions[url][0] < 0:
            raise ReshardError(f"pool shard {url} not found")
    index_dir = index_cache_dir() or layout.index_dir()
    groups = [[(n, urls[n], *versions[urls[n]]) for n in range(a, min(a + sizes.pool_shards, len(urls)))]
              for a in range(0, len(urls), sizes.pool_shards)]
    tasks = TaskMap(sizes.where or where_to_map(max(subset.rows, SHARD_SAMPLES * len(urls))))
    try:
        return _plan(r, subset, urls, groups, index_dir, work, sizes, selection, tasks)
    except BaseException:
        tasks.close()
        raise


def _plan(r: ReshardRecipe, subset: SubsetFile, urls: list[str], groups: list, index_dir: str, work: str,
          sizes: Sizes, selection: dict, tasks: TaskMap) -> Plan:
    bounds, buckets = subset.bounds, len(subset.bounds) + 1
    group_files = [f"{work}/pool-{g:06d}.bin" for g in range(len(groups))]
    scans = list(tasks(partitions.pool_to_buckets, [(g, f) for g, f in zip(groups, group_files)],
                       (index_dir, r.input.uid_field, bounds)))
    ends = [np.cumsum(s["counts"]) for s in scans]
    files, routed, extra_parts = _route_extras(r, tasks, work, bounds, sizes)
    ranges = max(1, -(-subset.total // (sizes.range_copies or partition_size(subset.total))))
    copy_files = [f"{work}/copies-{b:06d}.bin" for b in range(buckets)]
    missing_files = [f"{work}/missing-{b:06d}.bin" for b in range(buckets)]
    per_bucket = ((subset.starts[b], subset.starts[b + 1],  # made as the tasks start: groups x buckets pieces
                   [(f, int(e[b] - s["counts"][b]), int(e[b])) for f, e, s in zip(group_files, ends, scans)],
                   extra_parts(b), copy_files[b], missing_files[b]) for b in range(buckets))
    matched = list(tasks(partitions.match_bucket, per_bucket, (subset, r.seed, ranges)))
    per_range = np.array([m["per_range"] for m in matched]).reshape(buckets, ranges)
    per_range_values = (np.array([m["per_range_values"] for m in matched]).reshape(buckets, ranges)
                        if r.blur_metadata else None)
    range_starts = np.r_[0, np.cumsum(per_range.sum(axis=0))].tolist()
    missing = sum(m["missing"] for m in matched)
    if missing and not r.allow_missing:
        examples = ", ".join([u for m in matched for u in m["missing_sample"]][:5])
        raise ReshardError(f"{missing} of {subset.rows} subset uids are not in the pool ({len(urls)} shards, "
                           f"{sum(s['samples'] for s in scans)} samples), e.g. {examples}; "
                           f"set allow_missing: true to reshard without them")
    total = int(range_starts[-1])
    out_sizes = [min(r.samples_per_shard, total - s) for s in range(0, total, r.samples_per_shard)]
    meta = _meta(r, subset, scans, matched, urls, out_sizes)
    plan = Plan(out_sizes, meta, sum(s["samples"] for s in scans), urls, copy_files, per_range, per_range_values,
                partitions.copy_columns(bool(r.blur_metadata), bool(r.cls_file)), range_starts, missing_files, tasks)
    _report_extras(r, plan, subset, selection, files, routed, matched)
    return plan


def _route_extras(r: ReshardRecipe, tasks: TaskMap, work: str, bounds: np.ndarray,
                  sizes: Sizes) -> tuple[list[str], list[dict], Callable[[int], dict]]:
    """Face boxes: the blur metadata's rows to uid buckets, a pass of tasks over runs of its row groups
    (extras.py); class ids: the class file's entries, here. Returns the metadata files, what each routing
    task counted, and per uid bucket its parts of both (for match_bucket)."""
    files, routed, class_counts = [], [], None
    if r.blur_metadata:
        files = face_blur.metadata_files(r.blur_metadata)
        per_task = extras.FILES_PER_TASK
        groups = [([(n, files[n]) for n in range(a, min(a + per_task, len(files)))],)
                  for a in range(0, len(files), per_task)]
        layouts = [rows for done in tasks(extras.metadata_layout, groups, ()) for rows in done]
        runs = extras.metadata_tasks(files, layouts, sizes.metadata_rows or partition_size(sum(map(sum, layouts))))
        routed = list(tasks(extras.metadata_to_buckets, [(run, f"{work}/meta-{t:06d}.bin")
                                                         for t, run in enumerate(runs)], (bounds,)))
    if r.cls_file:
        class_counts = extras.class_ids_to_buckets(r.cls_file, f"{work}/classes.bin", bounds)
    meta_urls = [f"{work}/meta-{t:06d}.bin" for t in range(len(routed))]
    ends = [np.cumsum(t["counts"]) for t in routed]
    value_ends = [np.cumsum(t["value_counts"]) for t in routed]
    class_ends = None if class_counts is None else np.cumsum(class_counts)

    def parts(b: int) -> dict:
        out = {}
        if r.blur_metadata:
            out["meta"] = [(u, int(e[b] - t["counts"][b]), int(e[b])) for u, e, t in zip(meta_urls, ends, routed)]
            out["meta_values"] = [(extras.values_url(u), int(e[b] - t["value_counts"][b]), int(e[b]))
                                  for u, e, t in zip(meta_urls, value_ends, routed)]
        if class_counts is not None:
            out["classes"] = [(f"{work}/classes.bin", int(class_ends[b] - class_counts[b]), int(class_ends[b]))]
        return out
    return files, routed, parts


def _report_extras(r: ReshardRecipe, plan: Plan, subset: SubsetFile, selection: dict, files: list[str],
                   routed: list[dict], matched: list[dict]) -> None:
    """What reshard.json says of face boxes, class ids and the pool selection; a subset uid without a
    class id is an error."""
    report = {}
    if r.apply_blur:
        face_blur.cv2_module()  # no OpenCV: say so now, not in every task
    if r.blur_metadata:
        report["blur"] = {"apply_blur": r.apply_blur, "inject_blur_metadata": r.inject_blur_metadata,
                          "reencode_webp_quality": r.reencode_webp_quality, **extras.blur_report(files, routed, matched)}
    if r.cls_file:
        no_class = sum(m["extras"]["no_class"] for m in matched)
        if no_class:
            raise missing_class_ids(no_class, subset.rows, [u for m in matched for u in m["extras"]["no_class_sample"]][:5],
                                    r.cls_file)
        report["cls"] = {"file": r.cls_file, "classes": len(set().union(*(m["extras"]["classes"] for m in matched)))}
    if selection:
        report["pool_selection"] = selection
    plan.meta.update(report)


def _meta(r: ReshardRecipe, subset: SubsetFile, scans: list[dict], matched: list[dict], urls: list[str],
          sizes: list[int]) -> dict:
    bad, bad_sample = {}, []
    for scan in scans:  # in pool shard order, as one pass over the shards counts them
        for name, n in scan["bad"].items():
            bad[name] = bad.get(name, 0) + n
        bad_sample.extend(scan["bad_sample"][:partitions.SAMPLE - len(bad_sample)])
    duplicates = sorted(d for m in matched for d in m["duplicate_sample"])[:partitions.SAMPLE]  # (shard, offset)
    missing = sum(m["missing"] for m in matched)
    return {
        "format": "reinforge.reshard/1",
        "subset": {"path": r.subset, "sha256": subset.sha256, "counts_file": subset.counts_file,
                   "uids": subset.rows, "samples": subset.total, "repeated_entries_folded": subset.repeated_entries,
                   "notes": subset.notes},
        "missing": {"uids": missing, "samples": sum(m["missing_samples"] for m in matched),
                    "allowed": r.allow_missing,
                    "sample": [u for m in matched for u in m["missing_sample"]][:partitions.SAMPLE],
                    "file": MISSING_UIDS if missing else None},
        "pool": {"shards": len(urls), "samples_indexed": sum(s["samples"] for s in scans), "samples_without_uid": bad,
                 "without_uid_sample": bad_sample, "duplicate_uids_requested": sum(m["duplicates"] for m in matched),
                 "duplicate_sample": [uid for _, _, uid in duplicates],
                 "duplicate_policy": "first occurrence (pool shard order, then position) is used"},
        "output": {"shards": len(sizes), "samples": int(sum(sizes)),
                   "samples_per_shard": r.samples_per_shard, "seed": r.seed,
                   "shuffle_bufsize": r.shuffle_bufsize,
                   "order_in_shard": (f"shuffled through a {r.shuffle_bufsize}-sample buffer seeded by (seed, "
                                      f"shard)" if r.shuffle_bufsize else "pool read order"),
                   "keys": "<uid> for a uid's first copy, <uid>_r<k> for copy k >= 1"},
    }


# ---------------------------------------------------------------- committing the plan

def write_task_files(layout: RunLayout, r: ReshardRecipe, plan: Plan, work: str, write: bool) -> list[tuple[str, bool]]:
    """Pass 3: per key range, the shards inside it (partitions.write_range), then the shards that cross
    ranges, from their pieces (write_crossing). Per output shard: sha256 of its file and whether the file
    there has those bytes; `write`: write them all."""
    starts, total = plan.range_starts, int(sum(plan.sizes))
    task_urls = [assignment_url(layout, f"{j:08d}") for j in range(len(plan.sizes))]
    firsts = np.cumsum(plan.copy_counts, axis=1) - plan.copy_counts  # a range's first row in each bucket file
    values = plan.value_counts
    value_firsts = None if values is None else np.cumsum(values, axis=1) - values

    def value_parts(k: int) -> list[tuple[str, int, int]]:
        return [] if values is None else [(extras.values_url(url), int(value_firsts[b, k]),
                                           int(value_firsts[b, k] + values[b, k])) for b, url in enumerate(plan.copy_files)]
    ranges = ((k, [(url, int(firsts[b, k]), int(firsts[b, k] + plan.copy_counts[b, k]))
                   for b, url in enumerate(plan.copy_files)], value_parts(k), starts[k], starts[k + 1],
               f"{work}/pieces-{k:06d}.bin")
              for k in range(len(starts) - 1) if starts[k + 1] > starts[k])
    files, pieces = {}, {}
    for done in plan.tasks(partitions.write_range, ranges, (r.samples_per_shard, total, plan.urls, task_urls, write,
                                                            plan.columns)):
        files.update(done["files"])
        for j, url, a, b, va, vb in done["pieces"]:  # in range order: a crossing shard's pieces in output order
            pieces.setdefault(j, []).append(((url, a, b), (extras.values_url(url), va, vb)))
    crossing = [(j, [p for p, _ in parts], [v for _, v in parts], task_urls[j]) for j, parts in sorted(pieces.items())]
    for done in plan.tasks(partitions.write_crossing, crossing, (plan.urls, write, plan.columns)):
        files.update(done["files"])
    return [files[j] for j in range(len(plan.sizes))]


def fingerprint(sizes: list[int], files: list[tuple[str, bool]]) -> str:
    """Of the sizes and every task file's bytes (their sha256, in order): equal iff the assignment is."""
    digest = hashlib.sha256(f"{sizes}".encode())
    for sha, _ in files:
        digest.update(sha.encode())
    return digest.hexdigest()


def commit(layout: RunLayout, r: ReshardRecipe, plan: Plan, work: str, has_finished_tasks: Callable[[], bool],
           inputs: str) -> None:
    """Write the assignment's task files (only those whose bytes changed), then plan.json and
    inputs.json; refuse to change an assignment under finished tasks (`has_finished_tasks()`)."""
    if exists(layout.plan_record):
        files = write_task_files(layout, r, plan, work, write=False)
        saved = json.loads(read_text(layout.plan_record))
        if not (all(same for _, same in files) and saved.get("sizes") == plan.sizes):
            if has_finished_tasks():
                raise ReshardError(f"{layout.root}: the subset or the pool changed since its tasks ran "
                                   f"(the plan differs); write to a new output directory")
            remove(layout.plan_record)  # uncommitted while the task assignments are rewritten
            files = write_task_files(layout, r, plan, work, write=True)
    else:
        files = write_task_files(layout, r, plan, work, write=True)
    ours = {f"{j:08d}.parquet" for j in range(len(plan.sizes))}
    for url in list_files(layout.plan_file("tasks"), ".parquet"):  # a former, larger assignment's
        if url.rpartition("/")[2] not in ours:
            remove(url)
    missing = partitions.read_missing(plan.missing_files)
    if len(missing):
        write_subset(layout.file(MISSING_UIDS), missing)
    write_bytes(layout.plan_record, json.dumps({"fingerprint": fingerprint(plan.sizes, files),
                                                "task_plans": TASK_ASSIGNMENTS, "sizes": plan.sizes,
                                                "meta": plan.meta}, indent=1).encode())
    write_run_files(layout, r, plan)
    write_bytes(layout.plan_inputs, json.dumps({"inputs": inputs}).encode())


def committed_sizes(layout: RunLayout) -> list[int] | None:
    """The output shard sizes of the committed assignment (plan/plan.json), None before prepare."""
    return json.loads(read_text(layout.plan_record))["sizes"] if exists(layout.plan_record) else None


def datacomp_meta(r: ReshardRecipe, plan: Plan) -> dict:
    """meta.json as DataComp's resharder writes it: its arguments as strings, then its counters.
    DataComp's train.py reads output_shard_count and output_shard_format from it. Left out: the
    timing (blur_time) and the driver's cwd, which would make reruns differ; output_dir is "." (the
    folder of this file), so equal runs in different places write equal bytes."""
    sizes = plan.sizes
    args = {"input_dir": r.input.path, "output_dir": ".", "subset_file": r.subset, "cls_file": r.cls_file,
            "num_shards": r.num_shards, "first_shard": r.first_shard, "num_workers": None,
            "shard_size": r.samples_per_shard, "shard_format": SHARD_FORMAT, "output_shard_format": SHARD_FORMAT,
            "shard_stats_format": STATS_FORMAT, "output_shard_stats_format": STATS_FORMAT,
            "shard_table": "sizes.json", "write_shard_table": False, "shuffle_bufsize": r.shuffle_bufsize,
            "blur_metadata_map": ",".join(r.blur_metadata) or None, "apply_blur": r.apply_blur,
            "inject_blur_metadata": r.inject_blur_metadata, "reencode_webp_quality": r.reencode_webp_quality,
            "dry_run": r.dry_run, "overwrite": False, "verbose": None, "quiet": None}
    # DataComp counts a blurred pool sample once, however many copies of it are written
    blurred = plan.meta.get("blur", {}).get("uids_with_faces", 0) if r.apply_blur else 0
    return {**{k: str(v) for k, v in args.items()},
            "processed_count": plan.pool_samples, "output_count": int(sum(sizes)), "blur_count": blurred,
            "output_shard_count": len(sizes), "worker_success": len(sizes)}


def shard_sizes(plan: Plan) -> dict[str, int]:
    return {SHARD_FORMAT.format(j): n for j, n in enumerate(plan.sizes)}


def write_run_files(layout: RunLayout, r: ReshardRecipe, plan: Plan) -> None:
    """Beside the shards: sizes.json, DataComp's meta.json, reshard.json, the subset file."""
    write_bytes(layout.shards_file("sizes.json"), json.dumps(shard_sizes(plan), indent=1).encode())
    write_bytes(layout.shards_file("meta.json"), json.dumps(datacomp_meta(r, plan), indent=1).encode())
    write_bytes(layout.shards_file("reshard.json"), json.dumps(plan.meta, indent=1).encode())
    fs, path = filesystem(r.subset)
    with fs.open(path, "rb") as src, atomic_open(layout.shards_file("sample_ids.npy")) as out:
        shutil.copyfileobj(src, out, BLOCK)  # DataComp copies the subset file there; a block at a time
