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


@pytest.mark.parametrize("counts", [{"a": 5}, {"a": 1000, "b": 2501}, {"a": 3000, "b": 7, "c": 9999}])
def test_streamed_step_equals_in_memory(tmp_path, monkeypatch, counts):
    monkeypatch.setattr(replay_stream, "CHUNK", 97)
    rng = np.random.default_rng(0)
    files = {s: _split(tmp_path / f"{s}.npy", n, i, rng) for i, (s, n) in enumerate([("a", 1000), ("b", 600), ("c", 2000)])}
    index = {"a": 0, "b": 1, "c": 2}
    out = str(tmp_path / "step.npy")
    unique = stream_step_subset(files, counts, 3, 2, index, out, ScheduleError)
    uids, mult = step_subset(files, counts, 3, 2, index)
    assert unique == len(uids)
    assert (tmp_path / "step.npy").read_bytes() == subset_bytes(uids)
    assert (tmp_path / "step.counts.npy").read_bytes() == counts_bytes(mult)


def test_unsorted_split_falls_back(tmp_path):
    rng = np.random.default_rng(1)
    files = {"a": _split(tmp_path / "a.npy", 500, 0, rng, sort=False)}
    assert stream_step_subset(files, {"a": 700}, 0, 0, {"a": 0}, str(tmp_path / "s.npy"), ScheduleError) is None
    assert not (tmp_path / "s.npy").exists()


def test_overlapping_splits_refused(tmp_path):
    rng = np.random.default_rng(2)
    a = _split(tmp_path / "a.npy", 300, 0, rng)
    b_uids = np.load(a)[:50].copy()
    np.save(tmp_path / "b.npy", b_uids)
    with pytest.raises(ScheduleError, match="more than one split"):
        stream_step_subset({"a": a, "b": str(tmp_path / "b.npy")}, {"a": 300, "b": 50}, 0, 1, {"a": 0, "b": 1},
                           str(tmp_path / "s.npy"), ScheduleError)
    assert not (tmp_path / "s.npy").exists() and not (tmp_path / "s.counts.npy").exists()
