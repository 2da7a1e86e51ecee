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
position) is used and the repeats are counted in meta.json. Subset uids absent from the pool are a
hard error (count and examples) unless `allow_missing`, which writes them to plan/missing_uids.npy.
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reinforge.pipelines.base import Pipeline
from reinforge.pipelines.sources import InputError, Task, WebDatasetSource
from reinforge.pipelines.storage import exists, filesystem, list_files, read_text, remove, write_bytes
from reinforge.pipelines.uid_index import INDEX_STATUS, PoolReader, build_index
from reinforge.schemas.config import ReshardRecipe, config_digest
from reinforge.schemas.limits import Limits
from reinforge.schemas.manifest import RunLayout, TaskManifest
from reinforge.schemas.subset import LoadedSubset, locate, make_subset, read_subset, uid_hex, write_subset
from reinforge.stages.base import MapStage, SkipSample, Stage

SAMPLE = 10
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
                "members": {ext: data for ext, data in sample.items() if not ext.startswith("__")}}


class ReshardPipeline(Pipeline):
    libraries = ("numpy", "pyarrow")  # plans and copies bytes: no model, no image decoding
    def __init__(self, recipe: ReshardRecipe):
        self.recipe = recipe
        self.layout = RunLayout(recipe.output.rstrip("/"))
        self.meta: dict | None = None
        self.sizes: list[int] = []

    def task_plan_url(self, task_id: str) -> str:
        return f"{self.layout.root}/{TASK_PLANS.format(int(task_id))}"

    def plan(self) -> list[Task]:
        r = self.recipe
        pool = WebDatasetSource(r.input.path).plan()
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
        table = pa.table({
            "shard": pa.array(np.asarray(urls, object)[match.shard[found][idx]] if len(idx) else [], pa.string()),
            "offset": match.offset[found][idx], "length": match.length[found][idx],
            "uid_hi": uids["f0"], "uid_lo": uids["f1"], "copy": copy.astype(np.int32)})
        self.meta = self._meta(subset, match, missing, urls)
        self._commit_plan(table, subset.uids[missing])
        return self._tasks(self.sizes)

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
                       "keys": "<uid> for a uid's first copy, <uid>_r<k> for copy k >= 1"},
        }

    def _commit_plan(self, table: pa.Table, missing: np.ndarray) -> None:
        """Write the assignment unless an identical one exists; refuse to change the plan under finished tasks."""
        digest = hashlib.sha256(f"{self.sizes}".encode())
        shards = table.column("shard").combine_chunks().dictionary_encode()
        digest.update("|".join(shards.dictionary.to_pylist()).encode())
        for column in [shards.indices, *table.columns[1:]]:
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
        digest = config_digest(self.recipe)
        for url in list_files(self.layout.root + "/manifests", ".json"):
            try:
                if TaskManifest.from_json(read_text(url)).config_digest == digest:
                    return True
            except (ValueError, KeyError, TypeError):
                continue
        return False

    def read(self, task: Task) -> Iterator[dict]:
        fs, path = filesystem(task.inputs[0])
        with fs.open(path, "rb") as f:
            rows = pq.read_table(f).to_pydict()
        # rows are grouped by pool shard within a copy round; samples are passed through whatever they hold
        reader = PoolReader(open_limit=1, limits=Limits.default())
        try:
            for url, offset, length, hi, lo, copy in zip(rows["shard"], rows["offset"], rows["length"],
                                                         rows["uid_hi"], rows["uid_lo"], rows["copy"]):
                sample = reader.fetch(url, offset, length)
                sample["__key__"] = sample_key(hi, lo, copy)
                sample["__uid__"] = uid_hex(hi, lo)
                yield sample
        finally:
            reader.close()

    def build_stages(self) -> list[Stage]:
        return [Passthrough(self.recipe.input.uid_field)]

    def samples_per_batch(self) -> int:
        return 256

    def sidecars(self, task: Task, samples_out: int) -> dict[str, bytes]:
        stats = {"count": samples_out, "successes": samples_out, "failed_to_download": 0, "failed_to_resize": 0}
        return {f"shards/{task.id}_stats.json": json.dumps(stats, sort_keys=True).encode()}

    def prepare_run(self, layout: RunLayout) -> None:
        if self.meta is None:
            self.plan()
        sizes = {f"{j:08d}.tar": n for j, n in enumerate(self.sizes)}
        write_bytes(f"{layout.root.rstrip('/')}/shards/sizes.json", json.dumps(sizes, indent=1).encode())
        write_bytes(f"{layout.root.rstrip('/')}/shards/meta.json", json.dumps(self.meta, indent=1).encode())
