"""`reinforge plan`: how long a recipe takes on N samples and how much it writes, measured, not guessed.

A probe takes M samples of the recipe's own input (a seeded random choice among the first 4M, so a
sorted input does not make the probe one class), writes them as a WebDataset shard twice (a warm-up
task, then the measured one) and runs the unchanged recipe on them through the real runner and
executor with one actor: same models, batch sizes, augmentations and storage. From the measured
task's manifest come the per-stage rates and the actor's end-to-end rate; from its real shard, the
bytes of every output sample including tar headers and padding.

Bytes per sample: the probe's mean, or, when that is the more precise of the two (outputs that carry
the input image, whose size varies most), the mean input size over the whole 4M window plus the
probe's mean (output - input) per sample: a difference estimator on the sizes read for free. Then,
for N samples on K nodes like the one the probe ran on:

  storage = tasks * (tar of N * yield * bytes/sample / tasks, end blocks and record padding + sidecars)
  wall    = N / (rate per actor * actors), actors = K * what a node fits (capped by num_actors, tasks)
"""
from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

from reinforge.formats.recipe import ConfigError
from reinforge.formats.wds import iter_samples
from reinforge.io.manifest import RunLayout
from reinforge.io.storage import filesystem
from reinforge.runtime.pipeline import build_pipeline
from reinforge.runtime.probe import BLOCK, RECORD, PlanError, make_probe, tar_bytes


def shard_bytes(content: float) -> float:
    """Size of a tar holding `content` bytes of members: plus its end blocks, padded to a record."""
    return math.ceil((content + 2 * BLOCK) / RECORD) * RECORD


@dataclass
class CapacityPlan:
    product: str
    samples: int
    nodes: int
    probe_samples: int
    probe_seconds: float
    stage_rates: dict[str, float]  # samples/s of each stage on one actor, while in that stage
    actor_rate: float  # end-to-end samples/s of one actor (a whole task: read, stages, write)
    actors_per_node: int
    actors: int
    node: dict  # resources of the node the probe ran on
    yield_fraction: float  # output samples per input sample (skips)
    bytes_per_sample: float  # per output sample, tar headers included
    bytes_sem: float  # its standard error
    bytes_estimator: str  # "probe mean" or "window inputs + probe difference"
    samples_per_task: float
    tasks: int
    sidecar_bytes: float  # per task

    @property
    def bottleneck(self) -> str:
        return min(self.stage_rates, key=self.stage_rates.get)

    @property
    def storage_bytes(self) -> float:
        content = self.samples * self.yield_fraction * self.bytes_per_sample
        return self.tasks * (shard_bytes(content / self.tasks) + self.sidecar_bytes)

    @property
    def wall_seconds(self) -> float:
        # never faster than one task on one actor, however many nodes
        return max(self.samples / (self.actor_rate * self.actors),
                   min(self.samples, self.samples_per_task) / self.actor_rate)

    def lines(self) -> list[str]:
        rel = self.bytes_sem / self.bytes_per_sample if self.bytes_per_sample else 0.0
        stages = ", ".join(f"{name} {rate:,.1f}" for name, rate in self.stage_rates.items())
        node = ", ".join(f"{k} {v:g}" for k, v in sorted(self.node.items()) if k in ("CPU", "GPU"))
        return [
            f"probe: {self.probe_samples} samples of the recipe's input, one actor, warm ({self.probe_seconds:.1f} s "
            f"for the probe run)",
            f"per stage (samples/s on one actor): {stages}",
            f"bottleneck: {self.bottleneck} ({self.stage_rates[self.bottleneck]:,.1f} samples/s)",
            f"one actor end to end: {self.actor_rate:,.2f} samples/s; a node like this one ({node}) fits "
            f"{self.actors_per_node} actor(s)",
            f"output: {self.bytes_per_sample:,.0f} B per sample (tar headers included, ±{rel:.1%}, "
            f"{self.bytes_estimator}), "
            f"{self.yield_fraction:.1%} of input samples kept",
            f"{self.product} at N={self.samples:,} samples → {human_bytes(self.storage_bytes)} in {self.tasks:,} "
            f"shard(s) of ~{self.samples_per_task:,.0f} samples",
            f"wall time for N={self.samples:,} on {self.nodes} node(s) ({self.actors} actor(s)): "
            f"{human_seconds(self.wall_seconds)} (model load and cluster start not included)",
        ]


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.3g} {unit}"
        n /= 1000
    raise AssertionError


def human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h" if s < 3 * 86400 else f"{s / 86400:.1f} days"


def _sem(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.inf


def _bytes_per_sample(out: list[int], probe_in: list[int], window_in: list[int]) -> tuple[float, float, str]:
    """(mean, standard error, which estimator) of the output bytes per sample, see the module doc."""
    out_a = np.asarray(out, float)
    plain = (float(out_a.mean()), _sem(out_a), "probe mean")
    if len(out) != len(probe_in):  # skipped samples: outputs no longer pair with inputs by position
        return plain
    diff = out_a - np.asarray(probe_in, float)
    sem = math.hypot(_sem(diff), _sem(np.asarray(window_in, float)))
    if sem < plain[1]:
        return float(np.mean(window_in) + diff.mean()), sem, f"{len(window_in)} input sizes + probe difference"
    return plain


def plan_capacity(recipe: BaseModel, samples: int, nodes: int = 1, probe_samples: int | None = None,
                  address: str | None = None, workdir: str | None = None) -> CapacityPlan:
    from reinforge.ops.rundir import manifests
    from reinforge.runtime.ray_session import node_resources, ray_session
    from reinforge.runtime.runner import run_recipe
    if samples < 1 or nodes < 1:
        raise ConfigError("error: --samples and --nodes must be at least 1")
    pipeline = build_pipeline(recipe)
    folder = workdir.rstrip("/") if workdir else tempfile.mkdtemp(prefix="reinforge-plan-")
    try:
        probe = make_probe(pipeline, probe_samples or min(2 * pipeline.samples_per_batch(), 128), folder)
        per_task = pipeline.expected_samples_per_task(float(np.mean(probe.window_bytes)))
        started = time.perf_counter()
        with ray_session(address, recipe.resources.object_store_memory_mb):
            summary = run_recipe(probe.recipe, force=True, progress=False, redo_changed=True)  # probe shards rewritten
            if summary.failed:
                raise PlanError(f"plan: the probe task failed: {summary.failed[-1].get('reason', '?')}")
            measured = max(manifests(RunLayout(probe.recipe.output)), key=lambda m: m.task_id)
            node = node_resources(measured.worker.get("node_id"))
        seconds = time.perf_counter() - started
        main = next(o for o in measured.outputs if o.path.endswith((".tar", ".parquet")))
        fs, path = filesystem(f"{probe.recipe.output}/{main.path}")
        if main.path.endswith(".tar"):
            with fs.open(path, "rb") as f:
                sizes = [tar_bytes(s) for s in iter_samples(f)]
        else:  # a table (embed_pool): its bytes spread evenly over its rows
            sizes = [main.bytes / main.samples] * main.samples if main.samples else []
    finally:
        if not workdir:
            shutil.rmtree(folder, ignore_errors=True)
    if not sizes:
        raise PlanError(f"plan: every probe sample was skipped ({measured.errors} errors): nothing to measure")
    res = recipe.resources
    fits = node.get("GPU", 0) / res.gpus_per_actor if res.gpus_per_actor else node.get("CPU", 1) / res.cpus_per_actor
    per_node = max(1, math.floor(fits + 1e-9))
    tasks = math.ceil(samples / per_task)
    actors = min(per_node * nodes, res.num_actors or math.inf, tasks)
    sidecars = sum(o.bytes for o in measured.outputs if o is not main)
    bytes_per_sample, sem, estimator = _bytes_per_sample(sizes, [tar_bytes(s) for s in probe.chosen],
                                                         probe.window_bytes)
    return CapacityPlan(
        product=recipe.product, samples=samples, nodes=nodes, probe_samples=len(probe.chosen), probe_seconds=seconds,
        stage_rates={name: st.samples_in / st.seconds for name, st in measured.stages.items() if st.seconds > 0},
        actor_rate=measured.samples_in / measured.seconds, actors_per_node=per_node, actors=int(actors), node=node,
        yield_fraction=measured.samples_out / measured.samples_in, bytes_per_sample=bytes_per_sample,
        bytes_sem=sem if math.isfinite(sem) else 0.0, bytes_estimator=estimator,
        samples_per_task=per_task, tasks=tasks, sidecar_bytes=sidecars)
