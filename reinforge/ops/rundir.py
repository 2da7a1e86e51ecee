"""Read-only views of a run directory (status, merged stats, validation) and garbage collection.
Status and validate never write into the run directory: they list tasks with Pipeline.tasks() and
never call prepare()."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from reinforge.formats.wds import ShardReadError, iter_samples
from reinforge.io.fingerprint import changed_inputs, task_fingerprints
from reinforge.io.manifest import TMP_MARKER, RunLayout, StageStats, TaskManifest
from reinforge.io.runs import run_record, scan_manifests
from reinforge.io.storage import filesystem, list_files, read_text, remove
from reinforge.products.registry import parse_recipe
from reinforge.runtime.pipeline import build_pipeline


class HashingReader:
    """Streams a file through sha256 while a tar reader consumes it: one pass, bounded memory."""

    def __init__(self, raw):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data


def load_run(root: str) -> tuple[RunLayout, dict]:
    return RunLayout(root.rstrip("/")), run_record(root)


def read_manifests(layout: RunLayout) -> tuple[list[TaskManifest], list[str]]:
    """Every readable task manifest, and the URLs of unreadable ones (io.runs.scan_manifests):
    their tasks count as not done, and the runner redoes them."""
    return scan_manifests(layout.root)


def manifests(layout: RunLayout) -> list[TaskManifest]:
    return read_manifests(layout)[0]


@dataclass
class RunStatus:
    done: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # manifest from another recipe digest
    failed: dict[str, str] = field(default_factory=dict)  # task -> reason
    pending: list[str] = field(default_factory=list)
    error_files: dict[str, int] = field(default_factory=dict)  # task -> skipped samples logged
    changed: dict[str, tuple[str, str]] = field(default_factory=dict)  # done, but its inputs changed since
    unchecked: list[str] = field(default_factory=list)  # done, manifest without an input fingerprint (older)
    failures: dict[str, dict] = field(default_factory=dict)  # task -> its failed/<task>.json record

    @property
    def total(self) -> int:
        return len(self.done) + len(self.pending) + len(self.failed) + len(self.stale) + len(self.changed)

    @property
    def failed_samples(self) -> tuple[int, int]:
        """(samples read, of which with errors) by the failed tasks before they failed; none is written."""
        return (sum(r.get("samples_read", 0) for r in self.failures.values()),
                sum(r.get("errors", 0) for r in self.failures.values()))


def read_failure(url: str) -> dict:
    try:
        record = json.loads(read_text(url))
    except (ValueError, UnicodeDecodeError):
        return {"reason": "unreadable failure record"}
    return record if isinstance(record, dict) else {"reason": "unreadable failure record"}


def run_status(root: str) -> RunStatus:
    layout, run = load_run(root)
    pipeline = run_pipeline(root)
    tasks = pipeline.tasks()
    status = RunStatus()
    by_id = {m.task_id: m for m in manifests(layout)}
    failures = {u.rpartition("/")[2].removesuffix(".json"): u for u in list_files(layout.failed_dir, ".json")}
    done: dict[str, TaskManifest] = {}
    for task in tasks:
        manifest = by_id.get(task.id)
        if manifest and manifest.config_digest == run["config_digest"]:
            done[task.id] = manifest
        elif task.id in failures:
            status.failures[task.id] = read_failure(failures[task.id])
            status.failed[task.id] = status.failures[task.id].get("reason", "?")
        elif manifest:
            status.stale.append(task.id)
        else:
            status.pending.append(task.id)
    status.changed = changed_tasks(pipeline, [t for t in tasks if t.id in done], done)
    status.done = [t for t in done if t not in status.changed]
    status.unchecked = [t for t, m in done.items() if m.input_fingerprint is None]
    for url in list_files(layout.errors_dir, ".jsonl"):
        status.error_files[url.rpartition("/")[2].removesuffix(".jsonl")] = read_text(url).count("\n")
    return status


def changed_tasks(pipeline, tasks: list, done: dict[str, TaskManifest]) -> dict[str, tuple[str, str]]:
    """Done tasks whose inputs changed since they ran: task -> (recorded, current) fingerprint. Only
    tasks whose manifest records a fingerprint cost a stat (or a listing of their folder)."""
    recorded = {t.id: done[t.id].input_fingerprint for t in tasks if done[t.id].input_fingerprint is not None}
    if not recorded:
        return {}
    current = task_fingerprints([t for t in tasks if t.id in recorded], pipeline.input_files)
    return changed_inputs(recorded, current)


def merged_stats(root: str) -> tuple[dict[str, StageStats], dict]:
    layout, _ = load_run(root)
    stages: dict[str, StageStats] = {}
    totals = {"tasks": 0, "samples_in": 0, "samples_out": 0, "bytes": 0, "seconds": 0.0}
    for m in manifests(layout):
        totals["tasks"] += 1
        totals["samples_in"] += m.samples_in
        totals["samples_out"] += m.samples_out
        totals["bytes"] += sum(o.bytes for o in m.outputs)
        totals["seconds"] += m.seconds
        for name, st in m.stages.items():
            stages.setdefault(name, StageStats()).merge(st)
    return stages, totals


def run_pipeline(root: str):
    """The pipeline a run directory was made with (from its run.json)."""
    layout, run = load_run(root)
    return build_pipeline(parse_recipe({**run["recipe"], "output": layout.root, "resources": run.get("resources", {})}))


PARALLEL_BYTES = 1 << 30  # below this much output, worker start-up (imports) costs more than it saves


def validate_run(root: str, workers: int = 0, address: str | None = None) -> tuple[int, list[str]]:
    """Check every manifest's outputs: present, same size and sha256, same sample count; and every
    sample against the product's schema (its pipeline's sample_checker). Members are read and inflated
    only within the bounds the run declares (a bigger one is a `member_too_large` problem), and a
    member name that could escape an extraction folder is a `bad_key` problem.

    Tasks are checked in groups, as Ray tasks on `address` (or the Ray of this process, or RAY_ADDRESS), else
    by `workers` processes of this machine (0: one per CPU once the outputs reach PARALLEL_BYTES, else
    one, in this process); problems come back in manifest order wherever they were found."""
    from contextlib import nullcontext

    from reinforge.runtime.ray_session import TaskMap, on_ray, ray_session
    layout, run = load_run(root)
    pipeline = run_pipeline(root)
    problems: list[str] = []
    readable, unreadable = read_manifests(layout)
    problems += [f"{url.rpartition('/')[2]}: unreadable manifest (its task counts as not done)" for url in unreadable]
    problems += changed_input_problems(pipeline, [m for m in readable if m.config_digest == run["config_digest"]])
    if workers <= 0:
        big = sum(out.bytes for m in readable for out in m.outputs) >= PARALLEL_BYTES
        workers = min(os.cpu_count() or 1, len(readable)) if big else 1
    checked = 0
    _CHECKERS.clear()  # this call's checker is built from the run as it is now
    with ray_session(address) if address else nullcontext():
        parallel = address or (workers > 1 and len(readable) > 1)
        tasks = TaskMap(("ray" if on_ray() else "processes") if parallel else "inline", workers)
        group = max(1, len(readable) // (4 * workers))  # a few groups per worker: an even finish, few task starts
        groups = [(readable[i:i + group],) for i in range(0, len(readable), group)]
        try:
            for results in tasks(check_tasks, groups, (root, run["config_digest"])):
                for samples, task_problems in results:
                    checked += samples
                    problems += task_problems
        finally:
            tasks.close()
    return checked, problems


class _TaskChecker:
    """Everything one task's check needs, built once per process."""

    def __init__(self, root: str):
        layout, run = load_run(root)
        pipeline = run_pipeline(root)
        self.layout, self.run = layout, run
        self.check_sample = pipeline.sample_checker(layout)
        self.limits = pipeline.output_limits(layout)

    def check(self, m: TaskManifest) -> tuple[int, list[str]]:
        layout, limits, check_sample = self.layout, self.limits, self.check_sample
        problems: list[str] = []
        checked = 0
        if m.config_digest != self.run["config_digest"]:
            problems.append(f"{m.task_id}: manifest digest {m.config_digest} != run digest {self.run['config_digest']}")
        for out in m.outputs:
            url = layout.file(out.path)
            fs, path = filesystem(url)
            if not fs.exists(path):
                problems.append(f"{m.task_id}: missing output {out.path}")
                continue
            samples = 0
            with fs.open(path, "rb") as raw:
                f = HashingReader(raw)
                if out.path.endswith(".tar"):
                    samples = _check_shard(f, out.path, limits, check_sample, problems)
                while f.read(1 << 20):  # hash whatever the tar reader did not consume
                    pass
            if out.path.endswith(".parquet"):  # a table output (embeddings): its rows, from the footer
                import pyarrow.parquet as pq
                try:
                    with fs.open(path, "rb") as table_file:
                        samples = pq.ParquetFile(table_file).metadata.num_rows
                except Exception as exc:  # noqa: BLE001 - any unreadable table is one problem line
                    problems.append(f"{out.path}: unreadable parquet ({exc})")
            if f.bytes != out.bytes or f.sha256.hexdigest() != out.sha256:
                problems.append(f"{out.path}: size/sha256 differ from the manifest")
            if samples != out.samples:
                problems.append(f"{out.path}: {samples} samples, manifest says {out.samples}")
            checked += samples
        return checked, problems


_CHECKERS: dict[tuple[str, str], _TaskChecker] = {}  # per process: built once for a run, whatever it checks


def check_tasks(manifests: list[TaskManifest], root: str, config_digest: str) -> list[tuple[int, list[str]]]:
    """A task of validate_run: (samples checked, problems) of each of a group of tasks' manifests."""
    key = (root, config_digest)
    if key not in _CHECKERS:
        _CHECKERS.clear()
        _CHECKERS[key] = _TaskChecker(root)
    return [_CHECKERS[key].check(m) for m in manifests]


def changed_input_problems(pipeline, readable: list[TaskManifest]) -> list[str]:
    from reinforge.formats.sources import InputError
    by_id = {m.task_id: m for m in readable}
    try:
        listed = pipeline.tasks()
    except InputError:  # inputs moved or deleted since the run: nothing to compare; the outputs stand alone
        return []
    tasks = [t for t in listed if t.id in by_id]
    return [f"{task}: input changed since the task ran ({old} -> {new}); its outputs are stale, "
            f"rerun with --redo-changed-inputs" for task, (old, new) in
            sorted(changed_tasks(pipeline, tasks, by_id).items())]


def _check_shard(f, name: str, limits, check_sample, problems: list[str]) -> int:
    """Samples in one tar, each checked; appends a line per problem."""
    samples = 0
    try:
        for sample in iter_samples(f, limits):
            samples += 1
            if "__error__" in sample:  # bad_key, member_too_large, unreadable_member
                reason, message = sample["__error__"]
                problems.append(f"{name}: sample {sample['__key__']!r}: {reason}: {message}")
            elif check_sample is not None:
                try:
                    check_sample(sample)
                except Exception as exc:  # noqa: BLE001 - report every bad sample
                    reason = getattr(exc, "reason", type(exc).__name__)
                    problems.append(f"{name}: sample {sample['__key__']!r}: {reason}: {exc}")
    except ShardReadError as exc:
        problems.append(f"{name}: {exc}")
    return samples


def collect_garbage(root: str) -> list[str]:
    """Remove temporary files left by interrupted writers (never a committed output)."""
    layout, _ = load_run(root)
    removed = []
    for directory in layout.directories:
        fs, path = filesystem(directory)
        if not fs.exists(path):
            continue
        for name in fs.ls(path, detail=False):
            if name.rpartition("/")[2].startswith(TMP_MARKER):
                remove(name)
                removed.append(name)
    return removed
