"""TiC-DataComp replay schedules: per-step sampling weights over time splits, with a fixed budget.

Every step t draws exactly `budget` samples. A policy gives each split a weight at step t; weights
become integer sample counts by the largest-remainder method on exact fractions (ties go to the
earlier split), so the counts always sum to the budget. Policies (steps are the splits in time order):

  sequential        split t only
  cumulative-all    every split <= t, in proportion to its size (uniform over their union)
  cumulative-exp    `new_fraction` (default 1/2) from split t; the rest is a replay buffer taking half
                    from t-1, a quarter from t-2, ... and the oldest split the remainder (so for t=3:
                    new 1/2, t-1 1/4, t-2 1/8, t-3 1/8)
  cumulative-equal  `new_fraction` from split t; the rest split equally over the past splits
  oracle            every split (future ones included), in proportion to its size, at every step
  module:function   a user callable fn(step_index, steps, sizes) -> {split: weight >= 0}

Each step is written two ways: as open_clip sampling weights (`::`-joined shard lists and
`train_data_upsampling_factors`, factor = samples drawn / samples available, so that a split read
with factor f contributes f x its size), and as a uid subset `<step>.npy` + `<step>.counts.npy`
(multiplicity of each uid: split i gives every uid floor(c_i / S_i) copies and a seeded choice of
c_i mod S_i uids one more). Sums are checked at every level; a mismatch is a hard error.

Which uids an old split contributes (`buffer`):
  independent  (the default, as before) each step draws its uids afresh, seeded by (seed, step, split):
               a uid left out at step t may come back at step t+1.
  nested       a replay buffer under a memory budget, as TiC-CLIP describes -Exp and -Equal (a buffer
               of old data that shrinks as new data arrives; ml-tic-clip ships configs for sequential,
               cumulative-all and oracle only, no code for the buffered policies): every uid of a split
               gets a fixed priority from (seed, uid); once the split is old (t > its own step) it keeps
               the k_t = min(c_t, k_{t-1}) highest-priority uids, so each old split's uids at step t+1
               are a subset of its uids at step t and a uid that left never returns. A count above the
               kept size is met by repeating kept uids (c // k copies, the first c % k by priority one
               more); a policy that asks an old split for samples after it drew none is refused.
The open_clip weights cannot express a buffer (they resample each split's shards); the uid subsets can.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import re
import sys
from fractions import Fraction
from typing import Callable, Optional

import numpy as np

from reinforge.curation.replay_stream import stream_step_subset
from reinforge.formats.sources import InputError
from reinforge.formats.subset import COUNTS_DTYPE, first_occurrence, read_subset, uid_order, write_subset
from reinforge.io.manifest import RunLayout
from reinforge.io.storage import exists, filesystem, read_text, write_bytes
from reinforge.runtime.ray_session import TaskMap, where_to_map

POLICIES = ("sequential", "cumulative-all", "cumulative-exp", "cumulative-equal", "oracle")
BUFFERS = ("independent", "nested")
NESTED_SALT = 0x6E65737465640000  # decorrelates buffer priorities from reshard's copy phases (same hash)
WeightFn = Callable[[int, list, dict], dict]


class ScheduleError(InputError):
    """A schedule that cannot be built as asked, or whose parts do not add up."""


def load_weight_function(spec: str) -> WeightFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ScheduleError(f"--policy {spec!r}: expected one of {', '.join(POLICIES)} or module:function")
    if os.getcwd() not in sys.path:  # like `python -m`: a module next to the user's files is importable
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ScheduleError(f"--policy {spec}: cannot import {module_name} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ScheduleError(f"--policy {spec}: {module_name} has no callable {attr!r}")
    return fn


def policy_weights(policy: str, t: int, steps: list[str], sizes: dict[str, int],
                   new_fraction: Fraction = Fraction(1, 2), fn: Optional[WeightFn] = None) -> dict[str, Fraction]:
    """Exact weights (not yet normalised) of each split at step t."""
    if policy == "sequential":
        return {steps[t]: Fraction(1)}
    if policy == "cumulative-all":
        return {s: Fraction(sizes[s]) for s in steps[:t + 1]}
    if policy == "oracle":
        return {s: Fraction(sizes[s]) for s in steps}
    if policy in ("cumulative-exp", "cumulative-equal"):
        if t == 0:
            return {steps[0]: Fraction(1)}
        buffer = 1 - new_fraction
        past = list(reversed(steps[:t]))  # t-1, t-2, ..., 0
        if policy == "cumulative-equal":
            shares = [Fraction(1, t)] * t
        else:
            shares = [Fraction(1, 2 ** (i + 1)) for i in range(t)]
            shares[-1] *= 2  # the oldest takes the remainder: 1/2 + 1/4 + ... + 1/2^(t-1) + 1/2^(t-1) = 1
        weights = {s: buffer * share for s, share in zip(past, shares)}
        weights[steps[t]] = new_fraction
        return {s: weights[s] for s in steps if s in weights}
    if fn is None:
        raise ScheduleError(f"--policy {policy!r}: expected one of {', '.join(POLICIES)} or module:function")
    raw = fn(t, list(steps), dict(sizes))
    if not isinstance(raw, dict):
        raise ScheduleError(f"--policy {policy}: returned {type(raw).__name__} at step {t}, expected a dict")
    out = {}
    for split, w in raw.items():
        if split not in sizes:
            raise ScheduleError(f"--policy {policy}: unknown split {split!r} at step {t}; splits: {', '.join(steps)}")
        if not isinstance(w, (int, float, Fraction)) or not math.isfinite(w) or w < 0:
            raise ScheduleError(f"--policy {policy}: weight {w!r} for split {split} at step {t} "
                                "is not a finite number >= 0")
        out[split] = Fraction(w)
    return {s: out[s] for s in steps if s in out}


def allocate(weights: dict[str, Fraction], budget: int, label: str = "") -> dict[str, int]:
    """Largest-remainder apportionment of `budget` samples; zero-weight splits are dropped."""
    weights = {s: w for s, w in weights.items() if w > 0}
    total = sum(weights.values())
    if total <= 0:
        raise ScheduleError(f"{label}: all split weights are zero")
    quotas = {s: w / total * budget for s, w in weights.items()}
    counts = {s: math.floor(q) for s, q in quotas.items()}
    left = budget - sum(counts.values())
    order = sorted(weights, key=lambda s: -(quotas[s] - counts[s]))  # stable: earlier split wins a tie
    for s in order[:left]:
        counts[s] += 1
    return {s: c for s, c in counts.items() if c > 0}


def load_splits(splits_dir: str) -> tuple[list[str], dict[str, int], dict[str, str]]:
    manifest_url = f"{splits_dir.rstrip('/')}/splits.json"
    if not exists(manifest_url):
        raise ScheduleError(f"{splits_dir}: no splits.json (write it with `reinforge splits`)")
    manifest = json.loads(read_text(manifest_url))
    steps = list(manifest["steps"])
    sizes = {s: int(manifest["splits"][s]["uids"]) for s in steps}
    files = {s: f"{splits_dir.rstrip('/')}/{manifest['splits'][s]['file']}" for s in steps}
    if not steps:
        raise ScheduleError(f"{splits_dir}: splits.json lists no steps")
    return steps, sizes, files


def _brace(names: list[str]) -> str:
    """`{00000000..00000041}.tar` for a contiguous run of 8-digit shard names, else `{a,b,...}.tar`."""
    stems = [n[:-4] for n in names]
    if all(re.fullmatch(r"\d{8}", s) for s in stems) and [int(s) for s in stems] == list(
            range(int(stems[0]), int(stems[0]) + len(stems))):
        return f"{{{stems[0]}..{stems[-1]}}}.tar" if len(stems) > 1 else f"{stems[0]}.tar"
    return "{" + ",".join(stems) + "}.tar"


def split_shards(template: str, split: str, expected: int, allow_mismatch: bool) -> tuple[str, int]:
    """The shard pattern of one split and how many samples it holds. `template` has `{split}`; if it
    names a local folder (a reshard run or its shards/ folder), its tars are listed and its sizes.json
    is checked against the split's size (public TiC configs silently missed one folder per year)."""
    path = template.replace("{split}", split)
    fs, local = filesystem(path)
    run = RunLayout(path.rstrip("/"))
    folder = run.shards_dir if fs.isdir(RunLayout(local.rstrip("/")).shards_dir) else run.root
    if not fs.isdir(filesystem(folder)[1]):
        return path, expected  # a pattern used verbatim
    names = sorted(p.rpartition("/")[2] for p in fs.ls(filesystem(folder)[1], detail=False) if p.endswith(".tar"))
    if not names:
        raise ScheduleError(f"split {split}: no .tar shards in {folder}")
    found = expected
    if exists(f"{folder}/sizes.json"):
        sizes = json.loads(read_text(f"{folder}/sizes.json"))
        missing = [n for n in names if n not in sizes]
        if missing:
            raise ScheduleError(f"split {split}: {folder}/sizes.json has no entry for {missing[0]}")
        found = sum(int(sizes[n]) for n in names)
        if found != expected and not allow_mismatch:
            raise ScheduleError(f"split {split}: shards in {folder} hold {found} samples, the split has {expected} "
                                f"(pass --allow-size-mismatch to use the shards as they are)")
    return f"{folder}/{_brace(names)}", found


class NestedBuffer:
    """The kept uids of each old split, as positions in the split file sorted by priority (a prefix
    of the split's priority order; it only ever shrinks)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.kept: dict[str, np.ndarray] = {}
        self.seen: set[str] = set()

    def priority_order(self, uids: np.ndarray) -> np.ndarray:
        from reinforge.products.reshard.assignment import uid_phase
        return np.argsort(uid_phase(uids["f0"], uids["f1"], self.seed + NESTED_SALT), kind="stable")

    def multiplicities(self, split: str, uids: np.ndarray, c: int, old: bool, t: int) -> np.ndarray:
        self.seen.add(split)
        order = self.kept[split] if split in self.kept else self.priority_order(uids)
        k = min(c, len(order))
        if k == 0:
            raise ScheduleError(f"step {t}: the policy draws {c} samples from split {split}, which left the "
                                f"nested replay buffer at an earlier step (it drew none there); use --buffer "
                                f"independent or a larger budget")
        if old:  # the buffer keeps only what this step draws from it
            self.kept[split] = order[:k]
        mult = np.zeros(len(uids), np.int64)
        mult[order[:k]] = c // k
        mult[order[:c % k]] += 1
        return mult

    def drop_undrawn(self, drawn: dict[str, int], steps: list[str], t: int) -> None:
        """An old split the step draws nothing from has left the buffer for good."""
        for split in steps[:t]:
            if split in self.seen and split not in drawn:
                self.kept[split] = np.zeros(0, np.int64)


def step_subset(files: dict[str, str], counts: dict[str, int], seed: int, t: int,
                split_index: dict[str, int], nested: Optional[NestedBuffer] = None) -> tuple[np.ndarray, np.ndarray]:
    """uids of the step and their multiplicities (sorted, unique, uint32)."""
    parts_u, parts_c = [], []
    for split, c in counts.items():
        uids = read_subset(files[split], counts="none").uids
        size = len(uids)
        if size == 0:
            raise ScheduleError(f"step {t}: split {split} is empty but the policy draws {c} samples from it")
        if nested is not None:
            mult = nested.multiplicities(split, uids, c, split_index[split] < t, t)
        else:
            mult = np.full(size, c // size, np.int64)
            extra = c % size
            if extra:  # which uids get one more copy: seeded by (seed, step, split), independent of the rest
                rng = np.random.default_rng([seed, t, split_index[split]])
                mult[rng.choice(size, extra, replace=False)] += 1
        keep = mult > 0
        if int(mult.sum()) != c:
            raise ScheduleError(f"step {t}: split {split} multiplicities sum to {int(mult.sum())}, expected {c}")
        parts_u.append(uids[keep])
        parts_c.append(mult[keep])
    uids = np.concatenate(parts_u)
    mult = np.concatenate(parts_c)
    order = uid_order(uids["f0"], uids["f1"])
    uids, mult = uids[order], mult[order]
    if not first_occurrence(uids["f0"], uids["f1"]).all():
        raise ScheduleError(f"step {t}: a uid appears in more than one split; splits must be disjoint")
    return uids, mult.astype(COUNTS_DTYPE)


def build_schedule(splits_dir: str, policy: str, budget: int, out_dir: str, seed: int = 0,
                   new_fraction: float = 0.5, shards_template: Optional[str] = None,
                   allow_size_mismatch: bool = False, write_subsets: bool = True,
                   buffer: str = "independent") -> dict:
    if buffer not in BUFFERS:
        raise ScheduleError(f"--buffer {buffer!r}: expected one of {', '.join(BUFFERS)}")
    if budget < 1:
        raise ScheduleError(f"--budget {budget}: must be >= 1")
    if not 0 < new_fraction <= 1:
        raise ScheduleError(f"--new-fraction {new_fraction}: must be in (0, 1]")
    if os.path.abspath(out_dir) == os.path.abspath(splits_dir):  # step files are named like split files
        raise ScheduleError(f"--out {out_dir}: must differ from the splits folder")
    fn = load_weight_function(policy) if policy not in POLICIES else None
    steps, sizes, files = load_splits(splits_dir)
    shards = {}
    if shards_template:
        if "{split}" not in shards_template:
            raise ScheduleError(f"--shards {shards_template!r}: must contain {{split}}")
        shards = {s: split_shards(shards_template, s, sizes[s], allow_size_mismatch) for s in steps}
    available = {s: shards[s][1] if s in shards else sizes[s] for s in steps}
    index = {s: i for i, s in enumerate(steps)}
    schedule = {"format": "reinforge.replay_schedule/1", "splits_dir": splits_dir, "policy": policy,
                "budget": budget, "seed": seed, "new_fraction": new_fraction, "buffer": buffer, "steps": []}
    nested = NestedBuffer(seed) if buffer == "nested" else None
    # the streamed steps' passes: on Ray when it is up, on worker processes for large splits, else inline
    tasks = TaskMap(where_to_map(sum(sizes.values()) if write_subsets else 0))
    try:
        for t, name in enumerate(steps):
            label = f"step {t} ({name})"
            weights = policy_weights(policy, t, steps, sizes, Fraction(new_fraction), fn)
            counts = allocate(weights, budget, label)
            for split, c in counts.items():
                if available[split] == 0:
                    raise ScheduleError(f"{label}: split {split} is empty but the policy draws {c} samples from it")
            total_w = sum(weights.values())
            sources = [{"split": s, "samples": c, "available": available[s], "weight": float(weights[s] / total_w),
                        "upsampling_factor": c / available[s]} for s, c in counts.items()]
            entry = {"index": t, "step": name, "total": sum(counts.values()), "sources": sources}
            _check_step(entry, budget, label)
            if shards:
                entry["open_clip"] = {
                    "train_data": "::".join(shards[s["split"]][0] for s in sources),
                    "train_data_upsampling_factors": "::".join(f"{s['upsampling_factor']:.10g}" for s in sources),
                    "train_num_samples": budget, "dataset_resampled": True}
            if write_subsets:
                if nested is not None:
                    nested.drop_undrawn(counts, steps, t)
                step_file = f"{out_dir.rstrip('/')}/{name}.npy"
                # streamed through uid buckets (driver memory flat in the pool, #16); the nested buffer and
                # split files not in DataComp's sorted unique form are built in memory
                unique = None if nested is not None else stream_step_subset(files, counts, seed, t, index, step_file,
                                                                            ScheduleError, tasks)
                if unique is None:
                    uids, mult = step_subset(files, counts, seed, t, index, nested)
                    if int(mult.sum()) != budget:
                        raise ScheduleError(f"{label}: subset multiplicities sum to {int(mult.sum())}, "
                                            f"budget is {budget}")
                    write_subset(step_file, uids, mult)
                    unique = len(uids)
                entry.update(subset=f"{name}.npy", counts=f"{name}.counts.npy", unique_uids=int(unique))
            schedule["steps"].append(entry)
    finally:
        tasks.close()
    write_bytes(f"{out_dir.rstrip('/')}/schedule.json", json.dumps(schedule, indent=1).encode())
    return schedule


def _check_step(entry: dict, budget: int, label: str) -> None:
    """The step's total equals the sum of its parts, both as counts and as factor x available."""
    parts = sum(s["samples"] for s in entry["sources"])
    if parts != budget or entry["total"] != budget:
        raise ScheduleError(f"{label}: parts sum to {parts}, step total {entry['total']}, budget {budget}")
    weighted = sum(s["upsampling_factor"] * s["available"] for s in entry["sources"])
    if abs(weighted - budget) > 1e-6 * budget:
        raise ScheduleError(f"{label}: upsampling factors x split sizes give {weighted:.1f} samples, budget {budget}")

