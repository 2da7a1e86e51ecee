"""Skip counts shared by a dataset and its DataLoader workers: a reader never ends an epoch on one bad
sample, it skips it, logs it and counts it here by reason."""
from __future__ import annotations

import multiprocessing


def spawning() -> bool:
    """True while pickling for a process being started (a DataLoader worker under spawn/forkserver)."""
    from multiprocessing.context import get_spawning_popen
    return get_spawning_popen() is not None


class SkipCounters:
    """Counts per reason in shared memory: DataLoader workers (forked or spawned) add to the parent's
    copy. Pickled any other way (deepcopy, another framework), the copy gets its own counts."""

    def __init__(self, reasons: tuple[str, ...], values: list[int] | None = None):
        self.reasons = reasons
        self._array = multiprocessing.Array("q", values or len(reasons))

    def __getstate__(self):
        shared = {"array": self._array} if spawning() else {"values": list(self._array)}
        return {"reasons": self.reasons, **shared}

    def __setstate__(self, state):
        self.reasons = state["reasons"]
        self._array = state["array"] if "array" in state else multiprocessing.Array("q", state["values"])

    def add(self, reason: str) -> None:
        with self._array.get_lock():
            self._array[self.reasons.index(reason)] += 1

    def as_dict(self) -> dict[str, int]:
        with self._array.get_lock():
            return {r: int(n) for r, n in zip(self.reasons, self._array) if n}

    def reset(self) -> None:
        with self._array.get_lock():
            for i in range(len(self.reasons)):
                self._array[i] = 0
