"""DataComp resharder on the runner: a uid subset (optionally with multiplicities) -> new shards.

prepare() (driver, once per run; prepare.py): index the pool, locate every subset uid (pool.py), expand
multiplicities into copies and assign them to output shards deterministically (assignment.py); the
assignment is committed under <run>/plan/ with its fingerprint, so a rerun of unchanged inputs rewrites
nothing. Tasks are output shards (task id = `{:08d}`, input = its own assignment file), listed from the
committed plan/plan.json, so workers share no state and take no lock, and a task reads only its own
rows: its cost does not grow with the number of tasks. read(task) fetches each sample's byte range
from its pool shard (copying.py).

DataComp's resharder options: `first_shard`/`num_shards` pick pool shards by their number;
`shuffle_bufsize` shuffles each output shard's samples through a seeded buffer as they are read;
`blur_metadata` + `apply_blur`/`inject_blur_metadata` (face_blur.py) and `cls_file` (datacompnet.py)
are looked up per uid while preparing and travel in the assignment; `dry_run` assigns and reports
without writing the assignment or any shard.
"""
from __future__ import annotations

import json
import random
import tempfile
from typing import Iterator

import numpy as np
import pyarrow as pa

from reinforge.formats.recipe import config_digest
from reinforge.formats.sources import WebDatasetSource
from reinforge.formats.subset import UID_OK, make_subset, parse_hex_uids, write_subset
from reinforge.io.fingerprint import planned_already
from reinforge.io.manifest import RunLayout, Task
from reinforge.io.runs import done_manifests
from reinforge.io.storage import remove_tree
from reinforge.products.reshard import prepare
from reinforge.products.reshard.copying import DataCompExtras, Passthrough, buffer_shuffle, read_assigned
from reinforge.products.reshard.pool import ReshardError
from reinforge.products.reshard.recipe import ReshardRecipe
from reinforge.runtime.pipeline import Pipeline
from reinforge.stages.base import Stage


class ReshardPipeline(Pipeline):
    libraries = ("numpy", "pyarrow")  # assigns and copies bytes: no model, no image decoding

    def __init__(self, recipe: ReshardRecipe):
        self.recipe = recipe
        self.layout = RunLayout(recipe.output.rstrip("/"))

    def prepare(self, layout: RunLayout) -> None:
        """Plan the subset onto output shards and commit the plan, with the files DataComp's resharder
        writes beside the shards, unless the committed plan was made from the same inputs. A dry run plans
        (so refuses what a real run would) and writes nothing but uid indexes."""
        r = self.recipe
        if r.dry_run:
            self.dry_run_report()
            return
        inputs = prepare.read_inputs(r)
        if planned_already(layout, inputs.digest):
            return
        work = layout.plan_work
        try:
            plan = prepare.plan_subset(r, layout, work, inputs=inputs)
            try:
                prepare.commit(layout, r, plan, work, self._finished_tasks, inputs.digest)
            finally:
                plan.tasks.close()
        finally:
            remove_tree(work)

    def _finished_tasks(self) -> bool:
        return bool(done_manifests(self.layout.root, config_digest(self.recipe)))

    def tasks(self) -> list[Task]:
        """The output shards of the committed assignment; none before prepare() (or in a dry run)."""
        sizes = None if self.recipe.dry_run else prepare.committed_sizes(self.layout)
        firsts = np.cumsum([0, *(sizes or [])])
        return [Task(f"{j:08d}", (prepare.assignment_url(self.layout, f"{j:08d}"),), int(firsts[j]))
                for j in range(len(sizes or []))]

    def dry_run_report(self) -> dict:
        """What prepare() would decide, without writing it: the facts reshard.json and meta.json hold."""
        recipe = self.recipe.model_copy(update={"dry_run": True})
        with tempfile.TemporaryDirectory(prefix="reinforge-plan-") as work:  # nothing in the run folder
            plan = prepare.plan_subset(recipe, self.layout, work)
            plan.tasks.close()
        return {"reshard": plan.meta, "datacomp_meta": prepare.datacomp_meta(recipe, plan),
                "sizes": prepare.shard_sizes(plan)}

    def read(self, task: Task) -> Iterator[dict]:
        samples = read_assigned(task.inputs[0])
        if self.recipe.shuffle_bufsize > 0:
            samples = buffer_shuffle(samples, self.recipe.shuffle_bufsize,
                                     random.Random(f"{self.recipe.seed}:{task.id}"))
        return samples

    def build_stages(self) -> list[Stage]:
        r = self.recipe
        stages: list[Stage] = [Passthrough(r.input.uid_field)]
        if r.apply_blur or r.inject_blur_metadata or r.cls_file:
            stages.append(DataCompExtras(r.apply_blur, r.inject_blur_metadata, r.reencode_webp_quality))
        return stages

    def samples_per_batch(self) -> int:
        return 256

    def sidecars(self, task: Task, samples_out: int) -> dict[str, bytes]:
        stats = {"count": samples_out, "successes": samples_out, "failed_to_download": 0, "failed_to_resize": 0}
        return {f"shards/{task.id}_stats.json": json.dumps(stats, sort_keys=True).encode()}

    def probe_source(self):
        return WebDatasetSource(self.recipe.input.path)

    def probe_recipe(self, raw: dict, chosen: list[dict], folder: str) -> dict:
        """The chosen pool samples as a one-shard pool, each uid wanted twice: two output shards of
        len(chosen) samples, the warm-up and the measured task."""
        from reinforge.runtime.probe import write_shard
        uids = []
        for sample in chosen:
            try:
                uids.append(json.loads(sample["json"])[self.recipe.input.uid_field])
            except (KeyError, ValueError, TypeError):
                continue
        hi, lo, status = parse_hex_uids(pa.array(uids, pa.string()))
        ok = status == UID_OK
        if not ok.any():
            raise ReshardError(f"input.path: no probed pool sample has a {self.recipe.input.uid_field!r} uid")
        unique = np.unique(make_subset(hi[ok], lo[ok]))
        write_shard(f"{folder}/00000000.tar", chosen)
        write_subset(f"{folder}/probe.npy", unique, np.full(len(unique), 2, np.uint32))
        # the probe pool is one shard named 00000000, its uids are not in a class file: select and label
        # nothing; blurring stays as asked (its cost is part of the measurement)
        return {**raw, "subset": f"{folder}/probe.npy", "counts": "auto", "samples_per_shard": len(unique),
                "allow_missing": False, "first_shard": 0, "num_shards": None, "cls_file": None, "dry_run": False,
                "input": {**raw["input"], "path": f"{folder}/00000000.tar"}}

    def expected_samples_per_task(self, input_bytes_per_sample: float) -> float:
        return float(self.recipe.samples_per_shard)
