"""The one base step: a Stage loads what it needs once (setup) and maps a batch to a batch.

Per-sample failures never escape a stage: the sample is dropped from the batch and a SampleError
(key, stage, reason, exception, message) is appended, so the executor can count and log it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable


class SkipSample(Exception):
    """Raised inside a stage for an expected per-sample failure, with a short machine-readable reason."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


@dataclass
class SampleError:
    key: str
    stage: str
    reason: str
    exception: str
    message: str


@dataclass
class Batch:
    samples: list[dict]
    errors: list[SampleError] = field(default_factory=list)


class Stage:
    """Pool resources (cpus, gpus per actor) are declared in the recipe's `resources`, model batch
    sizes per model (e.g. `teachers[i].batch_size`), separate from how many samples a task holds."""

    name: str = "stage"
    is_model: bool = False  # stages before the first model stage may prepare the next batch concurrently

    def setup(self) -> None:
        """Load models/resources; called once per worker before the first batch."""

    def __call__(self, batch: Batch) -> Batch:
        raise NotImplementedError

    def versions(self) -> dict:
        """Model/version facts recorded in every task manifest."""
        return {}


def sample_error(sample: dict, stage: str, exc: BaseException) -> SampleError:
    reason = exc.reason if hasattr(exc, "reason") else type(exc).__name__
    message = " ".join(str(exc).split())[:300]
    return SampleError(str(sample.get("__key__", "?")), stage, reason, type(exc).__name__, message)


class MapStage(Stage):
    """A stage that transforms samples independently, on `threads` threads (PIL decoding and torch
    ops release the GIL); results keep the batch order, so output does not depend on `threads`."""

    threads: int = 1
    _pool: ThreadPoolExecutor | None = None

    def process(self, sample: dict) -> dict:
        raise NotImplementedError

    def _attempt(self, sample: dict) -> tuple[dict | None, SampleError | None]:
        try:
            return self.process(sample), None
        except Exception as exc:  # noqa: BLE001 - any per-sample failure is counted, never fatal
            return None, sample_error(sample, self.name, exc)

    def __call__(self, batch: Batch) -> Batch:
        if self.threads > 1 and len(batch.samples) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=self.name)
            results = list(self._pool.map(self._attempt, batch.samples))
        else:
            results = [self._attempt(s) for s in batch.samples]
        kept = [sample for sample, _ in results if sample is not None]
        return Batch(kept, batch.errors + [error for _, error in results if error is not None])


def run_isolated(stage: str, samples: list[dict], fn: Callable[[list[dict]], list]
                 ) -> tuple[list[tuple[dict, object]], list[SampleError]]:
    """fn over the whole batch; if it raises, again one sample at a time, so one bad sample costs only
    itself (skipped and counted) and never the batch."""
    try:
        return list(zip(samples, fn(samples))), []
    except Exception as exc:  # noqa: BLE001 - isolate below
        if len(samples) == 1:
            return [], [sample_error(samples[0], stage, exc)]
    kept, errors = [], []
    for sample in samples:
        try:
            kept.append((sample, fn([sample])[0]))
        except Exception as exc:  # noqa: BLE001 - per-sample failures are counted, never fatal
            errors.append(sample_error(sample, stage, exc))
    return kept, errors
