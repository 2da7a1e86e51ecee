"""A run's committed shards, read from its manifests (fsspec only: no Ray, no pipeline code)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import fsspec

from reinforge.schemas.manifest import RunLayout, TaskManifest, join


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int
    sha256: str


def _text(fs, path: str) -> str:
    return fs.cat_file(path).decode()


def committed_shards(run: str) -> list[Shard]:
    """Every tar a finished task of the run's current recipe wrote, in shard-name order. A shard without
    a manifest (a crash between rename and manifest) or from an older recipe is not part of the run."""
    layout = RunLayout(run.rstrip("/"))
    fs, root = fsspec.core.url_to_fs(layout.root)
    try:
        digest = json.loads(_text(fs, join(root, "run.json"))).get("config_digest")
    except FileNotFoundError:
        raise FileNotFoundError(f"{run} is not a reinforge run directory (no run.json)") from None
    shards: dict[str, Shard] = {}
    for path in sorted(fs.glob(join(root, "manifests", "*.json"))):
        try:
            manifest = TaskManifest.from_json(_text(fs, path))
        except (ValueError, KeyError, TypeError):  # truncated: the runner redoes that task
            continue
        if manifest.config_digest != digest:
            continue
        for out in manifest.outputs:
            if out.path.endswith(".tar"):
                shards[out.path] = Shard(join(layout.root, out.path), out.samples, out.sha256)
    return [shards[p] for p in sorted(shards)]
