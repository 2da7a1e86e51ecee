"""What a product is: tasks from a source, a list of stages, and a batch size for them.

A product's lifecycle, the same for every product:
  prepare(layout)  once per run, on the driver, before any task: whatever the run needs beside its
                   tasks (RUN/plan/ files, dr_config.json, ...). A rerun whose inputs did not change
                   finds it done (products that index or assign keep a fingerprint, e.g. reshard's
                   plan/plan.json) and rewrites nothing its finished tasks depend on.
  tasks()          the run's tasks: pure and cheap, never writes. The runner asks after prepare();
                   the read-only tools (status, validate) ask without it.
"""
from __future__ import annotations

import importlib
from typing import Iterator

from pydantic import BaseModel

from reinforge.formats.image import DEFAULT_MAX_PIXELS
from reinforge.formats.limits import Limits, declared_limits
from reinforge.formats.wds import ShardWriter
from reinforge.io.manifest import RunLayout, Task
from reinforge.stages.base import Stage


class Pipeline:
    """Subclasses set `recipe` and `source` (or override tasks/read) and build their stages; the
    runner and executor do the rest."""

    recipe: BaseModel
    source = None  # a reinforge.formats.sources source: tasks(), read(task) -> samples
    # libraries whose versions each task manifest records (those that can change the output bytes);
    # a product that runs no model declares fewer, and its workers then never import torch
    libraries: tuple[str, ...] = ("torch", "torchvision", "timm", "numpy", "pillow")

    def prepare(self, layout: RunLayout) -> None:
        """Driver-side, once per run before tasks(): write run-level files (e.g. the trainer's config)."""

    def tasks(self) -> list[Task]:
        """The run's tasks (see the module docstring): never writes into the run directory."""
        return self.source.tasks()

    def read(self, task: Task) -> Iterator[dict]:
        return self.source.read(task)

    def input_files(self, task: Task) -> list[str]:
        """The file behind each entry of task.inputs, whose size and version fingerprint the task."""
        return self.source.input_files(task) if self.source is not None else list(task.inputs)

    def build_stages(self) -> list[Stage]:
        """Called once per worker; the last stage must leave {"__key__", "members"} per sample."""
        raise NotImplementedError

    def samples_per_batch(self) -> int:
        raise NotImplementedError

    def output_url(self, layout: RunLayout, task: Task) -> str:
        """Where a task's one output goes; committed by rename, before the sidecars and the manifest."""
        return layout.shard(task.id)

    def task_writer(self, fileobj):
        """A context manager over `fileobj` with write(key, members) and a `samples` count; the default
        writes a tar shard, a pipeline may write another format (e.g. a Parquet table) instead."""
        return ShardWriter(fileobj)

    def sidecars(self, task: Task, samples_out: int) -> dict[str, bytes]:
        """Extra per-task files, relative to the run directory (e.g. DataComp's shards/<id>_stats.json);
        committed after the shard and before the manifest, and listed in the manifest's outputs."""
        return {}

    def max_image_pixels(self) -> int:
        spec = getattr(self.recipe, "input", None)
        return getattr(spec, "max_image_pixels", DEFAULT_MAX_PIXELS)

    def output_limits(self, layout: RunLayout) -> Limits:
        """Bounds for reading the run's own shards back (validate): what its trainer config declares
        (N, top-k, dims, captions), the defaults of formats.limits where it has none."""
        from reinforge.io.runs import dr_config
        try:
            config = dr_config(layout.root)
        except ValueError:
            config = None  # the checker reports an unreadable trainer config
        return declared_limits(config, self.max_image_pixels())

    def sample_checker(self, layout: RunLayout):
        """A callable(members) raising on a sample that breaks the product's schema, for `validate`."""
        return None

    # ---- what `reinforge plan` asks (reinforge.runtime.probe)

    def probe_source(self):
        """Where the probe's input samples are read from: the recipe's own input."""
        return self.source

    def probe_recipe(self, raw: dict, chosen: list[dict], folder: str) -> dict:
        """The recipe (as a dict) pointed at the chosen input samples, written under `folder` so that the
        probe run has a warm-up task and then the measured one."""
        from reinforge.runtime.probe import probe_shards
        fields = {"path": probe_shards(folder, chosen)}
        if "format" in raw["input"]:
            fields["format"] = "webdataset"
        return {**raw, "input": {**raw["input"], **fields}}

    def expected_samples_per_task(self, input_bytes_per_sample: float) -> float:
        """Samples one task will hold: an input shard's worth, from the sizes of the first shards."""
        from reinforge.formats.sources import expand_shards
        from reinforge.io.storage import filesystem
        from reinforge.runtime.probe import TAR_TRAILER_MEAN
        spec = self.recipe.input
        if getattr(spec, "format", "webdataset") == "imagefolder":
            return float(spec.samples_per_task)
        sizes = [fs.size(path) for fs, path in map(filesystem, expand_shards(spec.path)[:8])]
        return max(1.0, (sum(sizes) / len(sizes) - TAR_TRAILER_MEAN) / input_bytes_per_sample)


def build_pipeline(recipe: BaseModel) -> Pipeline:
    """The pipeline a recipe names (Recipe.pipeline): the runtime knows products only by this path."""
    module, _, name = type(recipe).pipeline.partition(":")
    return getattr(importlib.import_module(module), name)(recipe)
