"""The one base step: a Stage loads what it needs once (setup) and maps a batch to a batch.

Per-sample failures never escape a stage: the sample is dropped from the batch and a SampleError
(key, stage, reason, exception, message) is appended, so the executor can count and log it.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0
    batch_size: int = 64  # the model batch, independent of how many samples a task holds


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
    name: str = "stage"
    resources: Resources = Resources()

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
    """A stage that transforms samples one at a time."""

    def process(self, sample: dict) -> dict:
        raise NotImplementedError

    def __call__(self, batch: Batch) -> Batch:
        kept, errors = [], list(batch.errors)
        for sample in batch.samples:
            try:
                kept.append(self.process(sample))
            except Exception as exc:  # noqa: BLE001 - any per-sample failure is counted, never fatal
                errors.append(sample_error(sample, self.name, exc))
        return Batch(kept, errors)
