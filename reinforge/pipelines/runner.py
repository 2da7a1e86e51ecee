"""The driver: plan tasks, skip the done ones, run the rest on a fixed, pre-warmed Ray actor pool.

A task is done iff its manifest exists and carries this run's config digest, so a rerun costs one
listing plus reading small JSON files. Tasks stream through the pool with a bounded number in
flight per actor; only small status dicts come back to the driver, never data.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from pydantic import BaseModel

from reinforge.pipelines.ray_session import ray_session
from reinforge.pipelines.registry import build_pipeline
from reinforge.pipelines.sources import Task
from reinforge.pipelines.storage import exists, list_files, read_text, write_bytes
from reinforge.schemas.config import config_digest, semantic_dict
from reinforge.schemas.manifest import RunLayout, TaskManifest


class ConfigChangedError(Exception):
    """The run directory was made with a different recipe; refuse unless forced."""


@dataclass
class RunSummary:
    output: str
    tasks: int
    skipped: int = 0
    done: int = 0
    failed: list[dict] = field(default_factory=list)
    samples: int = 0
    errors: int = 0
    seconds: float = 0.0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def _diff(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _diff(a, b, f"{prefix}{i}.")]
    return [] if old == new else [prefix.rstrip(".")]


def prepare_run_dir(layout: RunLayout, recipe: BaseModel, force: bool) -> str:
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


def done_task_ids(layout: RunLayout, digest: str) -> set[str]:
    done = set()
    for url in list_files(layout.root + "/manifests", ".json"):
        try:
            manifest = TaskManifest.from_json(read_text(url))
        except (ValueError, KeyError, TypeError):
            continue  # unreadable manifest: the task is simply redone
        if manifest.config_digest == digest:
            done.add(manifest.task_id)
    return done


def _worker_class():
    import ray

    @ray.remote
    class TaskWorker:
        """Holds a product's stages (the whole teacher ensemble) for the life of the pool."""

        def __init__(self, recipe_json: dict, threads: int):
            import torch

            from reinforge.pipelines.executor import TaskExecutor
            from reinforge.schemas.config import parse_recipe
            torch.set_num_threads(threads)
            recipe = parse_recipe(recipe_json)
            overlap = recipe.resources.overlap_prep
            if overlap is None:
                overlap = recipe.resources.gpus_per_actor > 0
            self.executor = TaskExecutor(build_pipeline(recipe), RunLayout(recipe.output),
                                         config_digest(recipe), recipe.max_error_fraction, overlap)

        def ready(self) -> bool:
            return True

        def run(self, task: Task) -> dict:
            return self.executor.run(task)

    return TaskWorker


def pool_size(recipe: BaseModel, n_tasks: int) -> int:
    import ray
    res = recipe.resources
    if res.num_actors:
        return min(res.num_actors, n_tasks)
    available = ray.cluster_resources()
    fits = (available.get("GPU", 0) / res.gpus_per_actor if res.gpus_per_actor
            else available.get("CPU", 1) / res.cpus_per_actor)
    return max(1, min(n_tasks, math.floor(fits + 1e-9)))


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, unit="shard", disable=not enabled, file=sys.stderr,
                        dynamic_ncols=True, mininterval=0.5)
        self.started = time.perf_counter()
        self.samples = self.errors = 0

    def update(self, result: dict) -> None:
        self.samples += result.get("samples_out", 0)
        self.errors += result.get("errors", 0)
        rate = self.samples / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix(samples=self.samples, rate=f"{rate:.1f}/s", errors=self.errors, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_recipe(recipe: BaseModel, address: str | None = None, force: bool = False,
               progress: bool = True) -> RunSummary:
    import ray
    started = time.perf_counter()
    pipeline = build_pipeline(recipe)
    layout = RunLayout(recipe.output)
    digest = prepare_run_dir(layout, recipe, force)
    tasks = pipeline.plan()
    done = done_task_ids(layout, digest)
    todo = deque(t for t in tasks if t.id not in done)
    summary = RunSummary(output=recipe.output, tasks=len(tasks), skipped=len(tasks) - len(todo))
    pipeline.prepare_run(layout)
    if not todo:
        summary.seconds = time.perf_counter() - started
        return summary
    with ray_session(address, recipe.resources.object_store_memory_mb):
        res = recipe.resources
        worker = _worker_class().options(num_cpus=res.cpus_per_actor, num_gpus=res.gpus_per_actor,
                                         max_restarts=3, max_task_retries=3)
        recipe_json = recipe.model_dump(mode="json")
        actors = [worker.remote(recipe_json, max(1, int(res.cpus_per_actor))) for _ in range(pool_size(recipe, len(todo)))]
        ray.get([a.ready.remote() for a in actors])  # pre-warm: every model is loaded before the first task
        bar = Progress(len(tasks), summary.skipped, progress)
        t0 = time.perf_counter()
        load = {i: 0 for i in range(len(actors))}
        in_flight: dict = {}
        try:
            while todo or in_flight:
                for i in sorted(load, key=load.get):
                    while todo and load[i] < res.tasks_in_flight_per_actor:
                        task = todo.popleft()
                        in_flight[actors[i].run.remote(task)] = (task, i)
                        load[i] += 1
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                task, i = in_flight.pop(ready[0])
                load[i] -= 1
                try:
                    result = ray.get(ready[0])
                except (ray.exceptions.RayError) as exc:  # worker crashed beyond its retries: this task only
                    result = {"task": task.id, "status": "failed", "reason": f"worker error: {str(exc)[-500:]}"}
                    write_bytes(layout.failure(task.id), json.dumps(result, indent=1).encode())
                bar.update(result)
                if result["status"] == "done":
                    summary.done += 1
                    summary.samples += result["samples_out"]
                    summary.errors += result["errors"]
                else:
                    summary.failed.append(result)
        finally:
            bar.close()
            for actor in actors:
                ray.kill(actor)
        summary.seconds = time.perf_counter() - t0
    return summary
