"""Runs one task on a worker: read -> stages -> shard, then commit in the exactly-once order.

Order of commit: shard renamed into place, errors file, manifest last. A task whose input tar is
unreadable, or whose skipped fraction passes the budget, leaves no shard and no manifest, only
failed/<task>.json with the reason (and the errors file) so that `status` can show it.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import platform
import time
from dataclasses import asdict

from reinforge.pipelines.base import Pipeline
from reinforge.pipelines.sources import Task
from reinforge.pipelines.storage import atomic_open, remove, write_bytes
from reinforge.schemas.manifest import OutputFile, RunLayout, StageStats, TaskManifest
from reinforge.schemas.wds import ShardReadError, ShardWriter
from reinforge.stages.base import Batch, SampleError


class TaskFailed(Exception):
    pass


def library_versions() -> dict:
    import numpy
    import PIL
    import timm
    import torch
    import torchvision

    import reinforge
    return {"reinforge": reinforge.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "numpy": numpy.__version__,
            "pillow": PIL.__version__}


def worker_identity() -> dict:
    import os
    import socket
    identity = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        import ray
        if ray.is_initialized():
            identity["node_id"] = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return identity


def batched(iterable, n: int):
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, n)):
        yield chunk


class TaskExecutor:
    def __init__(self, pipeline: Pipeline, layout: RunLayout, config_digest: str, max_error_fraction: float):
        self.pipeline = pipeline
        self.layout = layout
        self.config_digest = config_digest
        self.max_error_fraction = max_error_fraction
        self.stages = pipeline.build_stages()
        for stage in self.stages:
            stage.setup()
        self.versions = library_versions()
        for stage in self.stages:
            self.versions.update(stage.versions())

    def _run_stages(self, batch: Batch, stats: dict[str, StageStats]) -> Batch:
        for stage in self.stages:
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
        shard_url = self.layout.shard(task.id)
        try:
            with atomic_open(shard_url) as out:
                with ShardWriter(out) as writer:
                    for chunk in batched(self.pipeline.read(task), self.pipeline.samples_per_batch()):
                        samples_in += len(chunk)
                        batch = self._run_stages(Batch(chunk), stats)
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
        outputs = [OutputFile(self._relative(shard_url), out.bytes, out.sha256.hexdigest(), samples_out)]
        for relative, data in self.pipeline.sidecars(task, samples_out).items():
            write_bytes(f"{self.layout.root.rstrip('/')}/{relative}", data)
            outputs.append(OutputFile(relative, len(data), hashlib.sha256(data).hexdigest(), 0))
        manifest = TaskManifest(
            task_id=task.id, inputs=list(task.inputs) if len(task.inputs) <= 1 else [task.inputs[0], f"... {len(task.inputs)} files"],
            outputs=outputs,
            samples_in=samples_in, samples_out=samples_out, config_digest=self.config_digest,
            versions=self.versions, stages=stats, started_at=started, seconds=time.time() - started,
            worker=worker_identity())
        write_bytes(self.layout.manifest(task.id), manifest.to_json().encode())
        remove(self.layout.failure(task.id))
        return {"task": task.id, "status": "done", "samples_in": samples_in, "samples_out": samples_out,
                "errors": len(errors)}

    def _relative(self, url: str) -> str:
        return url[len(self.layout.root.rstrip("/")) + 1:]

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
