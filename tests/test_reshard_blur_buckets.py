"""Face boxes and class ids follow the reshard plan's uid buckets (issue #16, extras.py) and the plan keeps the
bytes the driver-side lookup wrote: blur metadata in three files (float64 lists in 8k-row groups with rows past
the first 65,536-row batch, float32 lists, fixed-size lists read row by row), a uid repeated within and across
files (a malformed first row still wins), malformed boxes (NaN, inf, a null value, 3 numbers) in more uids than
reshard.json keeps examples of and spread over every bucket, malformed and short uids, null rows, rows of uids
the subset lacks or the pool lacks; a class file naming one uid twice (keys differing in case). The goldens were
made by the planner before #16 moved face boxes off the driver (e078738); the run folder is fixed, as the
plan files name the inputs' paths."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_shard
from pool_gen import random_uids

from reinforge.formats.subset import make_subset, uid_order, write_subset
from reinforge.io.manifest import RunLayout
from reinforge.io.storage import remove_tree
from reinforge.products.registry import parse_recipe
from reinforge.runtime.pipeline import build_pipeline

ROOT = "/tmp/reinforge-blur-buckets"
BOXES = pa.list_(pa.list_(pa.float64()))


@pytest.fixture(scope="module")
def inputs():
    with open(f"{ROOT}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(ROOT, ignore_errors=True)
        os.makedirs(f"{ROOT}/pool")
        os.makedirs(f"{ROOT}/metadata")
        _make_inputs()
        yield
        shutil.rmtree(ROOT, ignore_errors=True)


def boxes_of(i: int):
    """Subset uid i's boxes in the first file that names it: malformed for i % 5 == 0 (NaN, inf or a null value)
    and i % 7 == 0 (3 numbers), else one box for i % 3 == 0, else none (a null row for uid 11)."""
    if i == 11:
        return None
    bad = [float("nan"), float("inf"), None][i % 3]
    if i % 5 == 0:
        return [[0.1, 0.1, 0.2, 0.2], [0.3, bad, 0.5, 0.6]]
    if i % 7 == 0:
        return [[0.1, 0.2, 0.3]]
    return [[0.125 + i / 1000, 0.25, 0.5, 0.75]] if i % 3 == 0 else []


def _make_inputs():
    """A pool of 3 shards x 40 samples (uids 0..119); a subset of uids 0..99 and 120..122 (not in the pool),
    counts 1-3; metadata files a (uids 0..49, 100..104, 120..122 among 70,000 rows), b (30..59, float32) and
    c (60..69, fixed-size lists); uids 70..99 have no metadata row."""
    strings, hi, lo = random_uids(200, np.random.default_rng(7))
    hexes = strings.to_pylist()
    for s in range(3):
        write_shard(f"{ROOT}/pool/{s:08d}.tar", [
            (f"{s:05d}{i:04d}", {"jpg": b"x" * (i % 5 + 1), "json": json.dumps({"uid": hexes[40 * s + i]}).encode()})
            for i in range(40)])
    chosen = np.r_[0:100, 120:123]
    sub = make_subset(hi[chosen], lo[chosen])
    order = uid_order(sub["f0"], sub["f1"])
    write_subset(f"{ROOT}/subset.npy", sub[order], (np.arange(len(chosen)) % 3 + 1).astype(np.uint32)[order])

    filler, _, _ = random_uids(70_000, np.random.default_rng(8))
    uids, boxes = filler.to_pylist(), [[] for _ in range(70_000)]
    for i in list(range(50)) + [100, 101, 102, 103, 104, 120, 121, 122]:
        row = 66_000 + i if i % 4 == 1 or i % 5 == 0 else 1_300 * (i % 50) + 17 * (i // 50)  # some past batch 1
        uids[row], boxes[row] = hexes[i], boxes_of(i)
    uids[69_000], boxes[69_000] = hexes[5], [[0.1, 0.2, 0.3, 0.4]]  # uid 5 again: its malformed first row wins
    uids[50_001], boxes[50_001] = hexes[2], [[0.5, 0.5, 0.6, 0.6]]  # uid 2 again, after an empty first row
    uids[3], uids[4], uids[5] = "not-hex", hexes[0][:31] + "g", "abc"  # malformed; "abc" is padded to 32 hex
    for row in (6, 66_150):
        uids[row], boxes[row] = uids[row], None  # null rows: no boxes
    pq.write_table(pa.table({"uid": uids, "face_bboxes": pa.array(boxes, BOXES)}), f"{ROOT}/metadata/a.parquet",
                   row_group_size=8192)
    b_rows = list(range(30, 60))
    b_boxes = [boxes_of(i) if i >= 50 else [[0.9, 0.9, 0.95, 0.95]] for i in b_rows]
    b_boxes[3] = None
    pq.write_table(pa.table({"uid": [hexes[i] for i in b_rows],
                             "face_bboxes": pa.array(b_boxes, pa.list_(pa.list_(pa.float32())))}),
                   f"{ROOT}/metadata/b.parquet", row_group_size=16)
    c_rows = list(range(60, 70)) + [45]
    c_boxes = [[[0.2, 0.2, 0.4, float("nan") if i == 65 else 0.4]] if i % 2 else [] for i in c_rows]
    pq.write_table(pa.table({"uid": [hexes[i] for i in c_rows],
                             "face_bboxes": pa.array(c_boxes, pa.list_(pa.list_(pa.float64(), 4)))}),
                   f"{ROOT}/metadata/c.parquet")
    classes = {hexes[i]: i % 13 for i in range(123)}
    classes[hexes[3].upper()] = 12  # the same uid as hexes[3]: the later entry's id
    with open(f"{ROOT}/classes.json", "w") as f:
        json.dump(classes, f)


def recipe(name: str) -> dict:
    return {"product": "reshard", "output": f"{ROOT}/{name}", "subset": f"{ROOT}/subset.npy",
            "input": {"path": f"{ROOT}/pool/*.tar"}, "samples_per_shard": 9, "seed": 3, "allow_missing": True,
            "blur_metadata": [f"{ROOT}/metadata"], "inject_blur_metadata": True, "cls_file": f"{ROOT}/classes.json"}


def digests(output: str) -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(output):
        for name in files:
            path = os.path.join(folder, name)
            if "/index/" not in path and not path.endswith("plan/inputs.json"):
                with open(path, "rb") as f:
                    out[os.path.relpath(path, output)] = hashlib.sha256(f.read()).hexdigest()[:16]
    return dict(sorted(out.items()))


# sha256[:16] per file. The planner of e078738 (face boxes and class ids looked up on the driver) wrote the same
# files, but for the plan Parquet files' encoding (only their shard URL column dictionary-encoded since, see
# partitions.plan_table_bytes) and plan.json's fingerprint of them: checked file by file, tables read back equal.
GOLDEN: dict[str, str] = {
    'plan/missing_uids.npy': '1c74ef746b641585',
    'plan/plan.json': 'cc28e6cd67c04d18',
    'plan/tasks/00000000.parquet': '261e22501f7d801e',
    'plan/tasks/00000001.parquet': '1c28a2542a278856',
    'plan/tasks/00000002.parquet': 'e67df3f095074a86',
    'plan/tasks/00000003.parquet': 'ea8f893d60235468',
    'plan/tasks/00000004.parquet': '8ee6d67cfb1ae6f1',
    'plan/tasks/00000005.parquet': '2ee2475733d79efe',
    'plan/tasks/00000006.parquet': 'ce7983ec23347de5',
    'plan/tasks/00000007.parquet': '5fb5445a38e829ae',
    'plan/tasks/00000008.parquet': '9ab34f6225375fb2',
    'plan/tasks/00000009.parquet': '6f9b08dc9b9d3ada',
    'plan/tasks/00000010.parquet': '3f63210df1e22f78',
    'plan/tasks/00000011.parquet': '0c1fda35b772c204',
    'plan/tasks/00000012.parquet': '906310d95a17c70e',
    'plan/tasks/00000013.parquet': 'd7e8dde947d04cba',
    'plan/tasks/00000014.parquet': 'adaafe485218d40e',
    'plan/tasks/00000015.parquet': '92986e94b906e486',
    'plan/tasks/00000016.parquet': 'cf2487cefed95814',
    'plan/tasks/00000017.parquet': '0a65ac45ca1d61a5',
    'plan/tasks/00000018.parquet': 'ba6e4626ae1e671d',
    'plan/tasks/00000019.parquet': '7fa9181326794be5',
    'plan/tasks/00000020.parquet': 'f898fad57b156b4c',
    'plan/tasks/00000021.parquet': 'c6aa29aacd397413',
    'plan/tasks/00000022.parquet': '1d696c3662e3f569',
    'shards/meta.json': 'a3a26dfd6d07eb88',
    'shards/reshard.json': '111bcc25387e1a0b',
    'shards/sample_ids.npy': '19c2af32cfd966b6',
    'shards/sizes.json': 'e6b61b9bcd60f706',
}


def test_plan_bytes_as_the_driver_side_lookup_wrote_them(inputs, monkeypatch):
    monkeypatch.setenv("REINFORGE_INDEX_CACHE", "off")
    r = parse_recipe(recipe("default"))
    build_pipeline(r).prepare(RunLayout(r.output))
    got = digests(r.output)
    if os.environ.get("PRINT_PLAN_DIGESTS"):
        print(f"\nGOLDEN = {got!r}")
        print(json.dumps(json.load(open(f"{r.output}/shards/reshard.json"))["blur"], indent=1))
    assert got == GOLDEN
    blur = json.load(open(f"{r.output}/shards/reshard.json"))["blur"]
    assert blur["metadata_files"] == 3 and blur["metadata_rows"] == 70_000 + 30 + 11
    assert blur["malformed_metadata_uids"] == 2 and len(blur["malformed_box_sample"]) == 10
    assert blur["malformed_box_sample"][-1]["row_in_batch"] < 1000  # a row of the second batch of file a


def test_any_cut_gives_the_same_plan(inputs, monkeypatch):
    """Metadata routed by one row group, a few rows or one task per file; 1-, 3- and 40-uid buckets; inline,
    on worker processes: the golden bytes."""
    from reinforge.products.reshard import prepare
    monkeypatch.setenv("REINFORGE_INDEX_CACHE", "off")
    cuts = [prepare.Sizes(1, 3, 5, "inline", 1), prepare.Sizes(2, 40, 11, "inline", 8192),
            prepare.Sizes(3, 1, 7, "inline", 20_000), prepare.Sizes(1, 7, 6, "processes", 5)]
    for cut in cuts:
        r = parse_recipe(recipe("cut"))
        shutil.rmtree(r.output, ignore_errors=True)
        layout = RunLayout(r.output)
        plan = prepare.plan_subset(r, layout, f"{ROOT}/cut-work", cut)
        prepare.commit(layout, r, plan, f"{ROOT}/cut-work", lambda: False, "test")
        plan.tasks.close()
        remove_tree(f"{ROOT}/cut-work")
        assert digests(r.output) == GOLDEN, cut


def test_boxes_checked_by_arrow_as_row_by_row():
    """face_blur.parse_boxes: Arrow's kernels (lists of lists of numbers) decide as the row-by-row check does."""
    from reinforge.products.reshard.face_blur import _parse_rows, parse_boxes
    floats = [None, [], [[0.1, 0.2, 0.3, 0.4]], [[1, 2, 3, 4], [5, 6, 7, 8]], [[0.1, None, 0.3, 0.4]],
              [[0.1, 0.2, 0.3]], [[0.1, 0.2, 0.3, 0.4, 0.5]], [[float("inf"), 0, 0, 0]], [[0, 0, 0, 0], []],
              [[float("nan")] * 4], [[2.5, -1, 0.75, 0]]]
    ints = [None, [], [[1, 2, 3, 4], [5, 6, 7, 8]], [[1, None, 3, 4]], [[1, 2, 3]], [[0, 0, 0, 0], []],
            [[2**60 + 1, -1, 3, 4]]]
    for kind, rows in ((pa.float64(), floats), (pa.float32(), floats), (pa.int64(), ints)):
        for column in (pa.array(rows, pa.list_(pa.list_(kind))), pa.array(rows, pa.large_list(pa.list_(kind))),
                       pa.array(rows[::-1], pa.list_(pa.list_(kind)))[2:]):
            counts, values = parse_boxes(column)
            want_counts, want_values = _parse_rows(column.to_pylist())
            assert counts.tolist() == want_counts.tolist(), (kind, column)
            assert np.array_equal(values, want_values), (kind, column)
