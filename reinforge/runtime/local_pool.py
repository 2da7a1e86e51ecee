"""Running tasks without Ray, on this machine: in the driver's own process for a job of one task (the
runner's automatic choice), or on a few worker processes when asked (resources.runner: local).

Starting Ray and an actor costs seconds (processes, imports, a model load per actor); a job of one
task (a small reshard, a join of one shard, a demo) would spend most of its time there. LocalPool
holds the same TaskExecutor a Ray actor holds, so every task writes the same bytes in the same commit
order (shard, sidecars, errors, manifest last) as on Ray, and resume, skipping and failure records work
unchanged. It has ActorPool's interface (results, running, in_flight, shutdown), so the runner's
progress, status file and summary are shared. With more than one process, each worker process (spawned
fresh, never forked from the driver's threads) builds its executor once, at its first task, and takes
tasks one at a time. The processes start when the pool is made: the runner makes it before the run is
prepared, so that their interpreters and imports overlap the driver's work.

The rule for choosing it (runner.runs_in_process) lives with the runner, not in any product.
"""
from __future__ import annotations

import math
import os
import sys
import traceback
import types
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from typing import Callable, Iterator, Union

from pydantic import BaseModel

from reinforge.io.manifest import Task

TICK_S = 2.0  # as actor_pool.TICK_S: the status file is refreshed at least this often

_recipe = None  # a worker process's recipe, and its TaskExecutor, built at its first task
_executor = None


def _make_executor(recipe: BaseModel):
    from reinforge.formats.recipe import config_digest
    from reinforge.io.manifest import RunLayout
    from reinforge.runtime.executor import TaskExecutor
    from reinforge.runtime.pipeline import build_pipeline
    overlap = recipe.resources.overlap_prep
    if overlap is None:
        overlap = recipe.resources.gpus_per_actor > 0  # as the Ray actor decides it (actor_pool.worker_class)
    return TaskExecutor(build_pipeline(recipe), RunLayout(recipe.output), config_digest(recipe),
                        recipe.max_error_fraction, overlap)


def _start_worker(recipe: BaseModel) -> None:
    """A worker process's start: the imports its tasks need, nothing that needs the run prepared (the
    driver may still be preparing it); the executor is built at the first task."""
    global _recipe
    import importlib
    _recipe = recipe
    for module in ("reinforge.runtime.executor", type(recipe).pipeline.partition(":")[0]):
        importlib.import_module(module)


def _started() -> None:
    """Submitted once per worker process when the pool starts, so that all of them start at once."""


def _run_in_worker(task: Task) -> Union[dict, str]:
    global _executor
    if _executor is None:
        try:
            _executor = _make_executor(_recipe)
        except Exception:  # noqa: BLE001 - as a Ray actor that cannot start: every task it is given fails
            return f"worker error: {traceback.format_exc()[-500:]}"
    return _run(_executor, task)


def _run(executor, task: Task) -> Union[dict, str]:
    try:
        return executor.run(task)
    except Exception:  # noqa: BLE001 - what a Ray actor reports as a worker error
        return f"worker error: {traceback.format_exc()[-500:]}"


@contextmanager
def plain_main():
    """Spawned workers re-run the parent's __main__ script unless it is guarded by `if __name__ ==
    "__main__"`; they need nothing from it (their code is this module), so while a worker is being
    started (ProcessPoolExecutor starts them inside submit) __main__ is an empty module."""
    real = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = real


def local_processes(recipe: BaseModel, tasks: int | None = None) -> int:
    """resources.num_actors, else as many as the machine's CPUs fit at cpus_per_actor; at most `tasks`."""
    res = recipe.resources
    fits = res.num_actors or math.floor((os.cpu_count() or 1) / res.cpus_per_actor + 1e-9)
    return max(1, min(tasks, fits) if tasks is not None else fits)


class LocalPool:
    def __init__(self, recipe: BaseModel, processes: int = 1):
        self.running_tasks: dict[Future | None, Task] = {}
        if processes == 1:
            self.executor, self.processes = _make_executor(recipe), None
        else:
            import multiprocessing
            self.executor = None
            self.processes = ProcessPoolExecutor(processes, multiprocessing.get_context("spawn"), _start_worker,
                                                 (recipe,))
            with plain_main():  # the pool starts its processes on demand: ask for all of them now
                for _ in range(processes):
                    self.processes.submit(_started)
        self.width = processes  # tasks in flight at most (the runner may lower it)

    @property
    def in_flight(self) -> dict:
        return dict(self.running_tasks)

    def running(self) -> list[tuple[Task, int]]:
        return [(task, i) for i, task in enumerate(self.running_tasks.values())]

    def results(self, todo: deque, tick: Callable[[], None] = lambda: None
                ) -> Iterator[tuple[Task, Union[dict, str]]]:
        """As ActorPool.results: (task, result dict), or (task, reason) for a task that raised."""
        if self.processes is None:
            while todo:
                task = todo.popleft()
                self.running_tasks[None] = task
                tick()
                result = _run(self.executor, task)
                del self.running_tasks[None]
                yield task, result
            return
        from concurrent.futures.process import BrokenProcessPool
        while todo or self.running_tasks:
            while todo and len(self.running_tasks) < self.width:
                task = todo.popleft()
                try:
                    with plain_main():
                        self.running_tasks[self.processes.submit(_run_in_worker, task)] = task
                except BrokenProcessPool as exc:  # the workers died: like Ray with no live actors left
                    for lost in [task, *todo]:
                        yield lost, f"no live workers left: {exc}"
                    todo.clear()
                    break
            if not self.running_tasks:
                continue
            done, _ = wait(list(self.running_tasks), timeout=TICK_S, return_when=FIRST_COMPLETED)
            tick()
            for future in done:
                task = self.running_tasks.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool as exc:  # a worker died (killed, out of memory): not the task's fault
                    result = f"worker lost: {exc}"
                yield task, result

    def shutdown(self) -> None:
        """Stop the workers at once (as ray.kill stops actors): a task still running leaves only its
        temporary file, never a committed shard or manifest, and runs again on the next run."""
        if self.processes is not None:
            workers = list((getattr(self.processes, "_processes", None) or {}).values())
            self.processes.shutdown(wait=False, cancel_futures=True)
            for worker in workers:
                if worker.is_alive():
                    worker.terminate()
            for worker in workers:
                worker.join()
        self.running_tasks.clear()
