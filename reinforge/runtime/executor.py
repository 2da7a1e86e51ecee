"""Runs one task on a worker: read -> stages -> shard (or the pipeline's own output format, see
Pipeline.task_writer), then commit in the exactly-once order.

Order of commit: shard renamed into place, errors file, manifest last. A task whose input tar is
unreadable, or whose skipped fraction passes the budget, leaves no shard and no manifest, only
failed/<task>.json with the reason (and the errors file) so that `status` can show it.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import platform
import queue
import threading
import time
from dataclasses import asdict
from typing import Iterator

from reinforge.formats.wds import ShardReadError
from reinforge.io.manifest import OutputFile, RunLayout, StageStats, Task, TaskManifest
from reinforge.io.storage import atomic_open, remove, write_bytes
from reinforge.runtime.pipeline import Pipeline
from reinforge.stages.base import Batch, SampleError


class TaskFailed(Exception):
    pass


_MODULE_OF = {"pillow": "PIL"}  # distribution name -> module name, where they differ


def library_versions(libraries: tuple[str, ...] = ("torch", "torchvision", "timm", "numpy", "pillow")) -> dict:
    """Versions for a task manifest: reinforge, Python, and the libraries the product declares
    (Pipeline.libraries); only those are imported, so a product without models never loads torch."""
    import importlib

    import reinforge
    versions = {"reinforge": reinforge.__version__, "python": platform.python_version()}
    for name in libraries:
        versions[name] = importlib.import_module(_MODULE_OF.get(name, name)).__version__
    return versions


def worker_identity() -> dict:
    import os
    import socket
    import sys
    identity = {"host": socket.gethostname(), "pid": os.getpid()}
    ray = sys.modules.get("ray")  # a worker on Ray has imported it; any other need not (it takes seconds)
    if ray is not None and ray.is_initialized():
        identity["node_id"] = ray.get_runtime_context().get_node_id()
    return identity


def batched(iterable, n: int):
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, n)):
        yield chunk


def prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Run `iterator` in a background thread, `depth` items ahead; its exceptions re-raise here."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterator:
                if stop.is_set():
                    return
                items.put(item)
            items.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            items.put(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get(timeout=0.1)
            except queue.Empty:
                pass


class TaskExecutor:
    """Holds a pipeline's stages for the life of a worker. With `overlap`, the stages before the first
    model stage (decode, augment) prepare the next batch in a thread while the model runs on this one."""

    def __init__(self, pipeline: Pipeline, layout: RunLayout, config_digest: str, max_error_fraction: float,
                 overlap: bool = False):
        self.pipeline = pipeline
        self.layout = layout
        self.config_digest = config_digest
        self.max_error_fraction = max_error_fraction
        self.stages = pipeline.build_stages()
        for stage in self.stages:
            stage.setup()
        first_model = next((i for i, s in enumerate(self.stages) if s.is_model), len(self.stages))
        self.prep, self.rest = self.stages[:first_model], self.stages[first_model:]
        self.overlap = overlap
        self.versions = library_versions(pipeline.libraries)
        for stage in self.stages:
            self.versions.update(stage.versions())

    def _prepared(self, task: Task, stats: dict[str, StageStats]) -> Iterator[tuple[int, Batch]]:
        for chunk in batched(self.pipeline.read(task), self.pipeline.samples_per_batch()):
            yield len(chunk), self._run_stages(self.prep, Batch(chunk), stats)

    @staticmethod
    def _run_stages(stages: list, batch: Batch, stats: dict[str, StageStats]) -> Batch:
        for stage in stages:
            started, n_in, n_err = time.perf_counter(), len(batch.samples), len(batch.errors)
            batch = stage(batch)
            st = stats[stage.name]
            st.seconds += time.perf_counter() - started
            st.samples_in += n_in
            st.samples_out += len(batch.samples)
            for error in batch.errors[n_err:]:
                st.errors[error.reason] = st.errors.get(error.reason, 0) + 1
        return batch

    def run(self, task: Task) -> dict:
        started = time.time()
        stats = {stage.name: StageStats() for stage in self.stages}
        errors: list[SampleError] = []
        samples_in = 0
        shard_url = self.pipeline.output_url(self.layout, task)
        try:
            with atomic_open(shard_url, digest=True) as out:
                with self.pipeline.task_writer(out) as writer:
                    prepared = self._prepared(task, stats)
                    for n_read, batch in (prefetch(prepared) if self.overlap else prepared):
                        samples_in += n_read
                        batch = self._run_stages(self.rest, batch, stats)
                        errors.extend(batch.errors)
                        for sample in batch.samples:
                            writer.write(sample["__key__"], sample["members"])
                    samples_out = writer.samples
                if samples_in and len(errors) / samples_in > self.max_error_fraction:
                    raise TaskFailed(f"error budget exceeded: {len(errors)}/{samples_in} samples skipped "
                                     f"(max_error_fraction={self.max_error_fraction}): {_reasons(errors)}")
        except (ShardReadError, TaskFailed) as exc:
            return self._fail(task, str(exc), samples_in, errors, started)
        self._write_errors(task, errors)
        outputs = [OutputFile(self.layout.relative(shard_url), out.bytes, out.sha256.hexdigest(), samples_out)]
        for relative, data in self.pipeline.sidecars(task, samples_out).items():
            write_bytes(self.layout.file(relative), data)
            outputs.append(OutputFile(relative, len(data), hashlib.sha256(data).hexdigest(), 0))
        manifest = TaskManifest(
            task_id=task.id, inputs=list(task.inputs) if len(task.inputs) <= 1 else [task.inputs[0], f"... {len(task.inputs)} files"],
            outputs=outputs,
            samples_in=samples_in, samples_out=samples_out, config_digest=self.config_digest,
            versions=self.versions, stages=stats, started_at=started, seconds=time.time() - started,
            worker=worker_identity(), input_fingerprint=task.fingerprint)
        write_bytes(self.layout.manifest(task.id), manifest.to_json().encode())
        remove(self.layout.failure(task.id))
        return {"task": task.id, "status": "done", "samples_in": samples_in, "samples_out": samples_out,
                "errors": len(errors)}

    def _write_errors(self, task: Task, errors: list[SampleError]) -> None:
        if errors:
            lines = "".join(json.dumps(asdict(e), sort_keys=True) + "\n" for e in errors)
            write_bytes(self.layout.errors(task.id), lines.encode())
        else:
            remove(self.layout.errors(task.id))

    def _fail(self, task: Task, reason: str, samples_in: int, errors: list[SampleError], started: float) -> dict:
        self._write_errors(task, errors)
        record = {"task": task.id, "reason": reason, "inputs": list(task.inputs[:3]), "samples_read": samples_in,
                  "errors": len(errors), "seconds": time.time() - started}
        write_bytes(self.layout.failure(task.id), json.dumps(record, indent=1).encode())
        return {"task": task.id, "status": "failed", "reason": reason, "samples_in": samples_in,
                "samples_out": 0, "errors": len(errors)}


def _reasons(errors: list[SampleError]) -> str:
    counts: dict[str, int] = {}
    for e in errors:
        counts[f"{e.stage}/{e.reason}"] = counts.get(f"{e.stage}/{e.reason}", 0) + 1
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
