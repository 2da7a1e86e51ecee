"""Inputs and the tasks they split into. A task id is derived from its inputs, never from order of
execution: a shard's own name, or an ImageFolder group's position in the sorted listing."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from reinforge.pipelines.storage import filesystem
from reinforge.schemas.image import IMAGE_EXTENSIONS
from reinforge.schemas.wds import ShardReadError, iter_samples


@dataclass(frozen=True)
class Task:
    id: str
    inputs: tuple[str, ...]
    first_index: int = 0  # ImageFolder: dataset index of inputs[0]


class InputError(ValueError):
    """The input specification matches nothing usable."""


def _protocol_prefix(url: str) -> str:
    return url.split("://")[0] + "://" if "://" in url else ""


def expand_shards(pattern: str) -> list[str]:
    """Brace and glob patterns (`data/{000..009}.tar`, `s3://b/*.tar`), sorted and de-duplicated."""
    import braceexpand
    fs, _ = filesystem(pattern)
    prefix = _protocol_prefix(pattern)
    urls: set[str] = set()
    for part in braceexpand.braceexpand(pattern):
        _, path = filesystem(part)
        matches = fs.glob(path) if any(c in path for c in "*?[") else ([path] if fs.exists(path) else [])
        if not matches:
            raise InputError(f"input.path: no shard matches {part!r}")
        urls.update(m if m.startswith(prefix) else prefix + m for m in matches)
    return sorted(urls)


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "task"


class WebDatasetSource:
    """One task per input shard; the task id is the shard's file name without extension."""

    def __init__(self, pattern: str):
        self.pattern = pattern

    def plan(self) -> list[Task]:
        urls = expand_shards(self.pattern)
        ids = [_safe_id(u.rpartition("/")[2].split(".")[0]) for u in urls]
        if len(set(ids)) != len(ids):  # same file names in different folders: qualify by the parent
            ids = [_safe_id("/".join(u.split("/")[-2:]).split(".")[0]) for u in urls]
        if len(set(ids)) != len(ids):
            raise InputError("input.path: shard names are not unique enough to derive task ids")
        return [Task(i, (u,)) for i, u in zip(ids, urls)]

    def read(self, task: Task) -> Iterator[dict]:
        fs, path = filesystem(task.inputs[0])
        try:
            f = fs.open(path, "rb")
        except OSError as exc:
            raise ShardReadError(f"cannot open {task.inputs[0]}: {exc}") from exc
        with f:
            yield from iter_samples(f)


class ImageFolderSource:
    """torchvision ImageFolder order: classes are the sorted sub-folders, files sorted within each;
    a sample's key is its dataset index (8 digits), which is also the ML-DR record id."""

    def __init__(self, root: str, samples_per_task: int):
        self.root = root.rstrip("/")
        self.samples_per_task = samples_per_task

    def listing(self) -> tuple[list[str], list[tuple[str, int]]]:
        fs, root = filesystem(self.root)
        if not fs.isdir(root):
            raise InputError(f"input.path: {self.root} is not a directory")
        classes = sorted(p.rpartition("/")[2] for p in fs.ls(root, detail=False) if fs.isdir(p))
        if not classes:
            raise InputError(f"input.path: {self.root} has no class sub-folders")
        prefix = _protocol_prefix(self.root)
        files = []
        for index, name in enumerate(classes):
            for path in sorted(fs.find(f"{root}/{name}")):
                if path.rpartition(".")[2].lower() in IMAGE_EXTENSIONS:
                    files.append((path if path.startswith(prefix) else prefix + path, index))
        return classes, files

    def plan(self) -> list[Task]:
        _, files = self.listing()
        tasks = []
        for start in range(0, len(files), self.samples_per_task):
            group = files[start:start + self.samples_per_task]
            tasks.append(Task(f"part-{start // self.samples_per_task:06d}",
                              tuple(f"{path}#{label}" for path, label in group), start))
        return tasks

    def read(self, task: Task) -> Iterator[dict]:
        fs, _ = filesystem(self.root)
        for offset, item in enumerate(task.inputs):
            url, _, label = item.rpartition("#")
            ext = url.rpartition(".")[2].lower()
            ext = "jpg" if ext == "jpeg" else ext
            sample = {"__key__": f"{task.first_index + offset:08d}", "cls": label.encode(),
                      "__source__": url[len(self.root) + 1:]}
            try:
                sample[ext] = fs.cat_file(filesystem(url)[1])
            except OSError as exc:
                sample["__error__"] = ("unreadable_file", f"{type(exc).__name__}: {exc}")
            yield sample
