"""TiC-DataComp time splits: bucket every uid by time, write DataComp subset files.

Every uid is parsed to (high, low) 64-bit halves and each row gets a bucket key. The work runs as tasks
(split_units.py; TaskMap: Ray, worker processes or inline) in two passes, and the driver holds per-unit
and per-bucket counts (O(inputs + uid buckets)), never a column:
1. per unit (whole row groups of ~unit_rows rows): parse, count the report's figures, and route each good
   row's (uid, key) to uid buckets (the top bits of the uid) in a part file, rows in input order;
2. per uid bucket: a stable uid sort of its rows from every unit (in unit order) finds the repeats, so the
   first occurrence in input order keeps its bucket; evaluation uids are removed; the uids are written
   grouped by output file, in uid order.
The driver then writes each output file (np.save's bytes) as the buckets' pieces in bucket order: uid
order, without a merge. Part files live in a work folder beside the output (so tasks on any node see
them), removed at the end. Units and buckets change how the work is cut, never the bytes written.

Every input row is accounted for exactly once (checked before anything is written):
  rows = malformed uids + duplicate rows + eval uids removed + sum of uids over all output files
where the output files are the time buckets plus `unknown` (missing or unparseable timestamp) and
`out_of_range` (a valid timestamp outside every bucket). Duplicates: the first occurrence in input
order (files in the order given, rows in file order) keeps its bucket; later ones are counted.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from reinforge.curation.split_units import (SAMPLE, UNIT_ROWS, SplitReport, bucket_part, check_input, cut_units,
                                            split_bucket, split_unit, unit_part)
from reinforge.curation.time_buckets import (OUT_OF_RANGE, TIMESTAMP_FORMATS, UNKNOWN, Bucketing, SplitError,
                                             make_bucketing, month_label)
from reinforge.formats.subset import SUBSET_DTYPE, first_occurrence, npy_header, read_subset, uid_order
from reinforge.io.parts import bucket_bits, bucket_parts
from reinforge.io.storage import absolute_url, atomic_open, filesystem, remove_tree, write_bytes
from reinforge.runtime.ray_session import TaskMap, ray_session, where_to_map

__all__ = ["SAMPLE", "SplitError", "SplitOptions", "SplitReport", "build_splits", "expand_inputs"]
COPY_BYTES = 64 << 20  # a piece of an output file is copied in blocks of this size


# ---------------------------------------------------------------- inputs

def expand_inputs(paths: list[str]) -> list[str]:
    """Files as given; a directory expands to its sorted *.parquet and *.npy files."""
    out = []
    for p in paths:
        fs, path = filesystem(p)
        if fs.isdir(path):
            found = sorted(f for f in fs.ls(path, detail=False) if f.endswith((".parquet", ".npy"))
                           and not f.endswith(".counts.npy"))
            if not found:
                raise SplitError(f"{p}: directory holds no .parquet or .npy files")
            prefix = p.split("://")[0] + "://" if "://" in p else ""
            out.extend(f if f.startswith(prefix) else prefix + f for f in found)
        elif fs.exists(path):
            out.append(p)
        else:
            raise SplitError(f"{p}: no such file")
    return out


@dataclass
class SplitOptions:
    uid_column: str = "uid"
    timestamp_column: str = "timestamp"
    timestamp_format: str = "epoch"
    by: str = "tic"
    boundaries: Optional[list[str]] = None
    range: Optional[str] = None
    eval_uids: list[str] = field(default_factory=list)
    memory_rows: int = 64 << 20  # no longer used (no pass holds the pool); kept so older commands and configs work
    unit_rows: int = UNIT_ROWS  # rows per pass-1 task, in whole row groups
    address: Optional[str] = None  # Ray cluster for the tasks (default: Ray of this process, else worker processes)


def build_splits(inputs: list[str], out_dir: str, options: SplitOptions, where: Optional[str] = None) -> dict:
    """Bucket every input row, write `<split>.npy`, `unknown.npy`, `out_of_range.npy`, `sizes.json` and
    the manifest `splits.json` under `out_dir`; return the manifest. The passes run as tasks on Ray
    (`options.address`, or the Ray of this process), on worker processes for a large pool, else inline
    (`where` names one: "ray", "processes", "inline"); the bytes are the same."""
    started = time.perf_counter()
    if options.timestamp_format not in TIMESTAMP_FORMATS:
        raise SplitError(f"--timestamp-format {options.timestamp_format!r}: "
                         f"expected one of {', '.join(TIMESTAMP_FORMATS)}")
    bucketing = make_bucketing(options.by, options.boundaries, options.range)
    files = [check_input(url, options.uid_column, options.timestamp_column, bucketing)
             for url in expand_inputs(inputs)]
    eval_set, eval_files = _load_eval(options.eval_uids)
    input_rows = [{"path": f.url, "kind": f.kind, "rows": f.rows} for f in files]
    rows = sum(f.rows for f in files)
    out = absolute_url(out_dir).rstrip("/")
    work = f"{out}/.splits.work"
    with ray_session(options.address) if options.address else nullcontext():
        units = cut_units(files, options.unit_rows)
        tasks = TaskMap(where or where_to_map(rows))
        try:
            remove_tree(work)  # a killed run's leftovers
            passes = _Passes(tasks, units, work, bucket_bits(rows))
            manifest = _split(passes, options, bucketing, eval_set, eval_files, input_rows, out)
        finally:
            tasks.close()
            remove_tree(work)
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    write_bytes(f"{out_dir.rstrip('/')}/sizes.json", json.dumps(manifest["sizes"], indent=1).encode())
    write_bytes(f"{out_dir.rstrip('/')}/splits.json", json.dumps(manifest, indent=1).encode())
    return manifest


def _load_eval(paths: list[str]) -> tuple[np.ndarray, list[dict]]:
    if not paths:
        return np.zeros(0, SUBSET_DTYPE), []
    loaded = [read_subset(p, counts="none") for p in paths]
    allu = np.concatenate([s.uids for s in loaded])
    order = uid_order(allu["f0"], allu["f1"])
    allu = allu[order]
    allu = allu[first_occurrence(allu["f0"], allu["f1"])]
    return allu, [{"path": s.path, "uids": len(s.uids)} for s in loaded]


# ---------------------------------------------------------------- the passes

@dataclass
class _Passes:
    """Where the tasks run, the units (pass 1), the part files' folder and the uid buckets (top `bits` bits)."""
    tasks: TaskMap
    units: list
    work: str
    bits: int


def _split(passes: _Passes, options: SplitOptions, bucketing: Bucketing, eval_set: np.ndarray,
           eval_files: list[dict], input_rows: list[dict], out: str) -> dict:
    report = SplitReport()
    unit_counts = []  # per unit: its rows per uid bucket
    columns = [options.uid_column, options.timestamp_column]
    shared = (bucketing, columns, options.timestamp_format, passes.work, passes.bits)
    for part, counts in passes.tasks(split_unit, [(u,) for u in passes.units], shared):
        report.merge(part)
        unit_counts.append(counts)
    keys = np.array(sorted(set(report.rows_by_key) | set(bucketing.fixed_keys()) | {UNKNOWN, OUT_OF_RANGE}), np.int32)
    buckets, bucket_counts = _dedupe_buckets(passes, unit_counts, eval_set, keys, report)
    remove_tree(f"{passes.work}/rows")
    totals = np.sum(bucket_counts, axis=0, dtype=np.int64) if bucket_counts else np.zeros(len(keys), np.int64)
    report.uids_by_key = dict(zip(keys.tolist(), totals.tolist()))
    manifest = _manifest(options, bucketing, report, input_rows, eval_files, len(eval_set), keys.tolist())
    _check_accounting(manifest)
    for slot, key in enumerate(keys.tolist()):
        _write_output(f"{out}/{_file_name(bucketing, key)}", slot, int(totals[slot]),
                      [bucket_part(passes.work, b) for b in buckets], bucket_counts)
    return manifest


def _dedupe_buckets(passes: _Passes, unit_counts: list[np.ndarray], eval_set: np.ndarray, keys: np.ndarray,
                    report: SplitReport) -> tuple[list[int], list[np.ndarray]]:
    """Pass 2 over the uid buckets that hold rows, in uid order; returns them and their uids per output file."""
    if not unit_counts:
        return [], []
    counts = np.stack(unit_counts)
    files = [unit_part(passes.work, u) for u in passes.units]
    shift = np.uint64(64 - passes.bits)
    eval_bounds = np.searchsorted(eval_set["f0"] >> shift, np.arange((1 << passes.bits) + 1, dtype=np.uint64))
    buckets = np.flatnonzero(counts.sum(axis=0)).tolist()

    def per_bucket():  # made as the tasks start: (units x buckets) part ranges are never all held
        for b, parts in enumerate(bucket_parts(files, counts)):
            if parts:
                evals = np.ascontiguousarray(eval_set[eval_bounds[b]:eval_bounds[b + 1]])  # the bucket's eval uids
                yield parts, evals, bucket_part(passes.work, b)
    bucket_counts = []
    for part, uids_per_key in passes.tasks(split_bucket, per_bucket(), (keys,)):
        report.merge(part)
        bucket_counts.append(uids_per_key)
    return buckets, bucket_counts


def _write_output(url: str, slot: int, total: int, files: list[str], counts: list[np.ndarray]) -> None:
    """An output file, np.save's bytes: the header, then each uid bucket's piece for it, in bucket (uid) order."""
    width, written = SUBSET_DTYPE.itemsize, 0
    with atomic_open(url) as out:
        out.write(npy_header(SUBSET_DTYPE, total))
        for file, n in zip(files, counts):
            if not n[slot]:
                continue
            fs, path = filesystem(file)
            with fs.open(path, "rb") as f:
                f.seek(int(n[:slot].sum()) * width)
                left = int(n[slot]) * width
                while left:
                    block = f.read(min(left, COPY_BYTES))
                    if not block:
                        raise AssertionError(f"{file}: shorter than its counts say")
                    out.write(block)
                    left -= len(block)
            written += int(n[slot])
    if written != total:
        raise AssertionError(f"{url}: wrote {written} uids, expected {total}")


# ---------------------------------------------------------------- the manifest

def _file_name(bucketing: Bucketing, key: int) -> str:
    return {UNKNOWN: "unknown.npy", OUT_OF_RANGE: "out_of_range.npy"}.get(key) or f"{bucketing.name(key)}.npy"


def _manifest(options: SplitOptions, bucketing: Bucketing, r: SplitReport, inputs: list[dict],
              eval_files: list[dict], eval_uids: int, keys: list[int]) -> dict:
    steps = [k for k in keys if k >= 0]
    splits = {}
    for k in steps:
        start, end = bucketing.bucket_range(k)
        splits[bucketing.name(k)] = {
            "file": _file_name(bucketing, k), "uids": r.uids_by_key.get(k, 0), "rows": r.rows_by_key.get(k, 0),
            "first_month": start, "last_month": end, "duplicates_dropped": r.duplicates_by_key.get(k, 0),
            "eval_removed": r.eval_removed_by_key.get(k, 0)}

    def side(k: int) -> dict:
        return {"file": _file_name(bucketing, k), "uids": r.uids_by_key.get(k, 0), "rows": r.rows_by_key.get(k, 0),
                "duplicates_dropped": r.duplicates_by_key.get(k, 0), "eval_removed": r.eval_removed_by_key.get(k, 0)}

    return {
        "format": "reinforge.time_splits/1",
        "inputs": inputs,
        "uid_column": options.uid_column,
        "timestamp": {"column": options.timestamp_column, "format": options.timestamp_format},
        "bucketing": bucketing.describe(),
        "steps": [bucketing.name(k) for k in steps],
        "splits": splits,
        "sizes": {bucketing.name(k): r.uids_by_key.get(k, 0) for k in steps},
        "unknown": {**side(UNKNOWN), "missing": r.missing, "unparseable": r.unparseable,
                    "unparseable_sample": r.unparseable_sample},
        "out_of_range": {**side(OUT_OF_RANGE), "below": r.below, "above": r.above,
                         "earliest": None if r.earliest_out is None else month_label(r.earliest_out),
                         "latest": None if r.latest_out is None else month_label(r.latest_out)},
        "malformed_uids": {"rows": sum(r.malformed.values()), "by_reason": r.malformed, "sample": r.malformed_sample},
        "duplicates": {"rows": r.duplicates, "policy": "first occurrence in input order kept, later rows counted here",
                       "conflicting_bucket": r.duplicates_conflicting, "sample": r.duplicate_sample},
        "eval": {"files": eval_files, "uids": eval_uids, "removed": sum(r.eval_removed_by_key.values()),
                 "removed_by_split": {bucketing.name(k) if k >= 0 else _file_name(bucketing, k)[:-4]: v
                                      for k, v in sorted(r.eval_removed_by_key.items())}},
        "rows": r.rows,
    }


def _check_accounting(m: dict) -> None:
    written = sum(s["uids"] for s in m["splits"].values()) + m["unknown"]["uids"] + m["out_of_range"]["uids"]
    accounted = written + m["malformed_uids"]["rows"] + m["duplicates"]["rows"] + m["eval"]["removed"]
    if accounted != m["rows"]:
        raise RuntimeError(f"split accounting broken: {m['rows']} rows read, {accounted} accounted for")
