"""Inputs and the tasks they split into. A task id is derived from its inputs, never from order of
execution: a shard's own name, or an ImageFolder group's position in the sorted listing."""
from __future__ import annotations

import os
import re
from typing import Iterator

from fsspec.implementations.local import LocalFileSystem

from reinforge.formats.limits import Limits
from reinforge.formats.wds import ShardReadError, iter_samples
from reinforge.io.manifest import Task
from reinforge.io.storage import filesystem


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
    """One task per input shard; the task id is the shard's file name without extension. Shards may be
    plain or compressed tars (.tar.gz, ...): members are read within `limits` either way (wds.iter_samples),
    so a sample with an unsafe key or an oversized member reaches the first stage as a counted skip."""

    def __init__(self, pattern: str, limits: Limits | None = None):
        self.pattern = pattern
        self.limits = limits

    def tasks(self) -> list[Task]:
        urls = expand_shards(self.pattern)
        ids = [_safe_id(u.rpartition("/")[2].split(".")[0]) for u in urls]
        if len(set(ids)) != len(ids):  # same file names in different folders: qualify by the parent
            ids = [_safe_id("/".join(u.split("/")[-2:]).split(".")[0]) for u in urls]
        if len(set(ids)) != len(ids):
            raise InputError("input.path: shard names are not unique enough to derive task ids")
        return [Task(i, (u,)) for i, u in zip(ids, urls)]

    @staticmethod
    def input_files(task: Task) -> list[str]:
        return list(task.inputs)

    def read(self, task: Task) -> Iterator[dict]:
        fs, path = filesystem(task.inputs[0])
        try:
            f = fs.open(path, "rb")
        except OSError as exc:
            raise ShardReadError(f"cannot open {task.inputs[0]}: {exc}") from exc
        with f:
            yield from iter_samples(f, self.limits)


# torchvision.datasets.folder.IMG_EXTENSIONS: a file is in the dataset iff its lower-cased name ends so
IMAGEFOLDER_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def member_extension(filename: str) -> str:
    """The WebDataset member an ImageFolder file's bytes go in: its own suffix (jpeg as jpg), which
    find_image and webdataset's image decoders both know."""
    ext = filename.rpartition(".")[2].lower()
    return "jpg" if ext == "jpeg" else ext


class ImageFolderSource:
    """torchvision `ImageFolder(root)`'s dataset, index for index (torchvision/datasets/folder.py):
    classes are the root's sub-folders (hidden ones too), sorted; within a class, the folders of
    `sorted(os.walk(class_dir, followlinks=True))` in turn, each one's files sorted; a file counts when
    its name ends with one of IMAGEFOLDER_SUFFIXES (any case, hidden files too). A class without such a
    file is an error, as there. A sample's key is its dataset index (8 digits), which is also the ML-DR
    record id; a file that cannot be read or decoded keeps its index and becomes a counted skip."""

    def __init__(self, root: str, samples_per_task: int, max_file_bytes: int | None = None):
        self.root = root.rstrip("/")
        self.samples_per_task = samples_per_task
        self.max_file_bytes = max_file_bytes if max_file_bytes is not None else Limits.for_images().image

    def listing(self) -> tuple[list[str], list[tuple[str, int]]]:
        """(class names, [(url, class index)] in dataset-index order)."""
        fs, root = filesystem(self.root)
        tree = LocalTree() if isinstance(fs, LocalFileSystem) else RemoteTree(fs)
        if not tree.isdir(root):
            raise InputError(f"input.path: {self.root} is not a directory")
        classes = tree.subfolders(root)
        if not classes:
            raise InputError(f"input.path: {self.root} has no class sub-folders")
        prefix = _protocol_prefix(self.root)
        files = []
        for index, name in enumerate(classes):
            images = [path for path in tree.files(tree.join(root, name)) if is_imagefolder_file(path)]
            files.extend((path if path.startswith(prefix) else prefix + path, index) for path in images)
        empty = sorted(set(classes) - {classes[index] for _, index in files})
        if empty:  # torchvision's ImageFolder refuses such a root, so its indices would not exist
            raise InputError(f"input.path: no image file ({' '.join(IMAGEFOLDER_SUFFIXES)}) in the class "
                             f"folder(s) {', '.join(empty)} of {self.root}")
        return classes, files

    def tasks(self) -> list[Task]:
        _, files = self.listing()
        tasks = []
        for start in range(0, len(files), self.samples_per_task):
            group = files[start:start + self.samples_per_task]
            tasks.append(Task(f"part-{start // self.samples_per_task:06d}",
                              tuple(f"{path}#{label}" for path, label in group), start))
        return tasks

    def read(self, task: Task) -> Iterator[dict]:
        fs, root = filesystem(self.root)
        root_url = _protocol_prefix(self.root) + root  # as listing() spells it: a relative root made absolute
        for offset, item in enumerate(task.inputs):
            url, _, label = item.rpartition("#")
            sample = {"__key__": f"{task.first_index + offset:08d}", "cls": label.encode(),
                      "__source__": url[len(root_url) + 1:]}
            try:
                data = self._read(fs, url)
            except OSError as exc:  # the index stays taken: the decode stage counts and logs the skip
                sample["__error__"] = ("unreadable_file", f"{type(exc).__name__}: {exc}")
            else:
                if len(data) > self.max_file_bytes:
                    sample["__error__"] = ("member_too_large",
                                           f"{url}: over the image bound of {self.max_file_bytes} bytes")
                else:
                    sample[member_extension(url)] = data
            yield sample

    @staticmethod
    def input_files(task: Task) -> list[str]:
        """The file of each entry of task.inputs (they are `url#label`)."""
        return [item.rpartition("#")[0] for item in task.inputs]

    def _read(self, fs, url: str) -> bytes:
        # one ranged read, one byte past the bound: enough to refuse a file without holding all of it
        return fs.cat_file(filesystem(url)[1], start=0, end=self.max_file_bytes + 1)


def is_imagefolder_file(path: str) -> bool:
    return path.lower().endswith(IMAGEFOLDER_SUFFIXES)


class LocalTree:
    """A local root, walked exactly as torchvision walks it (os.scandir, os.walk with followlinks)."""

    isdir = staticmethod(os.path.isdir)
    join = staticmethod(os.path.join)

    @staticmethod
    def subfolders(root: str) -> list[str]:
        return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())

    @staticmethod
    def files(folder: str) -> list[str]:
        # sorting the walk's (dirpath, dirs, files) tuples orders folders by path string: a folder's
        # own files come before its sub-folders', and "a.b" sorts before "a/b"
        return [os.path.join(dirpath, name)
                for dirpath, _, names in sorted(os.walk(folder, followlinks=True)) for name in sorted(names)]


class RemoteTree:
    """An fsspec root (s3://, gs://, memory://, ...): the same order from fs.ls and fs.walk."""

    def __init__(self, fs):
        self.fs = fs

    def isdir(self, path: str) -> bool:
        return self.fs.isdir(path)

    @staticmethod
    def join(folder: str, name: str) -> str:
        return f"{folder}/{name}"

    def subfolders(self, root: str) -> list[str]:
        return sorted(info["name"].rstrip("/").rpartition("/")[2]
                      for info in self.fs.ls(root, detail=True) if info["type"] == "directory")

    def files(self, folder: str) -> list[str]:
        return [f"{dirpath}/{name}"
                for dirpath, _, names in sorted(self.fs.walk(folder)) for name in sorted(names)]
