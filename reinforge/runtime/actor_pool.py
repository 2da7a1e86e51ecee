"""The fixed, pre-warmed pool of Ray actors that model stages run in, and how tasks flow through it.

Each actor holds a product's stages (the whole teacher ensemble) for the life of the pool and keeps up
to `depth` tasks queued. Only small status dicts come back. When an actor is lost (its process or node
died), the tasks it held go back to the queue for the live actors at once: Ray restarts the actor where
it fits, but a lost node's capacity may never return, so nothing waits for that. A restarted actor
rejoins the pool when its ready() answers.
"""
from __future__ import annotations

import math
import time
from collections import deque
from typing import Callable, Iterator, Union

from pydantic import BaseModel

from reinforge.io.manifest import Task

MAX_TASK_LOSSES = 3  # a task whose actor dies under it this often (a poison input, not bad luck) fails
POOL_EMPTY_WAIT_S = 300.0  # with every actor lost, how long to wait for Ray to restart one somewhere
TICK_S = 2.0  # the driver wakes at least this often (the live status file is refreshed then)


def worker_class():
    import ray

    from reinforge.runtime.pipeline import build_pipeline

    @ray.remote
    class TaskWorker:
        def __init__(self, recipe: BaseModel, threads: int):  # the recipe's class pickles by reference
            import torch

            from reinforge.formats.recipe import config_digest
            from reinforge.io.manifest import RunLayout
            from reinforge.runtime.executor import TaskExecutor
            torch.set_num_threads(threads)
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


def start_pool(recipe: BaseModel, n_tasks: int, tick: Callable[[], None] = lambda: None) -> list:
    """Start the actors and wait until every one has loaded its models (pre-warm); `tick` is called at
    least every TICK_S seconds meanwhile."""
    import ray

    from reinforge.runtime.ray_session import worker_options
    res = recipe.resources
    worker = worker_class().options(num_cpus=res.cpus_per_actor, num_gpus=res.gpus_per_actor,
                                    max_restarts=3, max_task_retries=0,  # lost tasks come back to us
                                    **worker_options())  # the driver's storage endpoint and credentials
    actors = [worker.remote(recipe, max(1, int(res.cpus_per_actor))) for _ in range(pool_size(recipe, n_tasks))]
    waiting = [a.ready.remote() for a in actors]
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=TICK_S)
        ray.get(ready)  # raises an actor's start-up error at once
        tick()
    return actors


class ActorPool:
    def __init__(self, actors: list, depth: int):
        self.actors = actors
        self.depth = depth
        self.load = {i: 0 for i in range(len(actors))}  # live actors only: index -> tasks held
        self.in_flight: dict = {}  # run() ref -> (task, actor index)
        self.restarting: dict = {}  # ready() ref of a lost actor -> its index; resolves once Ray restarted it
        self.losses: dict[str, int] = {}  # task id -> actors lost while holding it
        self.empty_since: float | None = None

    def running(self) -> list[tuple[Task, int]]:
        return list(self.in_flight.values())

    def results(self, todo: deque, tick: Callable[[], None] = lambda: None
                ) -> Iterator[tuple[Task, Union[dict, str]]]:
        """Run every task of `todo` (consumed); yield (task, result dict) as tasks finish, or (task, reason)
        for a task that could not run. `tick` is called at least every TICK_S seconds."""
        import ray
        while todo or self.in_flight:
            self._submit(todo)
            if not self.in_flight:  # every actor is lost: give Ray a while to restart one, then stop
                self.empty_since = self.empty_since or time.perf_counter()
                if not self.restarting or time.perf_counter() - self.empty_since > POOL_EMPTY_WAIT_S:
                    while todo:
                        yield todo.popleft(), "no live workers left (their nodes or processes died)"
                    return
            ready, _ = ray.wait(list(self.in_flight) + list(self.restarting), num_returns=1, timeout=TICK_S)
            tick()
            if not ready:
                continue
            if ready[0] in self.restarting:
                self._rejoin(ready[0])
                continue
            task, i = self.in_flight.pop(ready[0])
            if i in self.load:
                self.load[i] -= 1
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:  # its process or node died: not the task's fault
                self._lost(i)
                self.losses[task.id] = self.losses.get(task.id, 0) + 1
                if self.losses[task.id] < MAX_TASK_LOSSES:
                    todo.appendleft(task)
                    continue
                result = f"worker lost {MAX_TASK_LOSSES} times: {str(exc)[-500:]}"
            except ray.exceptions.RayError as exc:
                result = f"worker error: {str(exc)[-500:]}"
            yield task, result

    def _submit(self, todo: deque) -> None:
        for i in sorted(self.load, key=self.load.get):
            while todo and self.load[i] < self.depth:
                task = todo.popleft()
                self.in_flight[self.actors[i].run.remote(task)] = (task, i)
                self.load[i] += 1

    def _lost(self, i: int) -> None:
        if i in self.load:
            del self.load[i]
            self.restarting[self.actors[i].ready.remote()] = i

    def _rejoin(self, ref) -> None:
        import ray
        i = self.restarting.pop(ref)
        try:
            ray.get(ref)
            self.load[i], self.empty_since = 0, None  # restarted: it takes tasks again
        except ray.exceptions.ActorUnavailableError:
            self.restarting[self.actors[i].ready.remote()] = i  # not known dead yet: ask again
        except ray.exceptions.RayError:
            pass  # out of restarts

    def shutdown(self) -> None:
        import ray
        for actor in self.actors:
            ray.kill(actor)
