"""Input fingerprints from metadata only: which task a replaced, touched, added or removed file changes."""
from __future__ import annotations

import os

import fsspec

from reinforge.io.fingerprint import changed_inputs, file_versions, task_fingerprints
from reinforge.formats.sources import ImageFolderSource, WebDatasetSource


def image_folder(root, per_class: int = 3) -> str:
    for name in ("cat", "cup"):
        os.makedirs(root / name)
        for i in range(per_class):
            (root / name / f"{i}.jpg").write_bytes(b"jpeg bytes")
    return str(root)


def prints(source) -> dict[str, str]:
    return task_fingerprints(source.tasks(), source.input_files)


def test_imagefolder_a_touched_file_changes_its_task_only(tmp_path):
    source = ImageFolderSource(image_folder(tmp_path), samples_per_task=2)
    before = prints(source)
    assert len(before) == 3 and all(p.startswith("files=2 sha256=") for p in before.values())
    os.utime(tmp_path / "cup" / "0.jpg", ns=(10**9, 10**9))  # the 4th file: task part-000001
    after = prints(source)
    assert [t for t in before if before[t] != after[t]] == ["part-000001"]


def test_imagefolder_an_added_file_changes_the_tasks_it_shifts(tmp_path):
    source = ImageFolderSource(image_folder(tmp_path), samples_per_task=2)
    before = prints(source)
    (tmp_path / "cup" / "-first.jpg").write_bytes(b"jpeg bytes")  # sorts first in cup: indices 3.. move by one
    after = prints(source)
    assert [t for t in after if before.get(t) != after[t]] == ["part-000001", "part-000002", "part-000003"]


def test_webdataset_shard_replaced_under_its_name(tmp_path):
    for i in range(2):
        (tmp_path / f"s-{i}.tar").write_bytes(b"x" * 100)
    source = WebDatasetSource(str(tmp_path / "s-*.tar"))
    before = prints(source)
    assert before["s-0"].startswith("size=100 mtime_ns=")
    (tmp_path / "s-1.tar").write_bytes(b"y" * 120)
    after = prints(source)
    assert before["s-0"] == after["s-0"] and after["s-1"].startswith("size=120 ")
    assert changed_inputs(before, after) == {"s-1": (before["s-1"], after["s-1"])}
    assert changed_inputs({"s-0": None, "s-1": None}, after) == {}  # old manifests: unknown, not changed


def test_object_store_versions_come_from_one_listing(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/fp-test/a.tar", b"abc")
    fs.pipe("/fp-test/b.tar", b"abcd")
    try:
        versions = file_versions(["memory://fp-test/a.tar", "memory://fp-test/b.tar", "memory://fp-test/gone.tar"])
        assert versions["memory://fp-test/a.tar"][0] == 3 and versions["memory://fp-test/b.tar"][0] == 4
        assert versions["memory://fp-test/a.tar"][1].startswith("created=")
        assert versions["memory://fp-test/gone.tar"] == (-1, "missing")
        fs.pipe("/fp-test/b.tar", b"abcd")  # same size, a new object
        assert file_versions(["memory://fp-test/b.tar"]) != {"memory://fp-test/b.tar": versions["memory://fp-test/b.tar"]}
    finally:
        fs.rm("/fp-test", recursive=True)
