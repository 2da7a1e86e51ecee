"""Reshard and join planning write the same bytes as before they were streamed (issue #16): every file
prepare() leaves in the run folder (plan/, the files beside the shards, dr_config.json), by sha256, for a
pool with a repeated uid, a sample without uid, subset uids absent from it, multiplicities, face boxes,
class ids and a pool-shard selection. The run folder is fixed (/tmp/reinforge-plan-bytes): plan files name
the pool's paths; a lock file beside it keeps two test runs on one machine out of each other's way. A change here changes what a rerun of an existing run compares its plan with."""
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

ROOT = "/tmp/reinforge-plan-bytes"


@pytest.fixture(scope="module")
def inputs():
    with open(f"{ROOT}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the module's tests are done
        yield from _make_inputs()


def _make_inputs():
    """4 pool shards x 30 samples (uid 5 repeated in shard 2, one sample without a json member), reinforcement
    shards (2 x 25 uids: pool uids, 3 not in the pool, one repeated), a subset of 70 uids (4 not in the pool)
    with counts 1-3 (and two subsets all in the pool: with counts, and every uid once), face boxes and class ids."""
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(f"{ROOT}/pool")
    os.makedirs(f"{ROOT}/reinforcement")
    strings, hi, lo = random_uids(130, np.random.default_rng(3))
    hexes = strings.to_pylist()
    for s in range(4):
        samples = []
        for i in range(30):
            n = 30 * s + i
            uid = hexes[5] if (s, i) == (2, 7) else hexes[n]
            members = {"jpg": b"x" * (n % 7 + 1), "txt": b"t", "json": json.dumps({"uid": uid}).encode()}
            if (s, i) == (1, 3):
                del members["json"]
            samples.append((f"{s:05d}{i:04d}", members))
        write_shard(f"{ROOT}/pool/{s:08d}.tar", samples)
    rein = [hexes[i] for i in range(100, 130, 3)] + [hexes[i] for i in range(0, 40)]  # 100..: 3 beyond the pool
    rein = rein[:25] + [hexes[2]] + rein[25:49]
    for s in range(2):
        write_shard(f"{ROOT}/reinforcement/{s:08d}.tar", [
            (f"{s:05d}{i:04d}", {"json": json.dumps({"uid": u}).encode()})
            for i, u in enumerate(rein[25 * s:25 * s + 25])])
    with open(f"{ROOT}/dr_config.json", "w") as f:
        json.dump({"reinforce": {"image_augmentation": {}}}, f)
    chosen = np.r_[0:60, 62:66, 122:126, 127, 129]
    sub = make_subset(hi[chosen], lo[chosen])
    order = uid_order(sub["f0"], sub["f1"])
    write_subset(f"{ROOT}/subset.npy", sub[order], (np.arange(len(chosen)) % 3 + 1).astype(np.uint32)[order])
    for name, rows, counts in (("found", np.r_[0:33, 40:60], True), ("once", np.r_[10:100:2], False)):
        sub = make_subset(hi[rows], lo[rows])  # every uid in the pool: with counts, and each once
        order = uid_order(sub["f0"], sub["f1"])
        write_subset(f"{ROOT}/subset_{name}.npy", sub[order],
                     (np.arange(len(rows)) % 4 + 1).astype(np.uint32)[order] if counts else None)
    boxes = [[[0.1, 0.2, 0.3, 0.4]] if i % 3 == 0 else [] for i in range(120)]
    face_bboxes = pa.array(boxes[:110], pa.list_(pa.list_(pa.float64())))
    pq.write_table(pa.table({"uid": hexes[:110], "face_bboxes": face_bboxes}), f"{ROOT}/boxes.parquet")
    with open(f"{ROOT}/classes.json", "w") as f:
        json.dump({hexes[i]: i % 11 for i in range(130)}, f)
    yield
    shutil.rmtree(ROOT, ignore_errors=True)


def run_digests(recipe: dict, fresh: bool = True) -> dict[str, str]:
    """sha256[:16] of every file in the run folder, after a fresh prepare() (`fresh`) or as it is."""
    recipe = parse_recipe(recipe)
    if fresh:
        shutil.rmtree(recipe.output, ignore_errors=True)
        build_pipeline(recipe).prepare(RunLayout(recipe.output))
    out = {}
    for folder, _, files in os.walk(recipe.output):
        for name in files:
            path = os.path.join(folder, name)
            if "/index/" not in path and not path.endswith("plan/inputs.json"):  # inputs: file versions (mtimes)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, recipe.output)] = hashlib.sha256(f.read()).hexdigest()[:16]
    return dict(sorted(out.items()))


def reshard(name: str, **extra) -> dict:
    return {"product": "reshard", "output": f"{ROOT}/{name}", "subset": f"{ROOT}/subset.npy",
            "input": {"path": f"{ROOT}/pool/*.tar"}, "samples_per_shard": 16, "seed": 5, "allow_missing": True, **extra}


CASES = {
    "reshard": reshard("reshard"),
    "reshard_extras": reshard("reshard_extras", blur_metadata=[f"{ROOT}/boxes.parquet"], inject_blur_metadata=True,
                              cls_file=f"{ROOT}/classes.json", samples_per_shard=7, seed=1),
    "reshard_all_found": reshard("reshard_all_found", subset=f"{ROOT}/subset_found.npy", allow_missing=False),
    "reshard_once": reshard("reshard_once", subset=f"{ROOT}/subset_once.npy", allow_missing=False, seed=0,
                            samples_per_shard=10),
    "reshard_selection": reshard("reshard_selection", first_shard=1, num_shards=2, counts="none"),
    "join": {"product": "join", "output": f"{ROOT}/join", "images": {"path": f"{ROOT}/pool/*.tar"},
             "input": {"path": f"{ROOT}/reinforcement/*.tar", "dr_config": f"{ROOT}/dr_config.json"}},
}

# sha256[:16] per file, from the planner before #16 streamed it. Reshard's plan/plan.json: since the plan is
# made in partitions, its "fingerprint" field hashes the task files' sha256 (it hashed the whole table column by
# column); the new digests were taken after checking that nothing else in those files changed. Plan Parquet
# files: since only their pool shard URL column is dictionary-encoded (partitions.plan_table_bytes), their bytes
# differ; the new digests were taken after checking that every such file reads back as a table equal to the old
# planner's (schema and metadata included) and that plan.json files changed only in "fingerprint".
GOLDEN: dict[str, dict[str, str]] = {
    'join': {
        'dr_config.json': 'baada230ddc11b91',
        'plan/00000000.parquet': '1051802512c93ab3',
        'plan/00000001.parquet': 'b9fa0e26459798dd',
        'plan/plan.json': '4b7c16878899fa9b',
    },
    'reshard': {
        'plan/missing_uids.npy': 'd79de981b67cc7a5',
        'plan/plan.json': 'cce00171e6c85543',
        'plan/tasks/00000000.parquet': '6ea2a6a3085bbf62',
        'plan/tasks/00000001.parquet': '8b1b5a301f44f263',
        'plan/tasks/00000002.parquet': '97a10343356fb837',
        'plan/tasks/00000003.parquet': 'fb50f905aaa076a9',
        'plan/tasks/00000004.parquet': 'd9afff33382409ec',
        'plan/tasks/00000005.parquet': 'bbe12ae94aa6bfb2',
        'plan/tasks/00000006.parquet': '2b5a5a38be1e561e',
        'plan/tasks/00000007.parquet': 'fab233571b774c43',
        'shards/meta.json': 'f566796aff458106',
        'shards/reshard.json': '130100a7f89332fb',
        'shards/sample_ids.npy': 'c9bdc2085672e9a9',
        'shards/sizes.json': 'e05a51734f7d5c60',
    },
    'reshard_all_found': {
        'plan/plan.json': 'b301ddd55ffa1cc7',
        'plan/tasks/00000000.parquet': '54b6f6234c6e736f',
        'plan/tasks/00000001.parquet': 'bfd6c2b47a602f26',
        'plan/tasks/00000002.parquet': '4d290c9a7225543a',
        'plan/tasks/00000003.parquet': '8914e40ab67ee362',
        'plan/tasks/00000004.parquet': 'c2c1459b52cd53e9',
        'plan/tasks/00000005.parquet': 'e1d0c28795e95c9c',
        'plan/tasks/00000006.parquet': '1c9f92d6d7fa3f69',
        'plan/tasks/00000007.parquet': '7a55ebd19be20168',
        'plan/tasks/00000008.parquet': '5247493a0a90aeba',
        'shards/meta.json': 'ea290190eca06af3',
        'shards/reshard.json': 'b0d505a619c7d28e',
        'shards/sample_ids.npy': 'c649a604647fe12d',
        'shards/sizes.json': 'f9c7bbae15c97dde',
    },
    'reshard_once': {
        'plan/plan.json': 'bf4aa13a16fb8b25',
        'plan/tasks/00000000.parquet': '06ea300317d839f2',
        'plan/tasks/00000001.parquet': '04e1d6f9691faa92',
        'plan/tasks/00000002.parquet': 'd89db94e8fd83990',
        'plan/tasks/00000003.parquet': 'f93c7856e81331c7',
        'plan/tasks/00000004.parquet': 'f4b9c72f8a098e56',
        'shards/meta.json': '43f80e99397f4aed',
        'shards/reshard.json': '861e532bc9aeb766',
        'shards/sample_ids.npy': '48f79f325053e767',
        'shards/sizes.json': 'a041bdcc8ffc587a',
    },
    'reshard_extras': {
        'plan/missing_uids.npy': 'd79de981b67cc7a5',
        'plan/plan.json': '79b7c69ae3e04f8a',
        'plan/tasks/00000000.parquet': 'bba1ae34f0f89277',
        'plan/tasks/00000001.parquet': '5cb763246a54e226',
        'plan/tasks/00000002.parquet': 'e3287511808b6b6a',
        'plan/tasks/00000003.parquet': '29827ea5e3e4e159',
        'plan/tasks/00000004.parquet': '7b823820b07bd0f2',
        'plan/tasks/00000005.parquet': '98f3016045c6bed4',
        'plan/tasks/00000006.parquet': 'f78d5524631c1f8f',
        'plan/tasks/00000007.parquet': 'b2edf810ab53cc2c',
        'plan/tasks/00000008.parquet': '2a3601ecffd7ce54',
        'plan/tasks/00000009.parquet': 'f6fe35e60071603d',
        'plan/tasks/00000010.parquet': 'd19ad7ddb67dd158',
        'plan/tasks/00000011.parquet': '7a51bd210a7d3666',
        'plan/tasks/00000012.parquet': 'f783d42fe221e841',
        'plan/tasks/00000013.parquet': '39a473b293f8d2eb',
        'plan/tasks/00000014.parquet': 'c295fdd70478f5c1',
        'plan/tasks/00000015.parquet': '9de73925dd2ca209',
        'plan/tasks/00000016.parquet': 'b9ad629ee156eef1',
        'plan/tasks/00000017.parquet': '73aaf9f852b6e7f4',
        'shards/meta.json': 'a475ca9f677070ac',
        'shards/reshard.json': '6110e75e20100a50',
        'shards/sample_ids.npy': 'c9bdc2085672e9a9',
        'shards/sizes.json': '42c541e6433c64c4',
    },
    'reshard_selection': {
        'plan/missing_uids.npy': '5cd20e36d44f53d9',
        'plan/plan.json': '0a10cd1cb7a66b3d',
        'plan/tasks/00000000.parquet': '39d4aaf4ea10c216',
        'plan/tasks/00000001.parquet': 'beb0e398d0178cb5',
        'plan/tasks/00000002.parquet': 'e6ac526683ddcfe6',
        'shards/meta.json': '8e71b1f3e4a73170',
        'shards/reshard.json': '0f9053b3436edb3e',
        'shards/sample_ids.npy': 'c9bdc2085672e9a9',
        'shards/sizes.json': '6066053296b85bce',
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_files_are_unchanged(inputs, case, monkeypatch):
    monkeypatch.setenv("REINFORGE_INDEX_CACHE", "off")
    got = run_digests(CASES[case])
    if os.environ.get("PRINT_PLAN_DIGESTS"):
        print(f"\n    {case!r}: {got!r},")
    assert got == GOLDEN[case]


def test_uid_lookup_finds_what_a_binary_search_finds():
    """UidLookup (the bucketed search planning uses) = np.searchsorted and the plain locate, at the edges too:
    repeated high halves, 0 and 2**64-1, subsets of 0..5 uids, members from one narrow slice of uids."""
    from reinforge.formats.subset import UidLookup, locate
    rng = np.random.default_rng(0)
    for n, narrow in [(0, 0), (1, 0), (2, 0), (5, 0), (17, 0), (1000, 0), (50_000, 0), (1000, 1), (50_000, 1)]:
        hi, lo = (rng.integers(0, 2**64, n, np.uint64, endpoint=False) for _ in range(2))
        if narrow:  # members from one slice of the uid space (a uid bucket of the planner's)
            hi = np.uint64(3 << 60) + (hi >> np.uint64(8))
        if n > 10 and not narrow:
            hi[:5], hi[6], hi[7:10] = hi[5], 0, 2**64 - 1
        members = np.unique(make_subset(hi, lo))
        lookup = UidLookup(members)
        edges = np.array([0, 2**64 - 1], np.uint64)
        q_hi = np.r_[members["f0"], rng.integers(0, 2**64, 500, np.uint64, endpoint=False), edges]
        q_lo = np.r_[members["f1"], rng.integers(0, 2**64, 502, np.uint64, endpoint=False)]
        if n:
            assert np.array_equal(lookup.search(q_hi), np.searchsorted(members["f0"], q_hi))
        assert np.array_equal(locate(q_hi, q_lo, lookup), locate(q_hi, q_lo, members))
        assert np.array_equal(locate(q_hi[:n], q_lo[:n], lookup), np.arange(n))


@pytest.mark.parametrize("case", ["reshard", "join"])
def test_a_rerun_of_the_same_plan_rewrites_nothing(inputs, case, monkeypatch):
    """prepare() again on unchanged inputs compares fingerprints and leaves every plan file as it was."""
    monkeypatch.setenv("REINFORGE_INDEX_CACHE", "off")
    recipe = parse_recipe({**CASES[case], "output": f"{ROOT}/rerun-{case}"})
    shutil.rmtree(recipe.output, ignore_errors=True)
    build_pipeline(recipe).prepare(RunLayout(recipe.output))
    plan = os.path.join(recipe.output, "plan")
    stamps = {os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns for d, _, fs in os.walk(plan) for n in fs}
    build_pipeline(recipe).prepare(RunLayout(recipe.output))
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps


def test_stable_argsort_is_numpys_stable_argsort():
    """The packed-key sort the assignment uses orders as np.argsort(kind="stable"): random keys, many ties,
    floats >= 0 by their bits, and keys whose top bits tie while their low bits differ; any chunk size; keys
    given as an array or by a function of a slice / index array."""
    from reinforge.formats.subset import stable_argsort
    rng = np.random.default_rng(1)
    for n in [0, 1, 2, 3, 1000, 100_000]:
        floats = (rng.integers(0, 3, n) + rng.random(n).round(3)) / rng.integers(1, 4, n)
        for key in (rng.integers(0, 2**64, n, np.uint64, endpoint=False), rng.integers(0, 5, n).astype(np.uint64) << 60,
                    floats.view(np.uint64), rng.integers(0, 2**40, n).astype(np.uint64) * np.uint64(3)):
            for chunk in (1, 3, 1 << 20):  # positions and ties are found a chunk at a time
                assert np.array_equal(stable_argsort(key, chunk), np.argsort(key, kind="stable"))
                by_function = stable_argsort(key.__getitem__, chunk, n)
                assert np.array_equal(by_function, np.argsort(key, kind="stable"))


@pytest.mark.parametrize("case", ["reshard", "reshard_extras", "reshard_once", "reshard_selection"])
def test_any_partitioning_gives_the_same_plan(inputs, case, monkeypatch):
    """The passes cut the work into pool shard groups, uid buckets and key ranges: any cut (one shard per
    group, buckets of 3 uids, ranges of 5 copies, ...), inline or on worker processes, writes the bytes
    of the default cut (the golden)."""
    from reinforge.products.reshard import prepare
    from reinforge.products.reshard.pipeline import ReshardPipeline
    monkeypatch.setenv("REINFORGE_INDEX_CACHE", "off")
    cuts = [prepare.Sizes(1, 3, 5, "inline"), prepare.Sizes(2, 7, 11, "inline"), prepare.Sizes(3, 1, 1, "inline")]
    if case == "reshard":
        cuts.append(prepare.Sizes(1, 4, 6, "processes"))
    for cut in cuts:
        recipe = parse_recipe({**CASES[case], "output": f"{ROOT}/cut-{case}"})
        shutil.rmtree(recipe.output, ignore_errors=True)
        layout = RunLayout(recipe.output)
        plan = prepare.plan_subset(recipe, layout, f"{ROOT}/cut-work", cut)
        assert plan.tasks.where == cut.where
        prepare.commit(layout, recipe, plan, f"{ROOT}/cut-work", lambda: False, "test")
        plan.tasks.close()
        remove_tree(f"{ROOT}/cut-work")
        got = run_digests(recipe.model_dump(), fresh=False)
        assert got == GOLDEN[case], cut
    assert isinstance(build_pipeline(recipe), ReshardPipeline)


@pytest.mark.ray
def test_passes_as_ray_tasks_give_the_same_plan(inputs, monkeypatch, local_ray):
    """With Ray up in the process, the planner's passes run as Ray tasks (where_to_map), same bytes."""
    from reinforge.products.reshard import prepare
    from reinforge.runtime.ray_session import where_to_map
    monkeypatch.setenv("REINFORGE_INDEX_CACHE", "off")
    assert where_to_map(10) == "ray"
    recipe = parse_recipe({**CASES["reshard_extras"], "output": f"{ROOT}/cut-ray"})
    shutil.rmtree(recipe.output, ignore_errors=True)
    layout = RunLayout(recipe.output)
    plan = prepare.plan_subset(recipe, layout, f"{ROOT}/cut-ray-work", prepare.Sizes(1, 4, 6))
    assert plan.tasks.where == "ray"
    prepare.commit(layout, recipe, plan, f"{ROOT}/cut-ray-work", lambda: False, "test")
    plan.tasks.close()
    remove_tree(f"{ROOT}/cut-ray-work")
    assert run_digests(recipe.model_dump(), fresh=False) == GOLDEN["reshard_extras"]
    assert run_digests(CASES["join"]) == GOLDEN["join"]


@pytest.mark.parametrize("per_group, per_bucket", [(1, 1), (1, 2), (3, 1)])
def test_any_partitioning_gives_the_same_join_plan(inputs, monkeypatch, per_group, per_bucket):
    """Join's passes with one shard per group and per uid bucket (and mixes) write the golden bytes."""
    from reinforge.products.join import plan
    monkeypatch.setenv("REINFORGE_INDEX_CACHE", "off")
    monkeypatch.setattr(plan, "SHARDS_PER_GROUP", per_group)
    monkeypatch.setattr(plan, "SHARDS_PER_BUCKET", per_bucket)
    assert run_digests(CASES["join"]) == GOLDEN["join"]


def test_changed_inputs_plan_again_and_keep_equal_task_files(inputs, monkeypatch):
    """A pool shard touched (new mtime, same bytes): the inputs differ, so prepare() plans again, finds every
    task file's bytes equal and rewrites none, even under finished tasks; a changed subset under finished
    tasks is refused before any file is touched."""
    from reinforge.products.reshard import prepare
    monkeypatch.setenv("REINFORGE_INDEX_CACHE", "off")
    recipe = parse_recipe({**CASES["reshard"], "output": f"{ROOT}/changed"})
    shutil.rmtree(recipe.output, ignore_errors=True)
    layout = RunLayout(recipe.output)
    build_pipeline(recipe).prepare(layout)
    tasks = os.path.join(recipe.output, "plan", "tasks")
    stamps = {n: os.stat(os.path.join(tasks, n)).st_mtime_ns for n in os.listdir(tasks)}
    inputs_before = open(layout.plan_inputs).read()
    os.utime(f"{ROOT}/pool/00000001.tar", ns=(1, 1))
    finished = lambda: True  # noqa: E731
    pipeline = build_pipeline(recipe)
    pipeline._finished_tasks = finished
    pipeline.prepare(layout)
    assert {n: os.stat(os.path.join(tasks, n)).st_mtime_ns for n in os.listdir(tasks)} == stamps
    assert open(layout.plan_inputs).read() != inputs_before  # the new inputs are recorded
    changed = parse_recipe({**CASES["reshard"], "output": f"{ROOT}/changed", "subset": f"{ROOT}/subset_once.npy"})
    pipeline = build_pipeline(changed)
    pipeline._finished_tasks = finished
    with pytest.raises(prepare.ReshardError, match="changed since its tasks ran"):
        pipeline.prepare(layout)
    assert {n: os.stat(os.path.join(tasks, n)).st_mtime_ns for n in os.listdir(tasks)} == stamps
    assert not os.path.exists(layout.plan_work)


@pytest.mark.parametrize("case", ["reshard", "join"])
def test_plan_files_of_an_older_encoding_are_kept(inputs, case, monkeypatch):
    """Plan files written by an older reinforge (pyarrow's default encoding: every column dictionary-encoded)
    hold the same tables: a plan made again (a pool shard touched) keeps them, bytes and all, even under
    finished tasks (not refused as a changed plan), and reshard's plan.json fingerprint hashes them as they are."""
    monkeypatch.setenv("REINFORGE_INDEX_CACHE", "off")
    recipe = parse_recipe({**CASES[case], "output": f"{ROOT}/older-{case}"})
    shutil.rmtree(recipe.output, ignore_errors=True)
    layout = RunLayout(recipe.output)
    build_pipeline(recipe).prepare(layout)
    plan_dir = os.path.join(recipe.output, "plan")
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(plan_dir) for n in names if n.endswith(".parquet"))
    for path in files:  # as the older planner wrote them
        pq.write_table(pq.read_table(path), path)
    older = {path: open(path, "rb").read() for path in files}
    inputs_before = open(layout.plan_inputs).read()
    stamp = {"reshard": 2, "join": 3}[case]  # another mtime than any test before: the inputs differ
    os.utime(f"{ROOT}/pool/00000002.tar", ns=(stamp, stamp))
    pipeline = build_pipeline(recipe)
    pipeline._finished_tasks = lambda: True
    pipeline.prepare(layout)
    assert open(layout.plan_inputs).read() != inputs_before  # planned again
    assert {path: open(path, "rb").read() for path in files} == older
    if case == "reshard":
        from reinforge.products.reshard.prepare import fingerprint
        saved = json.load(open(layout.plan_record))
        kept = [(hashlib.sha256(older[path]).hexdigest(), True) for path in files]  # tasks/{:08d}: in task order
        assert saved["fingerprint"] == fingerprint(saved["sizes"], kept)
