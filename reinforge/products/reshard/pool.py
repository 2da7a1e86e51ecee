"""Which pool shards take part in a reshard (DataComp's --first-shard/--num-shards), and the error a
subset that cannot be resharded from them raises. Where each uid is in them: partitions.py."""
from __future__ import annotations

from reinforge.formats.sources import InputError
from reinforge.io.manifest import Task

SAMPLE = 10  # examples kept of each kind of problem


class ReshardError(InputError):
    """The subset cannot be resharded from this pool as asked (missing uids, changed inputs)."""


def select_shards(pool: list[Task], first: int, num: int | None) -> tuple[list[Task], dict]:
    """DataComp's --first-shard/--num-shards: the pool shards numbered first .. first+num-1 (all from
    `first` on when num is None), by the number in their file name; absent numbers are counted."""
    if first == 0 and num is None:
        return pool, {}
    numbered = {}
    for task in pool:
        stem = task.inputs[0].rpartition("/")[2].split(".")[0]
        if not stem.isdigit():
            raise ReshardError(f"first_shard/num_shards select pool shards by number, but {task.inputs[0]} has "
                               f"no number as its name")
        numbered.setdefault(int(stem), task)
    last = first + num - 1 if num is not None else max(numbered, default=first - 1)
    chosen = [numbered[n] for n in sorted(numbered) if first <= n <= last]
    if not chosen:
        raise ReshardError(f"no pool shard is numbered {first}..{last}")
    absent = [n for n in range(first, last + 1) if n not in numbered]
    return chosen, {"first_shard": first, "num_shards": num, "shards_selected": len(chosen),
                    "numbers_absent": len(absent), "absent_sample": absent[:SAMPLE]}
