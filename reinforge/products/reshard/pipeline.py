"""DataComp resharder on the runner: a uid subset (optionally with multiplicities) -> new shards.

plan() (driver): index the pool (uid_index.py), locate every subset uid, expand multiplicities into
copies, and assign copies to output shards deterministically; the assignment is written as one
small Parquet per output shard, `<run>/plan/tasks/{:08d}.parquet`, then `<run>/plan/plan.json` (its
fingerprint, shard sizes and meta; written last, it commits the plan). Tasks are output shards (task id
= `{:08d}`, input = its own plan file), so workers share no state and take no lock, and a task reads
only its own rows: its cost does not grow with the number of tasks. read(task) fetches each sample's
byte range from its pool shard.

Assignment. Copy r of a uid with multiplicity m gets the sort key (r + phase) / m, where phase in
[0, 1) is a hash of (seed, uid): copies of one uid sit 1/m of the run apart, and distinct uids are
shuffled across the pool. Output shards are consecutive blocks of `samples_per_shard` copies in key
order (the last one shorter). Inside a shard, samples go in (copy round, pool shard, offset) order,
so reads move forward through each pool shard; a copy that would directly follow a copy of the same
uid is swapped with the next different sample.

Keys: the uid (32 hex) for the first copy, `<uid>_r<k>` for copy k >= 1; members are copied byte
for byte (json keeps the original uid). Pool uids that occur twice: the first (pool shard order, then
position) is used and the repeats are counted in reshard.json. Subset uids absent from the pool are a
hard error (count and examples) unless `allow_missing`, which writes them to plan/missing_uids.npy.

DataComp's resharder options: `first_shard`/`num_shards` pick pool shards by their number;
`shuffle_bufsize` shuffles each output shard's samples through a seeded buffer as they are read;
`blur_metadata` + `apply_blur`/`inject_blur_metadata` (face_blur.py) and `cls_file` (datacompnet.py)
are looked up per uid while planning and travel in the assignment (columns face_bboxes, cls);
`dry_run` plans and reports without writing the plan or any shard. Beside the shards: meta.json in
the schema DataComp's resharder writes (its train.py reads output_shard_count/_format from it),
reshard.json with reinforge's own account, and sample_ids.npy (the subset file, as DataComp copies it).
"""
from __future__ import annotations

import hashlib
import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reinforge.products.reshard import face_blur
from reinforge.runtime.pipeline import Pipeline
from reinforge.formats.datacompnet import class_id_array, read_class_ids
from reinforge.formats.sources import InputError, WebDatasetSource
from reinforge.io.manifest import Task
from reinforge.io.storage import exists, filesystem, list_files, read_text, remove, write_bytes
from reinforge.io.runs import done_manifests
from reinforge.formats.pool_reader import PoolReader
from reinforge.formats.uid_index import INDEX_STATUS, build_index
from reinforge.formats.recipe import config_digest
from reinforge.products.reshard.recipe import ReshardRecipe
from reinforge.formats.limits import Limits
from reinforge.io.manifest import RunLayout
from reinforge.formats.subset import (UID_OK, LoadedSubset, locate, make_subset, parse_hex_uids, read_subset, uid_hex, write_subset)
from reinforge.stages.base import MapStage, SkipSample, Stage

SAMPLE = 10
SHARD_FORMAT, STATS_FORMAT = "{:08d}.tar", "{:08d}_stats.json"
EXTRA_FIELDS = ("__face_bboxes__", "__cls__")  # per-sample facts read() hands to the stages
TASK_PLANS = "plan/tasks/{:08d}.parquet"  # recorded in plan.json: a plan of another layout is rewritten


class ReshardError(InputError):
    """The subset cannot be resharded from this pool as asked (missing uids, changed inputs)."""


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fixed, well-spread hash of uint64 values."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def uid_phase(hi: np.ndarray, lo: np.ndarray, seed: int) -> np.ndarray:
    h = _mix64(hi ^ _mix64(lo ^ np.uint64(seed % 2**64)))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def sample_key(hi: int, lo: int, copy: int) -> str:
    return uid_hex(hi, lo) if copy == 0 else f"{uid_hex(hi, lo)}_r{copy}"


def select_shards(pool: list[Task], first: int, num: int | None) -> tuple[list[Task], dict]:
    """DataComp's --first-shard/--num-shards: the pool shards numbered first .. first+num-1 (all from
    `first` on when num is None), by the number in their file name; absent numbers are counted."""
    if first == 0 and num is None:
        return pool, {}
    numbered = {}
    for task in pool:
        stem = task.inputs[0].rpartition("/")[2].split(".")[0]
        if not stem.isdigit():
            raise ReshardError(f"first_shard/num_shards select pool shards by number, but {task.inputs[0]} has "
                               f"no number as its name")
        numbered.setdefault(int(stem), task)
    last = first + num - 1 if num is not None else max(numbered, default=first - 1)
    chosen = [numbered[n] for n in sorted(numbered) if first <= n <= last]
    if not chosen:
        raise ReshardError(f"no pool shard is numbered {first}..{last}")
    absent = [n for n in range(first, last + 1) if n not in numbered]
    return chosen, {"first_shard": first, "num_shards": num, "shards_selected": len(chosen),
                    "numbers_absent": len(absent), "absent_sample": absent[:SAMPLE]}


def buffer_shuffle(samples: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    """webdataset's _shuffle(bufsize, initial=bufsize), as DataComp's --shuffle-bufsize calls it: fill a
    buffer (taking two samples per step while it is short), then emit a random buffered sample per
    incoming one, and drain at the end. Here rng is seeded, so the order is the same on every run."""
    buf: list = []
    for sample in samples:
        buf.append(sample)
        if len(buf) < bufsize:
            nxt = next(samples, None)
            if nxt is not None:
                buf.append(nxt)
        if len(buf) >= bufsize:
            yield _pick(buf, rng)
    while buf:
        yield _pick(buf, rng)


def _pick(buf: list, rng: random.Random) -> dict:
    k = rng.randint(0, len(buf) - 1)
    sample, buf[k] = buf[k], buf[-1]
    buf.pop()
    return sample


@dataclass
class PoolMatch:
    """Where each requested uid lives in the pool, plus what the index pass found wrong with the pool."""
    shard: np.ndarray  # per found subset uid: pool shard number
    offset: np.ndarray
    length: np.ndarray
    found: np.ndarray  # mask over subset uids
    samples: int = 0
    bad: dict = field(default_factory=dict)
    bad_sample: list = field(default_factory=list)
    duplicates: int = 0
    duplicate_sample: list = field(default_factory=list)


def match_pool(subset: LoadedSubset, tables: Iterator[pa.Table], urls: list[str]) -> PoolMatch:
    """Stream the per-shard indexes, keeping only rows of requested uids (memory ~ subset + one shard)."""
    n = len(subset.uids)
    m = PoolMatch(np.full(n, -1, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, bool))
    for s, table in enumerate(tables):
        m.samples += table.num_rows
        status = table.column("status").to_numpy()
        for code, name in INDEX_STATUS.items():
            bad = np.flatnonzero(status == code)
            if len(bad):
                m.bad[name] = m.bad.get(name, 0) + len(bad)
                keys = table.column("key")
                m.bad_sample.extend({"shard": urls[s], "key": keys[int(i)].as_py(), "problem": name}
                                    for i in bad[:SAMPLE - len(m.bad_sample)])
        ok = status == 0
        hi, lo = table.column("uid_hi").to_numpy()[ok], table.column("uid_lo").to_numpy()[ok]
        pos = locate(hi, lo, subset.uids)
        hit = np.flatnonzero(pos >= 0)
        p = pos[hit]
        fresh = np.zeros(len(p), bool)
        fresh[np.unique(p, return_index=True)[1]] = True  # first in this shard, by position
        fresh &= ~m.found[p]  # and not already found in an earlier shard
        repeats = hit[~fresh]
        m.duplicates += len(repeats)
        m.duplicate_sample.extend(uid_hex(hi[i], lo[i]) for i in repeats[:SAMPLE - len(m.duplicate_sample)])
        rows, p = hit[fresh], p[fresh]
        m.found[p], m.shard[p] = True, s
        m.offset[p] = table.column("offset").to_numpy()[ok][rows]
        m.length[p] = table.column("length").to_numpy()[ok][rows]
    return m


def assign(uids: np.ndarray, counts: np.ndarray, shard: np.ndarray, offset: np.ndarray,
           samples_per_shard: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(uid index, copy number) of every output sample in output order, and the size of each shard."""
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    idx = np.repeat(np.arange(len(uids)), counts)
    copy = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    key = (copy + uid_phase(uids["f0"], uids["f1"], seed)[idx]) / counts[idx]
    order = np.argsort(key, kind="stable")  # ties: uid order, then copy order
    idx, copy = idx[order], copy[order]
    sizes = [min(samples_per_shard, total - s) for s in range(0, total, samples_per_shard)]
    start = 0
    for size in sizes:
        block = slice(start, start + size)
        inner = np.lexsort((offset[idx[block]], shard[idx[block]], copy[block]))
        idx[block], copy[block] = idx[block][inner], copy[block][inner]
        _separate_repeats(idx[block], copy[block])
        start += size
    return idx, copy, sizes


def _separate_repeats(idx: np.ndarray, copy: np.ndarray) -> None:
    """In place: no sample directly follows a copy of its own uid, where another sample can go there."""
    if not (idx[1:] == idx[:-1]).any():
        return
    for i in range(1, len(idx)):
        if idx[i] == idx[i - 1]:
            later = np.flatnonzero(idx[i + 1:] != idx[i - 1])
            if len(later):
                j = i + 1 + int(later[0])
                idx[[i, j]], copy[[i, j]] = idx[[j, i]], copy[[j, i]]


class Passthrough(MapStage):
    """Checks that the fetched bytes are the planned uid, then hands the members on unchanged."""
    name = "reshard"

    def __init__(self, uid_field: str):
        self.uid_field = uid_field

    def process(self, sample: dict) -> dict:
        if "__error__" in sample:
            raise SkipSample(*sample["__error__"])
        try:
            uid = json.loads(sample["json"]).get(self.uid_field)
        except (KeyError, ValueError, AttributeError):
            raise SkipSample("bad_json", "sample has no readable json member") from None
        if not isinstance(uid, str) or uid.lower() != sample["__uid__"]:
            raise SkipSample("uid_mismatch", f"pool sample has uid {uid!r}, the index said {sample['__uid__']}")
        return {"__key__": sample["__key__"],
                "members": {ext: data for ext, data in sample.items() if not ext.startswith("__")},
                **{k: sample[k] for k in EXTRA_FIELDS if k in sample}}


class DataCompExtras(MapStage):
    """What DataComp's resharder (with ml-tic-clip's -c) adds to a sample: the cls member, blurred faces
    (the image becomes webp), the face boxes in the json member."""
    name = "datacomp_extras"

    def __init__(self, apply_blur: bool, inject_blur_metadata: bool, webp_quality: int):
        self.apply_blur, self.inject, self.quality = apply_blur, inject_blur_metadata, webp_quality

    def process(self, sample: dict) -> dict:
        members = sample["members"]
        boxes = sample.get("__face_bboxes__")
        if boxes and self.apply_blur:
            image = face_blur.image_member(members)
            if image is None:
                raise SkipSample("no_image", "sample has face boxes but no jpg/jpeg/png/webp member to blur")
            try:
                webp = face_blur.reencode_blurred(members[image], boxes, self.quality)
            except ValueError as exc:
                raise SkipSample("undecodable_image", f"cannot blur {image}: {exc}") from None
            members = {("webp" if ext == image else ext): (webp if ext == image else data)
                       for ext, data in members.items() if ext != "webp" or image == "webp"}
        if boxes and self.inject:
            try:
                members["json"] = face_blur.inject_boxes(members["json"], boxes)
            except (KeyError, ValueError, AttributeError):
                raise SkipSample("bad_json", "cannot add face_bboxes to the json member") from None
        if "__cls__" in sample:
            members["cls"] = str(int(sample["__cls__"])).encode("ascii")  # webdataset's encoding of an int cls
        return {"__key__": sample["__key__"], "members": members}


class ReshardPipeline(Pipeline):
    libraries = ("numpy", "pyarrow")  # plans and copies bytes: no model, no image decoding
    def __init__(self, recipe: ReshardRecipe):
        self.recipe = recipe
        self.layout = RunLayout(recipe.output.rstrip("/"))
        self.meta: dict | None = None
        self.sizes: list[int] = []
        self.selection: dict = {}
        self.extras_report: dict = {}
        self.pool_samples = 0

    def task_plan_url(self, task_id: str) -> str:
        return f"{self.layout.root}/{TASK_PLANS.format(int(task_id))}"

    def plan(self) -> list[Task]:
        r = self.recipe
        pool, self.selection = select_shards(WebDatasetSource(r.input.path).plan(), r.first_shard, r.num_shards)
        urls = [t.inputs[0] for t in pool]
        subset = read_subset(r.subset, r.counts)
        match = match_pool(subset, build_index(pool, f"{self.layout.root}/index", r.input.uid_field), urls)
        missing = np.flatnonzero(~match.found)
        if len(missing) and not r.allow_missing:
            examples = ", ".join(uid_hex(*subset.uids[i]) for i in missing[:5])
            raise ReshardError(f"{len(missing)} of {len(subset.uids)} subset uids are not in the pool "
                               f"({len(urls)} shards, {match.samples} samples), e.g. {examples}; "
                               f"set allow_missing: true to reshard without them")
        found = match.found
        idx, copy, self.sizes = assign(subset.uids[found], subset.counts[found], match.shard[found],
                                       match.offset[found], r.samples_per_shard, r.seed)
        uids = subset.uids[found][idx]
        columns = {
            "shard": pa.array(np.asarray(urls, object)[match.shard[found][idx]] if len(idx) else [], pa.string()),
            "offset": match.offset[found][idx], "length": match.length[found][idx],
            "uid_hi": uids["f0"], "uid_lo": uids["f1"], "copy": copy.astype(np.int32)}
        columns.update(self._extra_columns(subset, np.flatnonzero(found)[idx]))
        table = pa.table(columns)
        self.meta = self._meta(subset, match, missing, urls)
        self.meta.update(self.extras_report)
        self.pool_samples = match.samples
        if r.dry_run:  # the whole plan is known now; nothing of it is written
            return []
        self._commit_plan(table, subset.uids[missing])
        return self._tasks(self.sizes)

    def _extra_columns(self, subset: LoadedSubset, subset_index: np.ndarray) -> dict:
        """Per output sample: its face boxes and / or class id, looked up by uid now so workers need
        neither the metadata nor the class file."""
        r, columns = self.recipe, {}
        self.extras_report = {}
        if r.apply_blur:
            face_blur.cv2_module()  # no OpenCV: say so now, not in every task
        if r.blur_metadata:
            boxes = face_blur.load_face_boxes(r.blur_metadata, subset.uids)
            columns["face_bboxes"] = boxes.column(subset_index)
            report = face_blur.boxes_report(boxes, subset_index, lambda i: uid_hex(*subset.uids[i]))
            self.extras_report["blur"] = {"apply_blur": r.apply_blur, "inject_blur_metadata": r.inject_blur_metadata,
                                          "reencode_webp_quality": r.reencode_webp_quality, **report}
        if r.cls_file:
            ids = class_id_array(read_class_ids(r.cls_file), subset.uids, r.cls_file)
            columns["cls"] = ids[subset_index]
            self.extras_report["cls"] = {"file": r.cls_file, "classes": int(len(np.unique(ids[subset_index])))}
        if self.selection:
            self.extras_report["pool_selection"] = self.selection
        return columns

    def _tasks(self, sizes: list[int]) -> list[Task]:
        firsts = np.cumsum([0, *sizes])
        return [Task(f"{j:08d}", (self.task_plan_url(f"{j:08d}"),), int(firsts[j])) for j in range(len(sizes))]

    def planned_tasks(self) -> list[Task]:
        """From the committed plan/plan.json: plan() may index the pool and rewrite the plan. None
        committed yet (the run stopped before planning): no tasks."""
        url = f"{self.layout.root}/plan/plan.json"
        return self._tasks(json.loads(read_text(url))["sizes"]) if exists(url) else []

    def _meta(self, subset: LoadedSubset, match: PoolMatch, missing: np.ndarray, urls: list[str]) -> dict:
        r = self.recipe
        fs, path = filesystem(r.subset)
        return {
            "format": "reinforge.reshard/1",
            "subset": {"path": r.subset, "sha256": hashlib.sha256(fs.cat_file(path)).hexdigest(),
                       "counts_file": subset.counts_file, "uids": len(subset.uids), "samples": subset.total,
                       "repeated_entries_folded": subset.repeated_entries, "notes": subset.notes},
            "missing": {"uids": int(len(missing)), "samples": int(subset.counts[missing].sum()),
                        "allowed": r.allow_missing, "sample": [uid_hex(*subset.uids[i]) for i in missing[:SAMPLE]],
                        "file": "plan/missing_uids.npy" if len(missing) else None},
            "pool": {"shards": len(urls), "samples_indexed": match.samples, "samples_without_uid": match.bad,
                     "without_uid_sample": match.bad_sample, "duplicate_uids_requested": match.duplicates,
                     "duplicate_sample": match.duplicate_sample,
                     "duplicate_policy": "first occurrence (pool shard order, then position) is used"},
            "output": {"shards": len(self.sizes), "samples": int(sum(self.sizes)),
                       "samples_per_shard": r.samples_per_shard, "seed": r.seed,
                       "shuffle_bufsize": r.shuffle_bufsize,
                       "order_in_shard": (f"shuffled through a {r.shuffle_bufsize}-sample buffer seeded by (seed, "
                                          f"shard)" if r.shuffle_bufsize else "pool read order"),
                       "keys": "<uid> for a uid's first copy, <uid>_r<k> for copy k >= 1"},
        }

    def datacomp_meta(self) -> dict:
        """meta.json as DataComp's resharder writes it: its arguments as strings, then its counters.
        DataComp's train.py reads output_shard_count and output_shard_format from it. Left out: the
        timing (blur_time) and the driver's cwd, which would make reruns differ; output_dir is "." (the
        folder of this file), so equal runs in different places write equal bytes."""
        r = self.recipe
        args = {"input_dir": r.input.path, "output_dir": ".", "subset_file": r.subset, "cls_file": r.cls_file,
                "num_shards": r.num_shards, "first_shard": r.first_shard, "num_workers": None,
                "shard_size": r.samples_per_shard, "shard_format": SHARD_FORMAT, "output_shard_format": SHARD_FORMAT,
                "shard_stats_format": STATS_FORMAT, "output_shard_stats_format": STATS_FORMAT,
                "shard_table": "sizes.json", "write_shard_table": False, "shuffle_bufsize": r.shuffle_bufsize,
                "blur_metadata_map": ",".join(r.blur_metadata) or None, "apply_blur": r.apply_blur,
                "inject_blur_metadata": r.inject_blur_metadata, "reencode_webp_quality": r.reencode_webp_quality,
                "dry_run": r.dry_run, "overwrite": False, "verbose": None, "quiet": None}
        # DataComp counts a blurred pool sample once, however many copies of it are written
        blurred = self.meta.get("blur", {}).get("uids_with_faces", 0) if r.apply_blur else 0
        return {**{k: str(v) for k, v in args.items()},
                "processed_count": self.pool_samples, "output_count": int(sum(self.sizes)), "blur_count": blurred,
                "output_shard_count": len(self.sizes), "worker_success": len(self.sizes)}

    def _commit_plan(self, table: pa.Table, missing: np.ndarray) -> None:
        """Write the assignment unless an identical one exists; refuse to change the plan under finished tasks."""
        digest = hashlib.sha256(f"{self.sizes}".encode())
        shards = table.column("shard").combine_chunks().dictionary_encode()
        digest.update("|".join(shards.dictionary.to_pylist()).encode())
        for column in [shards.indices, *table.columns[1:]]:
            if pa.types.is_list(column.type):  # face boxes: their values, not the addresses of numpy objects
                digest.update(json.dumps(column.to_pylist()).encode())
            else:
                digest.update(np.ascontiguousarray(column.to_numpy(zero_copy_only=False)).tobytes())
        fingerprint = digest.hexdigest()
        plan_url = f"{self.layout.root}/plan/plan.json"
        if exists(plan_url):
            saved = json.loads(read_text(plan_url))
            if saved.get("fingerprint") == fingerprint and saved.get("task_plans") == TASK_PLANS:
                return
            if self._finished_tasks():
                raise ReshardError(f"{self.layout.root}: the subset or the pool changed since its tasks ran "
                                   f"(plan fingerprint differs); write to a new output directory")
            remove(plan_url)  # uncommitted while the task plans are rewritten
        starts = np.cumsum([0, *self.sizes])

        def write_task_plan(j: int) -> None:  # one file per output shard: a task reads just its own rows
            buf = pa.BufferOutputStream()
            pq.write_table(table.slice(int(starts[j]), self.sizes[j]), buf)
            write_bytes(self.task_plan_url(f"{j:08d}"), buf.getvalue().to_pybytes())
        with ThreadPoolExecutor(max_workers=8) as pool:  # many small writes: overlap their latency
            list(pool.map(write_task_plan, range(len(self.sizes))))
        ours = {f"{j:08d}.parquet" for j in range(len(self.sizes))}
        for url in list_files(f"{self.layout.root}/plan/tasks", ".parquet"):  # a former, larger plan's
            if url.rpartition("/")[2] not in ours:
                remove(url)
        if len(missing):
            write_subset(f"{self.layout.root}/plan/missing_uids.npy", make_subset(missing["f0"], missing["f1"]))
        write_bytes(plan_url, json.dumps({"fingerprint": fingerprint, "task_plans": TASK_PLANS, "sizes": self.sizes,
                                          "meta": self.meta}, indent=1).encode())

    def _finished_tasks(self) -> bool:
        return bool(done_manifests(self.layout.root, config_digest(self.recipe)))

    def read(self, task: Task) -> Iterator[dict]:
        samples = self._read_planned(task)
        if self.recipe.shuffle_bufsize > 0:
            samples = buffer_shuffle(samples, self.recipe.shuffle_bufsize,
                                     random.Random(f"{self.recipe.seed}:{task.id}"))
        return samples

    def _read_planned(self, task: Task) -> Iterator[dict]:
        fs, path = filesystem(task.inputs[0])
        with fs.open(path, "rb") as f:
            rows = pq.read_table(f).to_pydict()
        boxes, classes = rows.get("face_bboxes"), rows.get("cls")
        # rows are grouped by pool shard within a copy round; samples are passed through whatever they hold
        reader = PoolReader(open_limit=1, limits=Limits.default())
        try:
            for i, (url, offset, length, hi, lo, copy) in enumerate(zip(
                    rows["shard"], rows["offset"], rows["length"], rows["uid_hi"], rows["uid_lo"], rows["copy"])):
                sample = reader.fetch(url, offset, length)
                sample["__key__"] = sample_key(hi, lo, copy)
                sample["__uid__"] = uid_hex(hi, lo)
                if boxes is not None and boxes[i] is not None:
                    sample["__face_bboxes__"] = boxes[i]
                if classes is not None:
                    sample["__cls__"] = classes[i]
                yield sample
        finally:
            reader.close()

    def build_stages(self) -> list[Stage]:
        r = self.recipe
        stages: list[Stage] = [Passthrough(r.input.uid_field)]
        if r.apply_blur or r.inject_blur_metadata or r.cls_file:
            stages.append(DataCompExtras(r.apply_blur, r.inject_blur_metadata, r.reencode_webp_quality))
        return stages

    def samples_per_batch(self) -> int:
        return 256

    def sidecars(self, task: Task, samples_out: int) -> dict[str, bytes]:
        stats = {"count": samples_out, "successes": samples_out, "failed_to_download": 0, "failed_to_resize": 0}
        return {f"shards/{task.id}_stats.json": json.dumps(stats, sort_keys=True).encode()}

    def probe_source(self):
        return WebDatasetSource(self.recipe.input.path)

    def probe_recipe(self, raw: dict, chosen: list[dict], folder: str) -> dict:
        """The chosen pool samples as a one-shard pool, each uid wanted twice: two output shards of
        len(chosen) samples, the warm-up and the measured task."""
        from reinforge.runtime.probe import write_shard
        uids = []
        for sample in chosen:
            try:
                uids.append(json.loads(sample["json"])[self.recipe.input.uid_field])
            except (KeyError, ValueError, TypeError):
                continue
        hi, lo, status = parse_hex_uids(pa.array(uids, pa.string()))
        ok = status == UID_OK
        if not ok.any():
            raise ReshardError(f"input.path: no probed pool sample has a {self.recipe.input.uid_field!r} uid")
        unique = np.unique(make_subset(hi[ok], lo[ok]))
        write_shard(f"{folder}/00000000.tar", chosen)
        write_subset(f"{folder}/probe.npy", unique, np.full(len(unique), 2, np.uint32))
        # the probe pool is one shard named 00000000, its uids are not in a class file: select and label
        # nothing; blurring stays as asked (its cost is part of the measurement)
        return {**raw, "subset": f"{folder}/probe.npy", "counts": "auto", "samples_per_shard": len(unique),
                "allow_missing": False, "first_shard": 0, "num_shards": None, "cls_file": None, "dry_run": False,
                "input": {**raw["input"], "path": f"{folder}/00000000.tar"}}

    def expected_samples_per_task(self, input_bytes_per_sample: float) -> float:
        return float(self.recipe.samples_per_shard)

    def prepare_run(self, layout: RunLayout) -> None:
        if self.meta is None:
            self.plan()
        if self.recipe.dry_run:
            return
        shards = f"{layout.root.rstrip('/')}/shards"
        sizes = {SHARD_FORMAT.format(j): n for j, n in enumerate(self.sizes)}
        write_bytes(f"{shards}/sizes.json", json.dumps(sizes, indent=1).encode())
        write_bytes(f"{shards}/meta.json", json.dumps(self.datacomp_meta(), indent=1).encode())
        write_bytes(f"{shards}/reshard.json", json.dumps(self.meta, indent=1).encode())
        fs, path = filesystem(self.recipe.subset)
        write_bytes(f"{shards}/sample_ids.npy", fs.cat_file(path))  # DataComp copies the subset file there

    def dry_run_report(self) -> dict:
        """plan() without writing the plan: the facts reshard.json and meta.json would hold."""
        self.recipe = self.recipe.model_copy(update={"dry_run": True})
        self.plan()
        return {"reshard": self.meta, "datacomp_meta": self.datacomp_meta(),
                "sizes": {SHARD_FORMAT.format(j): n for j, n in enumerate(self.sizes)}}
