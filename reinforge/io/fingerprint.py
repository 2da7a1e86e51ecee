"""Input fingerprints: what a task's input files looked like when its task was listed, from metadata only
(size plus mtime / ETag / generation), never from their bytes, so that a rerun, `status` and `validate`
can tell an input replaced under the same name at the cost of a stat per file (local) or one listing
per folder (object stores).

A one-file task's fingerprint is readable (`size=1234 mtime_ns=...`); a task of many files (an
ImageFolder group) is `files=N sha256=...` over its (input, size, version) list in task order, so an
added, removed, renamed or relabelled file changes it as well. A manifest without one (written before
fingerprints existed) is "unknown": never reported as changed.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections import defaultdict
from typing import Callable, Iterable

from fsspec.implementations.local import LocalFileSystem

from reinforge.io.manifest import RunLayout, Task
from reinforge.io.storage import exists, filesystem, read_text

MISSING = (-1, "missing")
# what object stores report as a file's version, most specific first (s3, gcs, azure, local via fsspec, memory)
VERSION_KEYS = ("ETag", "etag", "md5Hash", "generation", "version_id", "mtime", "LastModified", "last_modified",
                "updated", "created")


def _version(info: dict) -> str:
    for key in VERSION_KEYS:
        value = info.get(key)
        if value not in (None, ""):
            if isinstance(value, datetime.datetime):  # listings and info() disagree on the type, not the time
                value = value.timestamp()
            return f"{key}={value:.6f}" if isinstance(value, float) else f"{key}={value}"
    return "version=unknown"


def _local_versions(paths: Iterable[str]) -> dict[str, tuple[int, str]]:
    versions = {}
    for path in paths:
        try:
            st = os.stat(path)  # follows symlinks, as the readers do
        except OSError:
            versions[path] = MISSING
            continue
        versions[path] = (st.st_size, f"mtime_ns={st.st_mtime_ns}")
    return versions


def _remote_versions(fs, paths: Iterable[str]) -> dict[str, tuple[int, str]]:
    """One listing per folder (not a request per file); info() for a name the listing lacks."""
    by_folder: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        by_folder[path.rpartition("/")[0]].append(path)
    versions = {}
    for folder, wanted in by_folder.items():
        fs.invalidate_cache(folder)  # a long-lived process must not compare against an old listing
        try:
            listed = {fs._strip_protocol(e["name"]): e for e in fs.ls(folder, detail=True)}
        except (OSError, NotImplementedError, ValueError):
            listed = {}
        for path in wanted:
            info = listed.get(path)
            if info is None:
                try:
                    info = fs.info(path)
                except (OSError, ValueError):
                    versions[path] = MISSING
                    continue
            versions[path] = (int(info.get("size") or 0), _version(info))
    return versions


def file_versions(urls: Iterable[str]) -> dict[str, tuple[int, str]]:
    """url -> (size, version) of every file; (-1, "missing") for one that is gone."""
    by_protocol: dict[str, list[str]] = defaultdict(list)
    for url in urls:
        by_protocol[url.split("://")[0] if "://" in url else ""].append(url)
    versions = {}
    for group in by_protocol.values():
        fs, _ = filesystem(group[0])
        paths = {url: fs._strip_protocol(url) for url in group}
        found = (_local_versions if isinstance(fs, LocalFileSystem) else
                 lambda p: _remote_versions(fs, p))(set(paths.values()))
        versions.update((url, found[path]) for url, path in paths.items())
    return versions


def fingerprint(task: Task, files: list[str], versions: dict[str, tuple[int, str]]) -> str:
    if len(files) == 1 and list(task.inputs) == files:
        size, version = versions[files[0]]
        return f"size={size} {version}"
    listing = [task.first_index] + [[item, *versions[f]] for item, f in zip(task.inputs, files)]
    digest = hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()
    return f"files={len(files)} sha256={digest[:32]}"


def task_fingerprints(tasks: list[Task], files_of: Callable[[Task], list[str]]) -> dict[str, str]:
    """task id -> fingerprint of its input files (`files_of(task)`, one per entry of task.inputs)."""
    files = {t.id: files_of(t) for t in tasks}
    versions = file_versions({f for fs in files.values() for f in fs})
    return {t.id: fingerprint(t, files[t.id], versions) for t in tasks}


def changed_inputs(recorded: dict[str, str | None], current: dict[str, str]) -> dict[str, tuple[str, str]]:
    """task id -> (recorded, current) for tasks whose inputs changed since they ran. A task recorded
    without a fingerprint (an old manifest) is unknown, not changed."""
    return {task: (old, current[task]) for task, old in recorded.items()
            if old is not None and task in current and current[task] != old}


def plan_digest(plan_format: str, recipe: dict, files: list[str], versions: dict[str, tuple[int, str]]) -> str:
    """What a plan is made from: its format, the recipe's fields that shape it, and the size and version of
    every file it reads (`versions`: file_versions of them, the ones the plan is then made from). Equal
    digests, equal plans: prepare() keeps it in RunLayout.plan_inputs and does not plan again while it holds."""
    record = [plan_format, recipe, [versions[f] for f in files]]
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def planned_already(layout: RunLayout, digest: str) -> bool:
    """Whether the run's committed plan was made from inputs with this plan_digest."""
    if not (exists(layout.plan_inputs) and exists(layout.plan_record)):
        return False
    try:
        return json.loads(read_text(layout.plan_inputs)).get("inputs") == digest
    except ValueError:  # a damaged record: plan again
        return False
