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
import random
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

from reinforge.pipelines.registry import build_pipeline
from reinforge.pipelines.sources import InputError, expand_shards
from reinforge.pipelines.storage import atomic_open, filesystem
from reinforge.schemas.config import ConfigError, parse_recipe
from reinforge.schemas.manifest import RunLayout
from reinforge.schemas.wds import ShardWriter, iter_samples

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile ends an archive with two zero blocks, then pads it to a multiple of this
TAR_TRAILER_MEAN = 2 * BLOCK + 9.5 * BLOCK  # that end, averaged over shards of any size
WINDOW = 4  # the probe is drawn from the first WINDOW * M input samples
SIZE_SHARDS = 8  # input shards whose byte size sets the expected samples per task


class PlanError(InputError):
    """The probe could not measure the recipe (no readable input, every probe sample skipped, ...)."""


def shard_bytes(content: float) -> float:
    """Size of a tar holding `content` bytes of members: plus its end blocks, padded to a record."""
    return math.ceil((content + 2 * BLOCK) / RECORD) * RECORD


def tar_bytes(members: dict) -> int:
    """Bytes a sample takes in a tar: one header block per member plus its data padded to blocks."""
    return sum(BLOCK + -(-len(v) // BLOCK) * BLOCK for k, v in members.items()
               if not k.startswith("__") and isinstance(v, bytes))


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


def _probe_input(pipeline, count: int, seed: int) -> tuple[list[dict], list[int]]:
    """`count` samples chosen (seeded) among the first WINDOW * count readable input samples, and the
    tar bytes of every input sample of that window."""
    window: list[dict] = []
    for task in pipeline.plan():
        for sample in pipeline.read(task):
            if "__error__" not in sample:
                window.append(sample)
            if len(window) >= WINDOW * count:
                break
        if len(window) >= WINDOW * count:
            break
    if not window:
        raise PlanError("input.path: no readable samples to probe")
    chosen = sorted(random.Random(seed).sample(range(len(window)), min(count, len(window))))
    return [window[i] for i in chosen], [tar_bytes(s) for s in window]


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


def _samples_per_task(recipe: BaseModel, input_bytes_per_sample: float) -> float:
    if recipe.input.format == "imagefolder":
        return float(recipe.input.samples_per_task)
    urls = expand_shards(recipe.input.path)[:SIZE_SHARDS]
    sizes = [filesystem(u)[0].size(filesystem(u)[1]) for u in urls]
    return max(1.0, (np.mean(sizes) - TAR_TRAILER_MEAN) / input_bytes_per_sample)


def _write_probe_shards(folder: str, samples: list[dict]) -> str:
    for name in ("probe-0-warmup", "probe-1"):
        with atomic_open(f"{folder}/{name}.tar") as out, ShardWriter(out) as writer:
            for sample in samples:
                writer.write(sample["__key__"], {k: v for k, v in sample.items()
                                                 if not k.startswith("__") and isinstance(v, bytes)})
    return f"{folder}/probe-*.tar"


def _node_resources(node_id: str | None) -> dict:
    import ray
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("Alive"):
            return dict(node.get("Resources", {}))
    alive = [n for n in ray.nodes() if n.get("Alive")] or [{"Resources": ray.cluster_resources()}]
    return dict(alive[0].get("Resources", {}))


def plan_capacity(recipe: BaseModel, samples: int, nodes: int = 1, probe_samples: int | None = None,
                  address: str | None = None, workdir: str | None = None) -> CapacityPlan:
    from reinforge.pipelines.ray_session import ray_session
    from reinforge.pipelines.rundir import manifests
    from reinforge.pipelines.runner import run_recipe
    if getattr(recipe, "input", None) is None or not hasattr(recipe.input, "format"):
        raise ConfigError(f"config error: product: plan probes recipes with model stages over input.path; "
                          f"{recipe.product!r} has none")
    if samples < 1 or nodes < 1:
        raise ConfigError("error: --samples and --nodes must be at least 1")
    count = probe_samples or 2 * recipe.augmentation.samples_per_batch
    chosen, window_in = _probe_input(build_pipeline(recipe), count, recipe.seed)
    per_task = _samples_per_task(recipe, float(np.mean(window_in)))
    folder = workdir.rstrip("/") if workdir else tempfile.mkdtemp(prefix="reinforge-plan-")
    try:
        raw = recipe.model_dump(mode="json")
        raw["input"] = {**raw["input"], "format": "webdataset", "path": _write_probe_shards(f"{folder}/input", chosen)}
        raw["output"] = f"{folder}/run"
        raw["resources"] = {**raw["resources"], "num_actors": 1, "tasks_in_flight_per_actor": 1}
        probe = parse_recipe(raw)
        started = time.perf_counter()
        with ray_session(address, recipe.resources.object_store_memory_mb):
            summary = run_recipe(probe, force=True, progress=False, redo_changed=True)  # probe shards rewritten
            if summary.failed:
                raise PlanError(f"plan: the probe task failed: {summary.failed[-1].get('reason', '?')}")
            measured = next(m for m in manifests(RunLayout(probe.output)) if m.task_id == "probe-1")
            node = _node_resources(measured.worker.get("node_id"))
        seconds = time.perf_counter() - started
        shard = next(o for o in measured.outputs if o.path.endswith(".tar"))
        fs, path = filesystem(f"{probe.output}/{shard.path}")
        with fs.open(path, "rb") as f:
            sizes = [tar_bytes(s) for s in iter_samples(f)]
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
    sidecars = sum(o.bytes for o in measured.outputs if not o.path.endswith(".tar"))
    bytes_per_sample, sem, estimator = _bytes_per_sample(sizes, [tar_bytes(s) for s in chosen], window_in)
    return CapacityPlan(
        product=recipe.product, samples=samples, nodes=nodes, probe_samples=len(chosen), probe_seconds=seconds,
        stage_rates={name: st.samples_in / st.seconds for name, st in measured.stages.items() if st.seconds > 0},
        actor_rate=measured.samples_in / measured.seconds, actors_per_node=per_node, actors=int(actors), node=node,
        yield_fraction=measured.samples_out / measured.samples_in, bytes_per_sample=bytes_per_sample,
        bytes_sem=sem if math.isfinite(sem) else 0.0, bytes_estimator=estimator,
        samples_per_task=per_task, tasks=tasks, sidecar_bytes=sidecars)
