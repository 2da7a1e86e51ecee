"""prepare(), on the driver, once per run: index the pool (formats/uid_index.py), locate every subset uid
(pool.py), expand multiplicities into copies and assign them to output shards (assignment.py). The
assignment is committed as one small Parquet per output shard, `plan/tasks/{:08d}.parquet`, then
`plan/plan.json` (its fingerprint, shard sizes and meta; written last, it commits them). A rerun whose
assignment has the same fingerprint rewrites nothing; a different one under finished tasks is refused.

Subset uids absent from the pool are a hard error (count and examples) unless `allow_missing`, which
writes them to plan/missing_uids.npy. Face boxes (face_blur.py) and class ids (datacompnet.py) are looked
up per uid here and travel in the assignment (columns face_bboxes, cls), so workers need neither file.
Beside the shards: meta.json in the schema DataComp's resharder writes, reshard.json with reinforge's
own account, and sample_ids.npy (the subset file, as DataComp copies it).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reinforge.formats.datacompnet import class_id_array, read_class_ids
from reinforge.formats.sources import WebDatasetSource
from reinforge.formats.subset import LoadedSubset, make_subset, read_subset, uid_hex, write_subset
from reinforge.formats.uid_index import build_index
from reinforge.io.manifest import RunLayout
from reinforge.io.storage import atomic_open, exists, filesystem, list_files, read_text, remove, write_bytes
from reinforge.products.reshard import face_blur
from reinforge.products.reshard.assignment import assign
from reinforge.products.reshard.pool import SAMPLE, PoolMatch, ReshardError, match_pool, select_shards
from reinforge.products.reshard.recipe import ReshardRecipe

SHARD_FORMAT, STATS_FORMAT = "{:08d}.tar", "{:08d}_stats.json"
# relative to the run; recorded in plan.json, so the files of another layout are rewritten
TASK_ASSIGNMENTS = "plan/tasks/{:08d}.parquet"
MISSING_UIDS = "plan/missing_uids.npy"
BLOCK = 8 << 20  # bytes read at a time from a subset file


def assignment_url(layout: RunLayout, task_id: str) -> str:
    return layout.file(TASK_ASSIGNMENTS.format(int(task_id)))


@dataclass
class Assignment:
    """What prepare decided: every output sample's pool location, in output order, and its account.
    Held as numbers (a subset row per output sample, pool shards by number); each output shard's table,
    with the pool shard's URL on every row, is made only when its file is written."""
    rows: np.ndarray  # per output sample: its subset row (uid, pool location in match)
    copy: np.ndarray  # per output sample: its copy number (int32)
    uids: np.ndarray  # the subset's uids
    match: PoolMatch  # pool shard number, offset and length per subset row
    urls: list[str]  # pool shard URLs by number
    extra: dict  # per output sample: face_bboxes, cls (when asked for)
    sizes: list[int]  # samples per output shard
    missing: np.ndarray  # subset uids not in the pool (allow_missing)
    meta: dict  # reshard.json
    pool_samples: int  # samples indexed in the selected pool shards

    def __post_init__(self):
        self.url_array = pa.array(self.urls, pa.string())

    def columns(self, start: int, stop: int) -> dict:
        """Output samples start..stop-1: shard (URL), offset, length, uid_hi, uid_lo, copy (+ extras)."""
        rows = self.rows[start:stop]
        uids = self.uids[rows]
        return {"shard": self.url_array.take(self.match.shard[rows]), "offset": self.match.offset[rows],
                "length": self.match.length[rows], "uid_hi": uids["f0"], "uid_lo": uids["f1"],
                "copy": self.copy[start:stop], **{k: v[start:stop] for k, v in self.extra.items()}}


def assign_subset(recipe: ReshardRecipe, layout: RunLayout) -> Assignment:
    """Index the pool, locate the subset and assign its copies; writes nothing but uid indexes."""
    r = recipe
    pool, selection = select_shards(WebDatasetSource(r.input.path).tasks(), r.first_shard, r.num_shards)
    urls = [t.inputs[0] for t in pool]
    subset = read_subset(r.subset, r.counts)
    match = match_pool(subset, build_index(pool, layout.index_dir(), r.input.uid_field), urls)
    missing = np.flatnonzero(~match.found)
    if len(missing) and not r.allow_missing:
        examples = ", ".join(uid_hex(*subset.uids[i]) for i in missing[:5])
        raise ReshardError(f"{len(missing)} of {len(subset.uids)} subset uids are not in the pool "
                           f"({len(urls)} shards, {match.samples} samples), e.g. {examples}; "
                           f"set allow_missing: true to reshard without them")
    if len(missing):  # assign the found rows, then name them by subset row
        found = np.flatnonzero(match.found)
        idx, copy, sizes = assign(subset.uids[found], subset.counts[found], match.shard[found],
                                  match.offset[found], r.samples_per_shard, r.seed)
        rows = found[idx]
    else:
        rows, copy, sizes = assign(subset.uids, subset.counts, match.shard, match.offset, r.samples_per_shard, r.seed)
    extra, extras_report = _extra_columns(r, subset, rows, selection)
    meta = _meta(r, subset, match, missing, urls, sizes)
    meta.update(extras_report)
    return Assignment(rows, copy, subset.uids, match, urls, extra, sizes, subset.uids[missing], meta, match.samples)


def _extra_columns(r: ReshardRecipe, subset: LoadedSubset, subset_index: np.ndarray,
                   selection: dict) -> tuple[dict, dict]:
    """Per output sample: its face boxes and / or class id, looked up by uid now so workers need
    neither the metadata nor the class file; and what reshard.json says of them."""
    columns, report = {}, {}
    if r.apply_blur:
        face_blur.cv2_module()  # no OpenCV: say so now, not in every task
    if r.blur_metadata:
        boxes = face_blur.load_face_boxes(r.blur_metadata, subset.uids)
        columns["face_bboxes"] = boxes.column(subset_index)
        found = face_blur.boxes_report(boxes, subset_index, lambda i: uid_hex(*subset.uids[i]))
        report["blur"] = {"apply_blur": r.apply_blur, "inject_blur_metadata": r.inject_blur_metadata,
                          "reencode_webp_quality": r.reencode_webp_quality, **found}
    if r.cls_file:
        ids = class_id_array(read_class_ids(r.cls_file), subset.uids, r.cls_file)
        columns["cls"] = ids[subset_index]
        report["cls"] = {"file": r.cls_file, "classes": int(len(np.unique(ids[subset_index])))}
    if selection:
        report["pool_selection"] = selection
    return columns, report


def _file_sha256(fs, path: str) -> str:
    """sha256 of a file read a block at a time (a subset file is 16 B per uid: not whole in memory)."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _meta(r: ReshardRecipe, subset: LoadedSubset, match: PoolMatch, missing: np.ndarray, urls: list[str],
          sizes: list[int]) -> dict:
    fs, path = filesystem(r.subset)
    return {
        "format": "reinforge.reshard/1",
        "subset": {"path": r.subset, "sha256": _file_sha256(fs, path),
                   "counts_file": subset.counts_file, "uids": len(subset.uids), "samples": subset.total,
                   "repeated_entries_folded": subset.repeated_entries, "notes": subset.notes},
        "missing": {"uids": int(len(missing)), "samples": int(subset.counts[missing].sum()),
                    "allowed": r.allow_missing, "sample": [uid_hex(*subset.uids[i]) for i in missing[:SAMPLE]],
                    "file": MISSING_UIDS if len(missing) else None},
        "pool": {"shards": len(urls), "samples_indexed": match.samples, "samples_without_uid": match.bad,
                 "without_uid_sample": match.bad_sample, "duplicate_uids_requested": match.duplicates,
                 "duplicate_sample": match.duplicate_sample,
                 "duplicate_policy": "first occurrence (pool shard order, then position) is used"},
        "output": {"shards": len(sizes), "samples": int(sum(sizes)),
                   "samples_per_shard": r.samples_per_shard, "seed": r.seed,
                   "shuffle_bufsize": r.shuffle_bufsize,
                   "order_in_shard": (f"shuffled through a {r.shuffle_bufsize}-sample buffer seeded by (seed, "
                                      f"shard)" if r.shuffle_bufsize else "pool read order"),
                   "keys": "<uid> for a uid's first copy, <uid>_r<k> for copy k >= 1"},
    }


def datacomp_meta(r: ReshardRecipe, assignment: Assignment) -> dict:
    """meta.json as DataComp's resharder writes it: its arguments as strings, then its counters.
    DataComp's train.py reads output_shard_count and output_shard_format from it. Left out: the
    timing (blur_time) and the driver's cwd, which would make reruns differ; output_dir is "." (the
    folder of this file), so equal runs in different places write equal bytes."""
    sizes = assignment.sizes
    args = {"input_dir": r.input.path, "output_dir": ".", "subset_file": r.subset, "cls_file": r.cls_file,
            "num_shards": r.num_shards, "first_shard": r.first_shard, "num_workers": None,
            "shard_size": r.samples_per_shard, "shard_format": SHARD_FORMAT, "output_shard_format": SHARD_FORMAT,
            "shard_stats_format": STATS_FORMAT, "output_shard_stats_format": STATS_FORMAT,
            "shard_table": "sizes.json", "write_shard_table": False, "shuffle_bufsize": r.shuffle_bufsize,
            "blur_metadata_map": ",".join(r.blur_metadata) or None, "apply_blur": r.apply_blur,
            "inject_blur_metadata": r.inject_blur_metadata, "reencode_webp_quality": r.reencode_webp_quality,
            "dry_run": r.dry_run, "overwrite": False, "verbose": None, "quiet": None}
    # DataComp counts a blurred pool sample once, however many copies of it are written
    blurred = assignment.meta.get("blur", {}).get("uids_with_faces", 0) if r.apply_blur else 0
    return {**{k: str(v) for k, v in args.items()},
            "processed_count": assignment.pool_samples, "output_count": int(sum(sizes)), "blur_count": blurred,
            "output_shard_count": len(sizes), "worker_success": len(sizes)}


def shard_sizes(assignment: Assignment) -> dict[str, int]:
    return {SHARD_FORMAT.format(j): n for j, n in enumerate(assignment.sizes)}


def fingerprint(assignment: Assignment, chunk: int = 1 << 20) -> str:
    """Of the sizes and every assigned location (face boxes by value): equal iff the assignment is.
    The bytes hashed are those of the whole assignment table with its shard column dictionary-encoded
    (first occurrence order), column after column; made here from the numbers a chunk of rows at a
    time, so no column is ever whole in memory."""
    a = assignment
    digest = hashlib.sha256(f"{a.sizes}".encode())
    first_of = {}  # a URL listed twice is one dictionary entry, as dictionary_encode makes it
    canonical = np.array([first_of.setdefault(u, i) for i, u in enumerate(a.urls)], np.int32)
    chunks = [slice(start, start + chunk) for start in range(0, len(a.rows), chunk)]
    code = np.full(len(a.urls), -1, np.int32)  # pool shard -> its place in the dictionary
    dictionary: list[int] = []
    for part in chunks:  # the dictionary: pool shards by first occurrence in output order
        seen = pa.array(canonical[a.match.shard[a.rows[part]]]).dictionary_encode().dictionary.to_numpy()
        new = seen[code[seen] < 0]
        code[new] = np.arange(len(dictionary), len(dictionary) + len(new), dtype=np.int32)
        dictionary.extend(new.tolist())
    digest.update("|".join(a.urls[s] for s in dictionary).encode())
    for part in chunks:
        digest.update(code[canonical[a.match.shard[a.rows[part]]]])
    for column in (a.match.offset, a.match.length, a.uids["f0"], a.uids["f1"]):
        for part in chunks:
            digest.update(np.ascontiguousarray(column[a.rows[part]]))
    digest.update(np.ascontiguousarray(a.copy))
    for values in a.extra.values():
        column = pa.array(values) if not isinstance(values, pa.Array) else values
        if pa.types.is_list(column.type):  # face boxes: their values, not the addresses of numpy objects
            digest.update(json.dumps(column.to_pylist()).encode())
        else:
            digest.update(np.ascontiguousarray(column.to_numpy(zero_copy_only=False)).tobytes())
    return digest.hexdigest()


def commit(layout: RunLayout, assignment: Assignment, has_finished_tasks) -> None:
    """Write the assignment unless an identical one is committed; refuse to change it under finished
    tasks (`has_finished_tasks()`: whether the run's recipe has any)."""
    current = fingerprint(assignment)
    sizes = assignment.sizes
    if exists(layout.plan_record):
        saved = json.loads(read_text(layout.plan_record))
        if saved.get("fingerprint") == current and saved.get("task_plans") == TASK_ASSIGNMENTS:
            return
        if has_finished_tasks():
            raise ReshardError(f"{layout.root}: the subset or the pool changed since its tasks ran "
                               f"(plan fingerprint differs); write to a new output directory")
        remove(layout.plan_record)  # uncommitted while the task assignments are rewritten
    starts = np.cumsum([0, *sizes], dtype=np.int64)

    def write_task_assignment(j: int) -> None:  # one file per output shard: a task reads just its own rows
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table(assignment.columns(int(starts[j]), int(starts[j + 1]))), buf)
        write_bytes(assignment_url(layout, f"{j:08d}"), buf.getvalue().to_pybytes())
    # many small writes: overlap their latency; 4 threads, as each keeps its own malloc arena (8: +150 MB)
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write_task_assignment, range(len(sizes))))
    ours = {f"{j:08d}.parquet" for j in range(len(sizes))}
    for url in list_files(layout.plan_file("tasks"), ".parquet"):  # a former, larger assignment's
        if url.rpartition("/")[2] not in ours:
            remove(url)
    missing = assignment.missing
    if len(missing):
        write_subset(layout.file(MISSING_UIDS), make_subset(missing["f0"], missing["f1"]))
    write_bytes(layout.plan_record, json.dumps({"fingerprint": current, "task_plans": TASK_ASSIGNMENTS,
                                                "sizes": sizes, "meta": assignment.meta}, indent=1).encode())


def committed_sizes(layout: RunLayout) -> list[int] | None:
    """The output shard sizes of the committed assignment (plan/plan.json), None before prepare."""
    return json.loads(read_text(layout.plan_record))["sizes"] if exists(layout.plan_record) else None


def write_run_files(layout: RunLayout, r: ReshardRecipe, assignment: Assignment) -> None:
    """Beside the shards: sizes.json, DataComp's meta.json, reshard.json, the subset file."""
    write_bytes(layout.shards_file("sizes.json"), json.dumps(shard_sizes(assignment), indent=1).encode())
    write_bytes(layout.shards_file("meta.json"), json.dumps(datacomp_meta(r, assignment), indent=1).encode())
    write_bytes(layout.shards_file("reshard.json"), json.dumps(assignment.meta, indent=1).encode())
    fs, path = filesystem(r.subset)
    with fs.open(path, "rb") as src, atomic_open(layout.shards_file("sample_ids.npy")) as out:
        shutil.copyfileobj(src, out, BLOCK)  # DataComp copies the subset file there; a block at a time
