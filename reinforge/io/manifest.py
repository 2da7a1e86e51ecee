"""A task, the run-directory layout and the per-task manifest: the resume state, plain files you can `ls`.

  <run>/run.json                 resolved recipe, its digest, versions (written before any task)
  <run>/shards/<task>.tar        outputs (renamed into place when complete)
  <run>/embeddings/<task>.parquet  embed_pool's outputs instead of shards
  <run>/errors/<task>.jsonl      skipped samples: key, stage, reason, exception, message
  <run>/failed/<task>.json       why a task failed (removed when it later succeeds)
  <run>/manifests/<task>.json    written last: a task is done iff this exists with the run's digest
                                 (and, when it records one, its inputs' fingerprint still matches)
  <run>/status.json              the live run's progress, rewritten by the driver (`status --watch`)
  <run>/dr_config.json           what a trainer needs to replay (reinforce.image_augmentation, ...)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

TMP_MARKER = ".tmp-"


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


@dataclass(frozen=True)
class Task:
    id: str
    inputs: tuple[str, ...]
    first_index: int = 0  # ImageFolder: dataset index of inputs[0]
    fingerprint: str | None = None  # of its input files, set by the runner (io/fingerprint.py)


@dataclass(frozen=True)
class RunLayout:
    root: str

    @property
    def run_file(self) -> str:
        return join(self.root, "run.json")

    @property
    def dr_config(self) -> str:
        return join(self.root, "dr_config.json")

    def shard(self, task_id: str) -> str:
        return join(self.root, "shards", f"{task_id}.tar")

    def manifest(self, task_id: str) -> str:
        return join(self.root, "manifests", f"{task_id}.json")

    def errors(self, task_id: str) -> str:
        return join(self.root, "errors", f"{task_id}.jsonl")

    def failure(self, task_id: str) -> str:
        return join(self.root, "failed", f"{task_id}.json")

    @property
    def directories(self) -> tuple[str, ...]:
        """Every folder tasks write into (gc looks for temp files there): embed_pool writes embeddings/."""
        return tuple(join(self.root, d) for d in ("shards", "embeddings", "errors", "failed", "manifests"))


@dataclass
class OutputFile:
    path: str  # relative to the run directory
    bytes: int
    sha256: str
    samples: int


@dataclass
class StageStats:
    seconds: float = 0.0
    samples_in: int = 0
    samples_out: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def merge(self, other: "StageStats") -> None:
        self.seconds += other.seconds
        self.samples_in += other.samples_in
        self.samples_out += other.samples_out
        for reason, n in other.errors.items():
            self.errors[reason] = self.errors.get(reason, 0) + n


@dataclass
class TaskManifest:
    task_id: str
    inputs: list[str]
    outputs: list[OutputFile]
    samples_in: int
    samples_out: int
    config_digest: str
    versions: dict
    stages: dict[str, StageStats]
    started_at: float
    seconds: float
    worker: dict = field(default_factory=dict)  # where it ran: host, Ray node id, pid
    # size + mtime/ETag of its inputs when planned (pipelines/fingerprint.py); None in older manifests
    input_fingerprint: str | None = None

    @property
    def errors(self) -> int:
        return sum(sum(s.errors.values()) for s in self.stages.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TaskManifest":
        raw = json.loads(text)
        raw["outputs"] = [OutputFile(**o) for o in raw["outputs"]]
        raw["stages"] = {k: StageStats(**v) for k, v in raw["stages"].items()}
        return cls(**raw)
