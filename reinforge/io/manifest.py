"""A task, the run-directory layout and the per-task manifest: the resume state, plain files you can `ls`.

  <run>/run.json                 resolved recipe, its digest, versions (written before any task)
  <run>/shards/<task>.tar        outputs (renamed into place when complete), and the run-level files
                                 beside them (sizes.json, _info.json; reshard's meta.json, ...)
  <run>/embeddings/<task>.parquet  embed_pool's outputs instead of shards
  <run>/errors/<task>.jsonl      skipped samples: key, stage, reason, exception, message
  <run>/failed/<task>.json       why a task failed (removed when it later succeeds)
  <run>/manifests/<task>.json    written last: a task is done iff this exists with the run's digest
                                 (and, when it records one, its inputs' fingerprint still matches)
  <run>/status.json              the live run's progress, rewritten by the driver (`status --watch`)
  <run>/dr_config.json           what a trainer needs to replay (reinforce.image_augmentation, ...)
  <run>/plan/                    what a product's prepare() decided for its tasks (reshard's assignment,
                                 join's pool locations) and plan/plan.json, its record (fingerprint,
                                 counts); the name predates `reinforge plan`, which writes nothing here
  <run>/README.md                a dataset card pointing at the shards (loader files, as shards/README.md)
  <run>/index/                   uid indexes of input shards, when no shared index cache is used
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
    """Every path of a run directory (see the module docstring): nothing else builds one from the root."""
    root: str

    @staticmethod
    def holding(shard: str) -> "RunLayout | None":
        """The run whose shards/ folder holds `shard` (a file or a pattern), None when it is not in one."""
        run, _, name = shard.rpartition("/")[0].rpartition("/")
        return RunLayout(run) if name == "shards" else None

    def file(self, relative: str) -> str:
        """A path relative to the run (as a manifest's outputs record them)."""
        return join(self.root, relative)

    def relative(self, url: str) -> str:
        """The inverse of file(): `url`, inside the run, relative to it."""
        return url[len(self.root.rstrip("/")) + 1:]

    @property
    def run_file(self) -> str:
        return join(self.root, "run.json")

    @property
    def dr_config(self) -> str:
        return join(self.root, "dr_config.json")

    @property
    def status(self) -> str:
        return join(self.root, "status.json")

    @property
    def shards_dir(self) -> str:
        return join(self.root, "shards")

    def shard(self, task_id: str) -> str:
        return join(self.root, "shards", f"{task_id}.tar")

    def shards_file(self, name: str) -> str:
        """A run-level file beside the shards (sizes.json, meta.json, ...)."""
        return join(self.root, "shards", name)

    def embeddings(self, task_id: str) -> str:
        return join(self.root, "embeddings", f"{task_id}.parquet")

    @property
    def manifests_dir(self) -> str:
        return join(self.root, "manifests")

    def manifest(self, task_id: str) -> str:
        return join(self.root, "manifests", f"{task_id}.json")

    @property
    def errors_dir(self) -> str:
        return join(self.root, "errors")

    def errors(self, task_id: str) -> str:
        return join(self.root, "errors", f"{task_id}.jsonl")

    @property
    def failed_dir(self) -> str:
        return join(self.root, "failed")

    def failure(self, task_id: str) -> str:
        return join(self.root, "failed", f"{task_id}.json")

    def plan_file(self, relative: str) -> str:
        """A file prepare() writes under plan/ (a task's assignment, missing uids)."""
        return join(self.root, "plan", relative)

    @property
    def plan_record(self) -> str:
        """plan/plan.json: prepare()'s record of what it decided (fingerprint, counts)."""
        return join(self.root, "plan", "plan.json")

    @property
    def plan_inputs(self) -> str:
        """plan/inputs.json: a digest of what the committed plan was made from (io/fingerprint.plan_digest);
        written after everything else prepare() writes."""
        return join(self.root, "plan", "inputs.json")

    @property
    def plan_work(self) -> str:
        """plan/work/: files prepare()'s passes hand each other (tasks on any node read them); removed after."""
        return join(self.root, "plan", "work")

    def index_dir(self, *parts: str) -> str:
        """Where the run's own uid indexes go (index/, or a sub-folder per side of a join)."""
        return join(self.root, "index", *parts)

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
    # size + mtime/ETag of its inputs when the runner listed the task (io/fingerprint.py); None in older manifests
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
