"""The probe `reinforge plan` measures: the unchanged recipe over a few samples of its own input,
as a warm-up task and then the measured task (the last task id). Each product says how its recipe
points at the probe input (Pipeline.probe_recipe); reading and choosing the samples is shared."""
from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import BaseModel

from reinforge.formats.sources import InputError
from reinforge.formats.wds import ShardWriter
from reinforge.io.storage import atomic_open

WINDOW = 4  # the probe is drawn from the first WINDOW * M input samples
BLOCK = 512
RECORD = 20 * BLOCK  # tarfile ends an archive with two zero blocks, then pads it to a multiple of this
TAR_TRAILER_MEAN = 2 * BLOCK + 9.5 * BLOCK  # that end, averaged over shards of any size
PROBE_SHARDS = ("probe-0-warmup", "probe-1")  # the measured task sorts last


class PlanError(InputError):
    """The probe could not measure the recipe (no readable input, every probe sample skipped, ...)."""


@dataclass
class Probe:
    recipe: BaseModel  # runs in the probe folder: a warm-up task, then the measured one
    chosen: list[dict]  # the probed input samples (members + __key__)
    window_bytes: list[int]  # tar bytes of every input sample of the window they were drawn from


def tar_bytes(members: dict) -> int:
    """Bytes a sample takes in a tar: one header block per member plus its data padded to blocks."""
    return sum(BLOCK + -(-len(v) // BLOCK) * BLOCK for k, v in members.items()
               if not k.startswith("__") and isinstance(v, bytes))


def choose_samples(source, count: int, seed: int) -> tuple[list[dict], list[int]]:
    """`count` samples chosen (seeded) among the first WINDOW * count readable input samples (so a
    sorted input does not make the probe one class), and the tar bytes of every sample of that window."""
    window: list[dict] = []
    for task in source.tasks():
        for sample in source.read(task):
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


def write_shard(url: str, samples: list[dict]) -> None:
    with atomic_open(url) as out, ShardWriter(out) as writer:
        for sample in samples:
            writer.write(sample["__key__"], {k: v for k, v in sample.items()
                                             if not k.startswith("__") and isinstance(v, bytes)})


def probe_shards(folder: str, samples: list[dict]) -> str:
    """The chosen samples twice, as the warm-up and the measured input shard; returns their pattern."""
    for name in PROBE_SHARDS:
        write_shard(f"{folder}/{name}.tar", samples)
    return f"{folder}/probe-*.tar"


def make_probe(pipeline, count: int, folder: str) -> Probe:
    recipe = pipeline.recipe
    chosen, window = choose_samples(pipeline.probe_source(), count, getattr(recipe, "seed", 0))
    raw = recipe.model_dump(mode="json")
    raw["output"] = f"{folder}/run"
    raw["resources"] = {**raw["resources"], "num_actors": 1, "tasks_in_flight_per_actor": 1}
    probe = type(recipe).model_validate(pipeline.probe_recipe(raw, chosen, f"{folder}/input"))  # the same product
    return Probe(probe, chosen, window)
