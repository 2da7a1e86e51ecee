"""The driver: record the recipe (run.json), prepare the run and list its tasks (Pipeline.prepare, then
.tasks), skip the done ones, run the rest on the actor pool (actor_pool.py), or without Ray: in this
process when only one task is left to run, on local worker processes when the recipe asks for them
(local_pool.py; the rule is runs_in_process). Local worker processes start before the run is prepared.

A task is done iff its manifest exists and carries this run's config digest, so a rerun costs one
listing plus reading small JSON files, plus the inputs' metadata (a stat per file, or one listing per
folder) to tell an input replaced since its task ran (io/fingerprint.py). Nothing but small
status dicts comes back to the driver.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

from pydantic import BaseModel

from reinforge.formats.loader_files import write_loader_files
from reinforge.formats.recipe import config_digest, semantic_dict
from reinforge.io import runs
from reinforge.io.fingerprint import changed_inputs, task_fingerprints
from reinforge.io.manifest import RunLayout, Task, TaskManifest
from reinforge.io.storage import absolute_url, exists, read_text, write_bytes
from reinforge.runtime.actor_pool import TICK_S, ActorPool, start_pool
from reinforge.runtime.local_pool import LocalPool, local_processes
from reinforge.runtime.pipeline import build_pipeline
from reinforge.runtime.ray_session import ray_session


class ConfigChangedError(Exception):
    """The run directory was made with a different recipe; refuse unless forced."""


class InputsChangedError(Exception):
    """Inputs of finished tasks changed since they ran; refuse unless told to redo them."""


@dataclass
class RunSummary:
    output: str
    tasks: int
    skipped: int = 0
    done: int = 0
    failed: list[dict] = field(default_factory=list)
    samples: int = 0
    errors: int = 0  # samples skipped with errors in the tasks that finished
    seconds: float = 0.0
    failed_samples: int = 0  # samples read by failed tasks before they failed: none of them is written
    failed_errors: int = 0  # of those, samples with errors
    redone_changed: list[str] = field(default_factory=list)  # done tasks redone for changed inputs

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def add(self, result: dict) -> None:
        if result["status"] == "done":
            self.done += 1
            self.samples += result["samples_out"]
            self.errors += result["errors"]
        else:
            self.failed.append(result)
            self.failed_samples += result.get("samples_in", 0)
            self.failed_errors += result.get("errors", 0)


def _diff(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _diff(a, b, f"{prefix}{i}.")]
    return [] if old == new else [prefix.rstrip(".")]


def write_run_record(layout: RunLayout, recipe: BaseModel, force: bool) -> str:
    """run.json for this recipe, and its config digest; ConfigChangedError when the run directory was
    made with another recipe, unless `force`."""
    digest = config_digest(recipe)
    if exists(layout.run_file):
        saved = json.loads(read_text(layout.run_file))
        if saved.get("config_digest") != digest and not force:
            changed = _diff(saved.get("recipe", {}), semantic_dict(recipe))
            raise ConfigChangedError(
                f"{layout.root} was made with a different recipe (digest {saved.get('config_digest')} != {digest}; "
                f"changed: {', '.join(changed[:6]) or 'unknown'}). Rerun with --force to redo its tasks with the new "
                f"recipe, or choose another output.")
    record = {"config_digest": digest, "product": recipe.product, "recipe": semantic_dict(recipe),
              "resources": recipe.resources.model_dump(mode="json"), "written_at": time.time()}
    write_bytes(layout.run_file, json.dumps(record, indent=1, sort_keys=True).encode())
    return digest


def done_manifests(layout: RunLayout, digest: str) -> dict[str, TaskManifest]:
    return {m.task_id: m for m in runs.done_manifests(layout.root, digest)}


def describe_changes(changed: dict[str, tuple[str, str]], limit: int = 3) -> str:
    shown = "; ".join(f"{task}: {old} -> {new}" for task, (old, new) in sorted(changed.items())[:limit])
    return shown + (f"; and {len(changed) - limit} more" if len(changed) > limit else "")


def fingerprinted_todo(pipeline, layout: RunLayout, digest: str, tasks: list[Task],
                       redo_changed: bool) -> tuple[list[Task], list[str]]:
    """The tasks to run, each carrying its inputs' fingerprint, and the done ones redone because
    their inputs changed. A changed input is refused unless `redo_changed`: those outputs may already
    be in use, and an accidental change (a copy that reset mtimes) would redo costly work silently."""
    done = done_manifests(layout, digest)
    prints = task_fingerprints(tasks, pipeline.input_files)
    changed = changed_inputs({t: m.input_fingerprint for t, m in done.items()}, prints)
    if changed and not redo_changed:
        raise InputsChangedError(
            f"{layout.root}: the inputs of {len(changed)} finished task(s) changed since they ran "
            f"({describe_changes(changed)}). Rerun with --redo-changed-inputs to redo them, or restore the inputs.")
    todo = [replace(t, fingerprint=prints[t.id]) for t in tasks if t.id not in done or t.id in changed]
    return todo, sorted(changed)


class Progress:
    """The progress bar, and RUN/status.json for `reinforge status --watch`: tasks total/done/failed/
    running, samples, samples/s, errors and the tasks each actor holds, rewritten atomically."""

    def __init__(self, total: int, initial: int, enabled: bool, status_url: str | None = None):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, unit="shard", disable=not enabled, file=sys.stderr,
                        dynamic_ncols=True, mininterval=0.5)
        self.started = time.perf_counter()
        self.started_at = time.time()
        self.total, self.skipped, self.done, self.failed = total, initial, 0, 0
        self.samples = self.errors = 0
        self.status_url = status_url
        self.written = -math.inf

    @property
    def rate(self) -> float:
        return self.samples / max(time.perf_counter() - self.started, 1e-9)

    def update(self, result: dict) -> None:
        self.samples += result.get("samples_out", 0)
        self.errors += result.get("errors", 0)
        if result.get("status") == "done":
            self.done += 1
        else:
            self.failed += 1
        self.bar.set_postfix(samples=self.samples, rate=f"{self.rate:.1f}/s", errors=self.errors, refresh=False)
        self.bar.update(1)

    def write_status(self, running: list[tuple[Task, int]], state: str = "running") -> None:
        """`running`: (task, actor index) of every task submitted and not yet returned."""
        now = time.perf_counter()
        if self.status_url is None or (state in ("starting", "running") and now - self.written < TICK_S):
            return
        self.written = now
        actors: dict[str, list[str]] = {}
        for task, actor in running:
            actors.setdefault(str(actor), []).append(task.id)
        status = {"state": state, "tasks": {"total": self.total, "done": self.skipped + self.done,
                                            "skipped": self.skipped, "failed": self.failed, "running": len(running),
                                            "pending": self.total - self.skipped - self.done - self.failed - len(running)},
                  "samples": self.samples, "samples_per_second": round(self.rate, 3), "errors": self.errors,
                  "started_at": self.started_at, "updated_at": time.time(), "actors": actors}
        write_bytes(self.status_url, json.dumps(status, indent=1, sort_keys=True).encode())

    def close(self) -> None:
        self.bar.close()


def one_line(reason: str) -> str:
    """A worker's error (a remote traceback) as its first words and its last line, the exception."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return reason.strip()
    return f"{lines[0].partition(':')[0]}: {lines[-1]}"


def _failed(layout: RunLayout, task: Task, reason: str) -> dict:
    """Record why a task failed (failed/<task>.json, for `status`) and return its result."""
    result = {"task": task.id, "status": "failed", "reason": one_line(reason)}
    record = {**result, "detail": reason} if result["reason"] != reason else result
    write_bytes(layout.failure(task.id), json.dumps(record, indent=1).encode())
    return result


def _start_pool(recipe: BaseModel, n_tasks: int, starting: Progress) -> list:
    """Start the actors, refreshing status.json while models load (so `status --watch` can tell a slow
    start from a dead driver); a start that fails leaves the state "interrupted", not "starting"."""
    try:
        # workers resolve a relative local path from their own directory, not the driver's
        return start_pool(recipe.model_copy(update={"output": absolute_url(recipe.output)}), n_tasks,
                          tick=lambda: starting.write_status([], "starting"))
    except BaseException:
        starting.write_status([], "interrupted")
        raise


def runs_in_process(recipe: BaseModel, address: str | None, tasks_to_run: int) -> bool:
    """Whether the runner skips Ray (local_pool.py: one task in this process, more on worker processes
    of this machine). resources.runner: "local" always, "ray" never; "auto" (the default) when all of
    these hold: exactly one task is left to run (Ray would start one actor for it anyway), no cluster is
    named (`address`, RAY_ADDRESS), no Ray is already initialised in this process, and the recipe asks
    for no GPU (on Ray the actor gets its GPU assigned). Outputs are the same bytes either way."""
    mode = recipe.resources.runner
    if mode != "auto":
        return mode == "local"
    ray_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    return (tasks_to_run == 1 and not (address or os.environ.get("RAY_ADDRESS")) and not ray_up
            and not recipe.resources.gpus_per_actor)


def run_recipe(recipe: BaseModel, address: str | None = None, force: bool = False,
               progress: bool = True, redo_changed: bool = False) -> RunSummary:
    """Run every task not yet done. `force`: accept a changed recipe; `redo_changed`: redo finished
    tasks whose inputs changed since they ran (refused otherwise, see fingerprinted_todo). The tasks run
    on Ray, or in this process for a one-task job (runs_in_process)."""
    started = time.perf_counter()
    pipeline = build_pipeline(recipe)
    layout = RunLayout(recipe.output)
    digest = write_run_record(layout, recipe, force)
    absolute = recipe.model_copy(update={"output": absolute_url(recipe.output)})  # as workers must read it
    # local worker processes (runner: local) start now: they import while the driver prepares the run
    workers = (LocalPool(absolute, local_processes(recipe))
               if recipe.resources.runner == "local" and local_processes(recipe) > 1 else None)
    # a named cluster is joined before prepare(), so that its passes (reshard and join planning) run there too
    try:
        with ray_session(address, recipe.resources.object_store_memory_mb) if address else nullcontext():
            owned, workers = workers, None  # _run owns them from here on
            return _run(recipe, pipeline, layout, digest, absolute, owned, address, redo_changed, progress, started)
    finally:
        if workers is not None:  # joining the cluster failed
            workers.shutdown()


def _run(recipe, pipeline, layout: RunLayout, digest: str, absolute, workers, address, redo_changed: bool,
         progress: bool, started: float) -> RunSummary:
    try:
        pipeline.prepare(layout)
        tasks = pipeline.tasks()
        todo_list, changed = fingerprinted_todo(pipeline, layout, digest, tasks, redo_changed)
        todo = deque(todo_list)
        summary = RunSummary(output=recipe.output, tasks=len(tasks), skipped=len(tasks) - len(todo),
                             redone_changed=changed)
        status_url = layout.status
        starting = Progress(len(tasks), summary.skipped, False, status_url)
        starting.write_status([], "starting" if todo else "finished")
        if not todo:
            write_loader_files(layout, digest)
            summary.seconds = time.perf_counter() - started
            return summary
        in_process = runs_in_process(recipe, address, len(todo))
        width = local_processes(recipe, len(todo))
        if workers is not None and width == 1:  # a job of one task runs in this process
            workers.shutdown()
            workers = None
        with nullcontext() if in_process else ray_session(address, recipe.resources.object_store_memory_mb):
            if workers is not None:  # the early workers become the pool, which shuts them down
                pool, workers = workers, None
                pool.width = width
            else:
                pool = (LocalPool(absolute, width) if in_process else
                        ActorPool(_start_pool(recipe, len(todo), starting), recipe.resources.tasks_in_flight_per_actor))
            bar = Progress(len(tasks), summary.skipped, progress, status_url)
            t0 = time.perf_counter()
            try:
                for task, result in pool.results(todo, tick=lambda: bar.write_status(pool.running())):
                    if isinstance(result, str):
                        result = _failed(layout, task, result)
                    bar.update(result)
                    summary.add(result)
            finally:
                bar.write_status(pool.running(), "interrupted" if todo or pool.in_flight else "finished")
                bar.close()
                pool.shutdown()
            summary.seconds = time.perf_counter() - t0
        write_loader_files(layout, digest)  # sizes.json, _info.json, dataset cards: what standard loaders read
        return summary
    finally:
        if workers is not None:
            workers.shutdown()
