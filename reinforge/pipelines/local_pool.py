"""Running tasks in the driver's own process, without Ray: the runner's choice for a job of one task.

Starting Ray and an actor costs seconds (processes, imports, a model load per actor); a job of one
task (a small reshard, a join of one shard, a demo) would spend most of its time there. LocalPool
holds the same TaskExecutor a Ray actor holds and runs the tasks one after another, so every task
writes the same bytes in the same commit order (shard, sidecars, errors, manifest last) as on Ray, and
resume, skipping and failure records work unchanged. It has ActorPool's interface (results, running,
in_flight, shutdown), so the runner's progress, status file and summary are shared.

The rule (runner.runs_in_process) lives with the runner, not in any product.
"""
from __future__ import annotations

import traceback
from collections import deque
from typing import Callable, Iterator, Union

from pydantic import BaseModel

from reinforge.pipelines.sources import Task


class LocalPool:
    def __init__(self, recipe: BaseModel):
        from reinforge.pipelines.executor import TaskExecutor
        from reinforge.pipelines.registry import build_pipeline
        from reinforge.schemas.config import config_digest
        from reinforge.schemas.manifest import RunLayout
        overlap = recipe.resources.overlap_prep
        if overlap is None:
            overlap = recipe.resources.gpus_per_actor > 0  # as the Ray actor decides it (actor_pool.worker_class)
        self.executor = TaskExecutor(build_pipeline(recipe), RunLayout(recipe.output), config_digest(recipe),
                                     recipe.max_error_fraction, overlap)
        self.current: Task | None = None

    @property
    def in_flight(self) -> dict:
        return {self.current.id: (self.current, 0)} if self.current else {}

    def running(self) -> list[tuple[Task, int]]:
        return [(self.current, 0)] if self.current else []

    def results(self, todo: deque, tick: Callable[[], None] = lambda: None
                ) -> Iterator[tuple[Task, Union[dict, str]]]:
        """As ActorPool.results: (task, result dict), or (task, reason) for a task that raised."""
        while todo:
            self.current = todo.popleft()
            tick()
            try:
                result: Union[dict, str] = self.executor.run(self.current)
            except Exception:  # noqa: BLE001 - what a Ray actor reports as a worker error
                result = f"worker error: {traceback.format_exc()[-500:]}"
            task, self.current = self.current, None
            yield task, result

    def shutdown(self) -> None:
        self.current = None
