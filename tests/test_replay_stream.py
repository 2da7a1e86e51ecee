"""Replay steps streamed through uid buckets (issue #16) equal the in-memory step, byte for byte: the same
uids, counts and seeded extra copies, across chunk edges; a split file not in DataComp's sorted unique
form falls back to the in-memory build (which sorts it), and overlapping splits are refused the same way."""
from __future__ import annotations


import numpy as np
import pytest

from reinforge.curation import replay_stream
from reinforge.curation.replay import ScheduleError, step_subset
from reinforge.curation.replay_stream import stream_step_subset
from reinforge.formats.subset import SUBSET_DTYPE, counts_bytes, subset_bytes


def _split(path, n, tag, rng, sort=True):
    uids = np.empty(n, SUBSET_DTYPE)
    uids["f0"] = (rng.integers(0, 2**64, n, np.uint64, endpoint=False) & ~np.uint64(3)) | np.uint64(tag)
    uids["f1"] = rng.integers(0, 2**64, n, np.uint64, endpoint=False)
    uids.sort(order=["f0", "f1"])
    np.save(path, uids if sort else uids[::-1])
    return str(path)


def _splits(tmp_path):
    rng = np.random.default_rng(0)
    files = {s: _split(tmp_path / f"{s}.npy", n, i, rng) for i, (s, n) in enumerate([("a", 1000), ("b", 600), ("c", 2000)])}
    return files, {"a": 0, "b": 1, "c": 2}


@pytest.mark.parametrize("unit_rows", [None, 1, 97, 640])
@pytest.mark.parametrize("counts", [{"a": 5}, {"a": 1000, "b": 2501}, {"a": 3000, "b": 7, "c": 9999}])
def test_streamed_step_equals_in_memory(tmp_path, monkeypatch, counts, unit_rows):
    """Draw units of 1 row up to whole splits, read in chunks of 97 rows: the in-memory step's bytes."""
    monkeypatch.setattr(replay_stream, "CHUNK", 97)
    files, index = _splits(tmp_path)
    out = str(tmp_path / "step.npy")
    unique = stream_step_subset(files, counts, 3, 2, index, out, ScheduleError, unit_rows=unit_rows)
    uids, mult = step_subset(files, counts, 3, 2, index)
    assert unique == len(uids)
    assert (tmp_path / "step.npy").read_bytes() == subset_bytes(uids)
    assert (tmp_path / "step.counts.npy").read_bytes() == counts_bytes(mult)
    assert not (tmp_path / "step.npy.work").exists()


def test_step_on_worker_processes_and_ray(tmp_path):
    """The passes as tasks on worker processes and on Ray write the inline step's bytes."""
    from reinforge.runtime.ray_session import TaskMap
    files, index = _splits(tmp_path)
    counts = {"a": 3000, "b": 7, "c": 9999}
    written = {}
    for where in ("inline", "processes", "ray"):
        tasks = TaskMap(where)
        try:
            stream_step_subset(files, counts, 3, 2, index, str(tmp_path / f"{where}.npy"), ScheduleError, tasks, 250)
        finally:
            tasks.close()
        written[where] = ((tmp_path / f"{where}.npy").read_bytes(), (tmp_path / f"{where}.counts.npy").read_bytes())
    assert written["processes"] == written["inline"] == written["ray"]


@pytest.mark.parametrize("unit_rows", [None, 100])
def test_unsorted_split_falls_back(tmp_path, unit_rows):
    rng = np.random.default_rng(1)
    files = {"a": _split(tmp_path / "a.npy", 500, 0, rng, sort=False)}
    assert stream_step_subset(files, {"a": 700}, 0, 0, {"a": 0}, str(tmp_path / "s.npy"), ScheduleError,
                              unit_rows=unit_rows) is None
    assert not (tmp_path / "s.npy").exists()


def test_unsorted_at_a_unit_edge_falls_back(tmp_path):
    """Each unit sorted inside, out of order only where one unit meets the next: seen by the edge check."""
    rng = np.random.default_rng(4)
    path = _split(tmp_path / "a.npy", 200, 0, rng)
    uids = np.load(path)
    np.save(path, np.concatenate([uids[100:], uids[:100]]))
    assert stream_step_subset({"a": path}, {"a": 300}, 0, 0, {"a": 0}, str(tmp_path / "s.npy"), ScheduleError,
                              unit_rows=100) is None


def test_overlapping_splits_refused(tmp_path):
    rng = np.random.default_rng(2)
    a = _split(tmp_path / "a.npy", 300, 0, rng)
    b_uids = np.load(a)[:50].copy()
    np.save(tmp_path / "b.npy", b_uids)
    with pytest.raises(ScheduleError, match="more than one split"):
        stream_step_subset({"a": a, "b": str(tmp_path / "b.npy")}, {"a": 300, "b": 50}, 0, 1, {"a": 0, "b": 1},
                           str(tmp_path / "s.npy"), ScheduleError)
    assert not (tmp_path / "s.npy").exists() and not (tmp_path / "s.counts.npy").exists()
