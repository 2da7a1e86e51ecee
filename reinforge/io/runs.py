"""The one reader of a run directory's records (fsspec only: no Ray, no pipeline code).

Every tool and trainer that asks "which tasks of this run are done, and what did they write" asks
here, so they all agree: a task is done when its manifest is readable and carries the digest of the
run's current recipe. An unreadable manifest (truncated by a crash on a store without rename, or a
foreign file) means "not done", for the runner (which redoes the task), status, validate and every
trainer alike; an output without a manifest (a crash between rename and manifest) is not part of the run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

from reinforge.io.manifest import RunLayout, TaskManifest, join


class NotARunError(ValueError):
    pass


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int
    sha256: str


def _fs(url: str):
    return fsspec.core.url_to_fs(url)


def is_run_dir(url: str) -> bool:
    """A run folder (it has run.json), local or any fsspec URL, rather than shard URLs or a plain folder."""
    fs, path = _fs(url.rstrip("/"))
    return fs.exists(RunLayout(path).run_file)


def read_json(url: str) -> Optional[dict]:
    """A JSON object file: None when it does not exist; ValueError naming it when it is not an object."""
    fs, path = _fs(url)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{url}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{url}: not a JSON object")
    return value


def run_record(run: str) -> dict:
    """run.json (recipe, config digest), or NotARunError."""
    record = read_json(RunLayout(run.rstrip("/")).run_file)
    if record is None:
        raise NotARunError(f"{run} is not a reinforge run directory (no run.json)")
    return record


def dr_config(run: str) -> Optional[dict]:
    """The run's trainer config (dr_config.json), None when it has none."""
    return read_json(RunLayout(run.rstrip("/")).dr_config)


def require_dr_config(run: str) -> dict:
    """The run's trainer config, or ValueError naming the missing file."""
    config = dr_config(run)
    if config is None:
        raise ValueError(f"{RunLayout(run.rstrip('/')).dr_config}: not found (the run has no trainer config)")
    return config


# what the readers of status.json (report, `status --watch`) use of what the runner's Progress writes
STATUS_FIELDS = ("state", "tasks", "samples", "samples_per_second", "errors", "updated_at")
STATUS_TASK_FIELDS = ("total", "done", "failed", "running")


def live_status(run: str) -> Optional[dict]:
    """The live run's progress (status.json, written by the runner's Progress): None when there is none
    yet; ValueError naming the file when it is not one (a foreign or hand-edited file). `report` and
    `status --watch` both read it here, so neither trips on a missing field."""
    url = RunLayout(run.rstrip("/")).status
    status = read_json(url)
    if status is None:
        return None
    tasks = status.get("tasks")
    if (any(k not in status for k in STATUS_FIELDS) or not isinstance(status["state"], str)
            or not isinstance(tasks, dict) or any(not isinstance(tasks.get(k), int) for k in STATUS_TASK_FIELDS)
            or not isinstance(status["samples_per_second"], (int, float))):
        raise ValueError(f"{url}: not a run status (expected {', '.join(STATUS_FIELDS)})")
    return status


def scan_manifests(run: str) -> tuple[list[TaskManifest], list[str]]:
    """Every readable task manifest (in task order), and the URLs of the unreadable ones."""
    layout = RunLayout(run.rstrip("/"))
    fs, folder = _fs(layout.manifests_dir)
    readable, unreadable = [], []
    fs.invalidate_cache(folder)  # object stores cache listings: a manifest committed since must be seen
    if not fs.exists(folder):
        return readable, unreadable
    names = sorted(p.rpartition("/")[2] for p in fs.ls(folder, detail=False) if p.endswith(".json"))
    contents = _read_files(fs, [join(folder, name) for name in names])
    for name in names:
        data = contents[join(folder, name)]
        if isinstance(data, FileNotFoundError):
            continue  # removed since the listing (gc of a stale run): not part of the run
        if isinstance(data, Exception):
            raise data  # the store failed (after its own retries): say so rather than redo a done task
        try:
            readable.append(TaskManifest.from_json(data.decode()))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            unreadable.append(join(layout.manifests_dir, name))
    readable.sort(key=lambda m: m.task_id)
    return readable, unreadable


def _read_files(fs, paths: list[str]) -> dict:
    """{path: its bytes, or the exception reading it}: plain reads on a local disk (fsspec's per-file
    overhead is a third of a 10,000-task status), one concurrent batch on an object store."""
    if not isinstance(fs, LocalFileSystem):
        return fs.cat(paths, on_error="return")
    contents = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                contents[path] = f.read()
        except OSError as exc:
            contents[path] = exc
    return contents


def done_manifests(run: str, digest: Optional[str] = None) -> list[TaskManifest]:
    """The manifests of finished tasks of the run's current recipe (or of `digest`), in task order."""
    digest = digest or run_record(run).get("config_digest")
    return [m for m in scan_manifests(run)[0] if m.config_digest == digest]


def committed_outputs(run: str, suffix: str = ".tar", digest: Optional[str] = None) -> list[Shard]:
    """Every output ending in `suffix` that a finished task wrote, in path order."""
    layout = RunLayout(run.rstrip("/"))
    outputs = {out.path: Shard(layout.file(out.path), out.samples, out.sha256)
               for m in done_manifests(run, digest) for out in m.outputs if out.path.endswith(suffix)}
    return [outputs[p] for p in sorted(outputs)]


def committed_shards(run: str) -> list[Shard]:
    """Every tar shard a finished task of the run's current recipe wrote, in shard-name order."""
    return committed_outputs(run, ".tar")
