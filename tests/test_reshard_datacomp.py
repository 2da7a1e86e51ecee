"""DataComp / TiC parity of `reshard` and `schedule`: meta.json as DataComp's train.py reads it, face blurring
as DataComp's resharder does it (golden from its own code), ml-tic-clip's --cls-file, --shuffle-bufsize,
--first-shard/--num-shards, --dry-run, and the nested replay buffer. Runs in-process (no Ray)."""
from __future__ import annotations

import collections
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes, photo, write_shard
from pool_gen import random_uids

from reinforge.formats.datacompnet import ClassFileError, read_class_ids
from reinforge.runtime.executor import TaskExecutor
from reinforge.products.reshard.face_blur import blur_faces, mask_box
from reinforge.formats.loader_files import write_loader_files
from reinforge.curation.replay import build_schedule
from reinforge.products.reshard.copying import buffer_shuffle
from reinforge.products.reshard.pipeline import ReshardPipeline
from reinforge.products.reshard.pool import ReshardError
from reinforge.curation.time_splits import SplitOptions, build_splits
from reinforge.formats.recipe import ConfigError, config_digest
from reinforge.products.registry import parse_recipe
from reinforge.io.manifest import RunLayout
from reinforge.formats.subset import make_subset, uid_order, uids_hex, write_subset
from reinforge.formats.wds import iter_samples

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "datacomp_blur.npz")
try:
    import cv2
except ImportError:  # the blur tests need opencv-python-headless (extras blur and test)
    cv2 = None
needs_cv2 = pytest.mark.skipif(cv2 is None, reason="face blurring needs opencv-python-headless")


def cli(*args: str):
    from click.testing import CliRunner

    from reinforge.cli.main import cli as main
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    result.returncode = result.exit_code
    return result


def run_reshard(recipe: dict) -> tuple[str, list[dict]]:
    """What the runner does, in this process: prepare, every task, loader files."""
    recipe = parse_recipe(recipe)
    pipeline = ReshardPipeline(recipe)
    layout = RunLayout(recipe.output)
    pipeline.prepare(layout)
    tasks = pipeline.tasks()
    executor = TaskExecutor(pipeline, layout, config_digest(recipe), recipe.max_error_fraction)
    results = [executor.run(t) for t in tasks]
    write_loader_files(layout, config_digest(recipe))
    return recipe.output, results


def shards_of(run) -> list[list[dict]]:
    folder = os.path.join(str(run), "shards")
    out = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tar"):
            with open(os.path.join(folder, name), "rb") as f:
                out.append(list(iter_samples(f)))
    return out


def folder_bytes(run) -> dict:
    folder = os.path.join(str(run), "shards")
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


# ---------------------------------------------------------------- a pool of real photos with face boxes

@pytest.fixture(scope="module")
def photo_pool(tmp_path_factory):
    """3 pool shards x 8 samples of real JPEG photos; metadata parquet with face_bboxes (some empty, one uid
    without a metadata row); a subset of 20 uids with multiplicities."""
    root = tmp_path_factory.mktemp("photo_pool")
    rng = np.random.default_rng(5)
    strings, hi, lo = random_uids(24, rng)
    hexes = strings.to_pylist()
    os.makedirs(root / "pool")
    for s in range(3):
        write_shard(root / "pool" / f"{s:08d}.tar", [
            (f"{s:05d}{i:04d}", {"jpg": jpeg_bytes(photo(8 * s + i, 64)), "txt": f"photo {8 * s + i}".encode(),
                                 "json": json.dumps({"uid": hexes[8 * s + i], "caption": "a photo"}).encode()})
            for i in range(8)])
    boxes = []
    for i in range(24):
        if i % 3 == 0:
            boxes.append([[0.2, 0.25, 0.55, 0.7]])
        elif i % 3 == 1:
            boxes.append([])
        else:
            boxes.append([[0.05, 0.05, 0.3, 0.4], [0.6, 0.5, 0.95, 0.9]])
    table = pa.table({"uid": hexes[:23], "face_bboxes": pa.array(boxes[:23], pa.list_(pa.list_(pa.float64()))),
                      "text": [f"photo {i}" for i in range(23)]})  # uid 23: no metadata row
    pq.write_table(table, root / "metadata.parquet")
    chosen = np.r_[0:12, 14:20, 22, 23]
    sub = make_subset(hi[chosen], lo[chosen])
    order = uid_order(sub["f0"], sub["f1"])
    counts = np.where(np.arange(len(chosen)) % 4 == 0, 2, 1).astype(np.uint32)[order]
    write_subset(str(root / "subset.npy"), sub[order], counts)
    by_uid = {hexes[i]: {"index": i, "boxes": boxes[i] if i < 23 else None} for i in range(24)}
    return root, by_uid, dict(zip(uids_hex(sub[order]), counts.tolist()))


def recipe_for(root, out, **extra) -> dict:
    return {"product": "reshard", "output": str(out), "subset": str(root / "subset.npy"),
            "input": {"path": str(root / "pool" / "*.tar")}, "samples_per_shard": 8, "seed": 2, **extra}


# ---------------------------------------------------------------- meta.json: what DataComp's train.py reads

def datacomp_train_shards(data_dir: str) -> str:
    """The lines of DataComp's train.py (get_input_shards) that turn a resharder folder into a shard pattern:
    a sub-folder with meta.json gives `{format(0)..format(count-1)}.tar` from output_shard_count and
    output_shard_format; a folder of tars gives `{0..max}` with the first name's zero padding."""
    parts = []
    for entry in sorted(os.listdir(data_dir)):
        path = os.path.join(data_dir, entry)
        meta = os.path.join(path, "meta.json")
        if os.path.isdir(path) and os.path.exists(meta):
            metadata = json.load(open(meta))
            count, fmt = metadata["output_shard_count"], metadata["output_shard_format"]
            first, last = fmt.format(0).replace(".tar", ""), fmt.format(count - 1).replace(".tar", "")
            parts.append(os.path.join(path, f"{{{first}..{last}}}.tar"))
    return "::".join(parts)


def test_meta_json_is_datacomps_and_train_py_finds_every_shard(photo_pool, tmp_path):
    import braceexpand
    root, _, counts = photo_pool
    run, results = run_reshard(recipe_for(root, tmp_path / "run"))
    assert all(r["status"] == "done" for r in results)
    folder = os.path.join(run, "shards")
    meta = json.load(open(os.path.join(folder, "meta.json")))
    # train.py: int(output_shard_count) shards named output_shard_format.format(i)
    assert isinstance(meta["output_shard_count"], int) and meta["output_shard_format"] == "{:08d}.tar"
    pattern = datacomp_train_shards(run)
    assert pattern == os.path.join(folder, "{00000000..00000003}.tar")  # 25 samples, 8 per shard
    tars = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".tar"))
    assert list(braceexpand.braceexpand(pattern)) == tars
    sizes = json.load(open(os.path.join(folder, "sizes.json")))
    # the counters DataComp's resharder writes, and every argument as a string (its vars(args) dump)
    assert meta["output_count"] == sum(sizes.values()) == sum(counts.values()) == 25
    assert meta["processed_count"] == 24 and meta["worker_success"] == meta["output_shard_count"] == 4
    assert meta["shard_size"] == "8" and meta["dry_run"] == "False" and meta["apply_blur"] == "False"
    assert meta["shuffle_bufsize"] == "0" and meta["first_shard"] == "0" and meta["num_shards"] == "None"
    assert all(isinstance(v, str) for k, v in meta.items() if not k.endswith(("_count", "_success")))
    # reinforge's own account moved to reshard.json; DataComp's copy of the subset file sits beside them
    facts = json.load(open(os.path.join(folder, "reshard.json")))
    assert facts["format"] == "reinforge.reshard/1" and facts["output"]["samples"] == 25
    assert open(os.path.join(folder, "sample_ids.npy"), "rb").read() == open(root / "subset.npy", "rb").read()


def train_golden_run(tmp) -> str:
    """A 20-sample reshard run of 4 shards (the run tests/golden/make_datacomp_train_golden.py fed to train.py)."""
    from reinforge.formats.subset import uid_hex
    _, hi, lo = random_uids(20, np.random.default_rng(1))
    os.makedirs(tmp / "pool" / "pool")
    for s in range(2):
        write_shard(tmp / "pool" / "pool" / f"{s:08d}.tar", [
            (f"{s:05d}{i:04d}", {"jpg": b"x", "json": json.dumps({"uid": uid_hex(hi[10 * s + i], lo[10 * s + i])}).encode()})
            for i in range(10)])
    sub = make_subset(hi, lo)
    write_subset(str(tmp / "pool" / "subset.npy"), sub[uid_order(sub["f0"], sub["f1"])])
    run, _ = run_reshard({"product": "reshard", "output": str(tmp / "parent" / "run"), "subset": str(tmp / "pool" / "subset.npy"),
                          "input": {"path": str(tmp / "pool" / "pool" / "*.tar")}, "samples_per_shard": 6})
    return run


def test_what_datacomps_train_py_made_of_a_reshard_folder(tmp_path):
    """Golden: DataComp's own get_input_shards on this run. `--data_dir RUN/shards` is exactly the shards;
    `--data_dir RUN` finds them through meta.json (this used to be a KeyError) and adds one empty part per
    other folder of the run (index, manifests, plan), as README says."""
    golden = json.load(open(os.path.join(os.path.dirname(__file__), "golden", "datacomp_train_shards.json")))
    theirs = golden["get_input_shards"]
    run = train_golden_run(tmp_path)
    assert theirs["RUN/shards"] == "RUN/shards/{00000000..00000003}.tar"
    parts = theirs["RUN"].split("::")
    assert [p for p in parts if p] == ["RUN/shards/{00000000..00000003}.tar"]
    assert parts.count("") == 3  # index/, manifests/, plan/ of the run then
    # our reading of the same train.py lines gives the same pattern from this run's meta.json
    assert datacomp_train_shards(run) == os.path.join(run, "shards", "{00000000..00000003}.tar")


# ---------------------------------------------------------------- face blur: DataComp's pixels

def golden():
    if not os.path.exists(GOLDEN):
        pytest.skip("tests/golden/datacomp_blur.npz missing (make it with tests/golden/make_datacomp_blur_golden.py)")
    data = np.load(GOLDEN)
    meta = json.loads(bytes(data["meta"]))
    return data, meta


@needs_cv2
def test_blur_matches_datacomps_blur_pixel_for_pixel():
    data, meta = golden()
    total = same = 0
    for i, image in enumerate(meta["images"]):
        decoded, want = data[f"decoded_{i}"], data[f"blurred_{i}"]
        got = blur_faces(decoded, image["boxes"])
        assert got.shape == want.shape and got.dtype == np.uint8, image["name"]
        total += want.size
        same += int((got == want).sum())
    assert same == total, f"{same} of {total} values identical"


@needs_cv2
def test_blur_changes_the_boxes_and_leaves_the_rest_alone():
    data, meta = golden()
    for i, image in enumerate(meta["images"]):
        decoded, boxes = data[f"decoded_{i}"], image["boxes"]
        got = blur_faces(decoded, boxes)
        h, w = decoded.shape[:2]
        changed = np.any((got != decoded).reshape(h, w, -1), axis=-1)
        if not boxes:
            assert not changed.any()
            continue
        boxes_px = [mask_box(b, w, h) for b in boxes]
        radius = int(2 * np.ceil(4 * 0.1 * max(b[4] for b in boxes_px))) // 2
        near = np.zeros((h, w), bool)
        inside = np.zeros((h, w), bool)
        for x0, y0, x1, y1, _ in boxes_px:
            near[max(y0 - radius, 0):y1 + radius, max(x0 - radius, 0):x1 + radius] = True
            inside[y0:y1, x0:x1] = True
        assert not changed[~near].any(), image["name"]  # beyond the kernel's reach: the very same pixels
        assert changed[inside].mean() > 0.5, image["name"]  # a blurred face is a changed face


@needs_cv2
def test_reencode_matches_datacomps_webp():
    from reinforge.products.reshard.face_blur import reencode_blurred
    data, meta = golden()
    for i, image in enumerate(meta["images"]):
        webp = reencode_blurred(bytes(data[f"jpeg_{i}"]), image["boxes"])
        theirs = bytes(data[f"webp_{i}"])
        if webp != theirs:  # OpenCV bundles its JPEG decoder and libwebp: say how far another version lands
            ours = cv2.imdecode(np.frombuffer(webp, np.uint8), cv2.IMREAD_UNCHANGED).astype(int)
            diff = np.abs(ours - cv2.imdecode(np.frombuffer(theirs, np.uint8), cv2.IMREAD_UNCHANGED))
            pytest.fail(f"{image['name']}: WebP bytes differ from DataComp's (OpenCV {cv2.__version__} vs "
                        f"{meta['versions']['opencv']}); decoded max |diff| {diff.max()}")


@needs_cv2
def test_reshard_blurs_faces_and_injects_boxes(photo_pool, tmp_path):
    root, by_uid, counts = photo_pool
    run, results = run_reshard(recipe_for(root, tmp_path / "run", blur_metadata=[str(root / "metadata.parquet")],
                                          apply_blur=True, inject_blur_metadata=True))
    assert all(r["status"] == "done" for r in results), results
    pool = {json.loads(s["json"])["uid"]: s for f in sorted(os.listdir(root / "pool"))
            for s in iter_samples(open(root / "pool" / f, "rb"))}
    seen = collections.Counter()
    blurred = 0
    for shard in shards_of(run):
        for s in shard:
            uid = json.loads(s["json"])["uid"]
            seen[uid] += 1
            boxes = by_uid[uid]["boxes"]
            if boxes:  # DataComp: jpg -> webp of the blurred image; json gains face_bboxes
                blurred += 1
                assert "jpg" not in s and s["webp"][8:12] == b"WEBP"
                decoded = cv2.imdecode(np.frombuffer(pool[uid]["jpg"], np.uint8), cv2.IMREAD_UNCHANGED)
                want = blur_faces(decoded, boxes)
                got = cv2.imdecode(np.frombuffer(s["webp"], np.uint8), cv2.IMREAD_UNCHANGED)
                assert np.abs(got.astype(int) - want.astype(int)).mean() < 2.0
                obj = json.loads(s["json"])
                assert obj["face_bboxes"] == boxes and obj["caption"] == "a photo"
                assert s["json"] == json.dumps({**json.loads(pool[uid]["json"]), "face_bboxes": boxes}).encode()
            else:  # no faces, or no metadata row: written unchanged
                assert s["jpg"] == pool[uid]["jpg"] and s["json"] == pool[uid]["json"]
    assert seen == counts
    facts = json.load(open(os.path.join(run, "shards", "reshard.json")))["blur"]
    assert facts["uids_without_metadata"] == 1 and facts["samples_with_faces"] == blurred
    with_faces = {u for u in counts if by_uid[u]["boxes"]}
    assert facts["uids_with_faces"] == len(with_faces) < blurred  # some of them are written twice
    assert json.load(open(os.path.join(run, "shards", "meta.json")))["blur_count"] == len(with_faces)  # DataComp: per pool sample
    # deterministic: a second run writes the same bytes
    again, _ = run_reshard(recipe_for(root, tmp_path / "again", blur_metadata=[str(root / "metadata.parquet")],
                                      apply_blur=True, inject_blur_metadata=True))
    assert folder_bytes(again) == folder_bytes(run)


def test_blur_needs_metadata_and_the_map_json_works(photo_pool, tmp_path):
    root, _, _ = photo_pool
    with pytest.raises(ConfigError, match="blur_metadata"):
        parse_recipe(recipe_for(root, tmp_path / "run", apply_blur=True))
    # DataComp's --blur-metadata-map: {name: {"parquet": ..., "shards": [...]}}
    (tmp_path / "map.json").write_text(json.dumps({"0": {"parquet": str(root / "metadata.parquet"),
                                                         "shards": [str(root / "pool" / "00000000.tar")]}}))
    pipeline = ReshardPipeline(parse_recipe(recipe_for(root, tmp_path / "run", blur_metadata=[str(tmp_path / "map.json")],
                                                       inject_blur_metadata=True, dry_run=True)))
    blur = pipeline.dry_run_report()["reshard"]["blur"]
    assert blur["metadata_files"] == 1 and blur["metadata_rows"] == 23


# ---------------------------------------------------------------- ml-tic-clip's --cls-file

def test_cls_file_made_and_consumed_as_ml_tic_clip_does(photo_pool, tmp_path):
    root, by_uid, counts = photo_pool
    uids = sorted(by_uid)
    synsets = ["n01440764", "n01443537", "n01484850"]
    year2uids = {2016: {synsets[0]: uids[:10], synsets[2]: uids[10:]}, 2017: {synsets[1]: uids[:3]}}
    (tmp_path / "year2uids.pkl").write_bytes(pickle.dumps(year2uids))
    (tmp_path / "dataset_class_info.json").write_text(json.dumps([[0, synsets[0], ["tench"]], [1, synsets[1], ["goldfish"]],
                                                                  [2, synsets[2], ["great white shark"]]]))
    result = cli("datacompnet-classes", "--year2uids", str(tmp_path / "year2uids.pkl"), "--class-info",
                 str(tmp_path / "dataset_class_info.json"), "--out", str(tmp_path / "dcnet"))
    assert result.returncode == 0, result.output
    cls_file = tmp_path / "dcnet" / "uid2classid" / "2016.pkl"
    mapping = pickle.loads(cls_file.read_bytes())  # our own file: what ml-tic-clip's resharder unpickles
    assert mapping == {**{u: 0 for u in uids[:10]}, **{u: 2 for u in uids[10:]}}
    assert list(mapping) == uids  # the reference's order: synsets, then uids
    run, results = run_reshard(recipe_for(root, tmp_path / "run", cls_file=str(cls_file)))
    assert all(r["status"] == "done" for r in results)
    got = collections.Counter()
    for shard in shards_of(run):
        for s in shard:
            uid = json.loads(s["json"])["uid"]
            assert s["cls"] == str(mapping[uid]).encode("ascii")  # webdataset's encoding of an int cls
            got[uid] += 1
    assert got == counts
    # a year file without some subset uids: refused while planning, with a count
    with pytest.raises(ClassFileError, match=r"^17 of 20 subset uids have no class id"):
        ReshardPipeline(parse_recipe(recipe_for(root, tmp_path / "r2", cls_file=str(tmp_path / "dcnet/uid2classid/2017.pkl")))).dry_run_report()


def test_class_pickles_are_read_without_running_code(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"a" * 32: Boom()}))
    with pytest.raises(ClassFileError, match="refusing to load"):
        read_class_ids(str(tmp_path / "evil.pkl"))
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "ok.json").write_text(json.dumps({"0" * 32: 7}))
    assert read_class_ids(str(tmp_path / "ok.json")) == {"0" * 32: 7}
    (tmp_path / "sets.pkl").write_bytes(pickle.dumps({"0" * 32: 3}, protocol=2))
    assert read_class_ids(str(tmp_path / "sets.pkl")) == {"0" * 32: 3}


# ---------------------------------------------------------------- --shuffle-bufsize, --first-shard/--num-shards, --dry-run

def test_buffer_shuffle_is_webdatasets_algorithm_with_a_seeded_rng():
    import random

    from webdataset.filters import _shuffle
    data = [{"i": i} for i in range(50)]
    for bufsize in (1, 7, 50, 80):
        ours = [d["i"] for d in buffer_shuffle(iter(data), bufsize, random.Random("3:00000001"))]
        theirs = [d["i"] for d in _shuffle(iter(data), bufsize, bufsize, rng=random.Random("3:00000001"))]
        assert ours == theirs and sorted(ours) == list(range(50))


def test_shuffle_bufsize_reorders_inside_shards_only_and_reruns_identically(photo_pool, tmp_path):
    root, _, _ = photo_pool
    plain, _ = run_reshard(recipe_for(root, tmp_path / "plain"))
    mixed, _ = run_reshard(recipe_for(root, tmp_path / "mixed", shuffle_bufsize=6))
    keys = lambda run: [[s["__key__"] for s in shard] for shard in shards_of(run)]  # noqa: E731
    assert [sorted(k) for k in keys(mixed)] == [sorted(k) for k in keys(plain)]  # same shard membership
    assert keys(mixed) != keys(plain)
    again, _ = run_reshard(recipe_for(root, tmp_path / "again", shuffle_bufsize=6))
    assert folder_bytes(again) == folder_bytes(mixed)


def test_first_and_num_shards_pick_pool_shards_by_number(photo_pool, tmp_path):
    root, by_uid, counts = photo_pool
    recipe = recipe_for(root, tmp_path / "run", first_shard=1, num_shards=1, allow_missing=True)
    run, results = run_reshard(recipe)
    assert all(r["status"] == "done" for r in results)
    got = collections.Counter(json.loads(s["json"])["uid"] for shard in shards_of(run) for s in shard)
    assert got == {u: c for u, c in counts.items() if 8 <= by_uid[u]["index"] < 16}
    facts = json.load(open(os.path.join(run, "shards", "reshard.json")))
    assert facts["pool_selection"]["shards_selected"] == 1 and facts["pool"]["samples_indexed"] == 8
    meta = json.load(open(os.path.join(run, "shards", "meta.json")))
    assert meta["first_shard"] == "1" and meta["num_shards"] == "1" and meta["processed_count"] == 8
    with pytest.raises(ReshardError, match="not in the pool"):  # the other shards' uids are missing
        ReshardPipeline(parse_recipe(recipe_for(root, tmp_path / "r2", first_shard=1, num_shards=1))).dry_run_report()
    with pytest.raises(ReshardError, match=r"no pool shard is numbered 7\.\.8"):
        ReshardPipeline(parse_recipe(recipe_for(root, tmp_path / "r3", first_shard=7, num_shards=2))).dry_run_report()


def test_dry_run_reports_the_assignment_and_writes_nothing(photo_pool, tmp_path):
    root, _, counts = photo_pool
    out = tmp_path / "run"
    result = cli("reshard", str(root / "subset.npy"), "--pool", str(root / "pool" / "*.tar"), "--output", str(out),
                 "--samples-per-shard", "8", "--seed", "2", "--dry-run")
    assert result.returncode == 0, result.output
    first, _, rest = result.output.partition("\n")
    assert first == "dry run: 25 samples in 4 shards from 24 pool samples; nothing written"
    report = json.loads(rest)
    assert report["sizes"] == {"00000000.tar": 8, "00000001.tar": 8, "00000002.tar": 8, "00000003.tar": 1}
    assert report["datacomp_meta"]["output_shard_count"] == 4
    written = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs] if out.exists() else []
    assert not [p for p in written if not p.startswith("index")], written  # only the pool's uid index cache


# ---------------------------------------------------------------- TiC: the nested replay buffer

@pytest.fixture(scope="module")
def tic_splits(tmp_path_factory):
    """7 TiC steps of growing size from uid files."""
    root = tmp_path_factory.mktemp("tic")
    rng = np.random.default_rng(3)
    files = []
    for year, n in zip(range(2016, 2023), (60, 80, 100, 130, 160, 200, 240)):
        _, hi, lo = random_uids(n, rng)
        sub = make_subset(hi, lo)
        sub = sub[uid_order(sub["f0"], sub["f1"])]
        write_subset(str(root / "uids" / f"{year}.npy"), sub)
        files.append(str(root / "uids" / f"{year}.npy"))
    build_splits(files, str(root / "splits"), SplitOptions(by="tic"))
    return root / "splits"


def step_draws(out) -> list[dict[str, set]]:
    """Per step: split -> the set of uids drawn from it."""
    schedule = json.load(open(out / "schedule.json"))
    split_uids = {s: set(uids_hex(np.load(os.path.join(schedule["splits_dir"], f"{s}.npy"))))
                  for s in ["2016", "2017", "2018", "2019", "2020", "2021", "2022"]}
    draws = []
    for step in schedule["steps"]:
        uids = set(uids_hex(np.load(out / step["subset"])))
        draws.append({s: uids & members for s, members in split_uids.items() if uids & members})
    return draws


@pytest.mark.parametrize("policy", ["cumulative-exp", "cumulative-equal"])
def test_nested_buffer_old_draws_only_shrink(tic_splits, tmp_path, policy):
    out = tmp_path / "nested"
    sched = build_schedule(str(tic_splits), policy, 150, str(out), seed=4, buffer="nested")
    steps = [s["step"] for s in sched["steps"]]
    for step in sched["steps"]:  # every step still draws exactly the budget
        assert step["total"] == 150 == int(np.load(out / step["counts"]).sum())
    draws = step_draws(out)
    for t in range(1, len(steps) - 1):
        for split in steps[:t]:  # an old split: its uids at t+1 are among its uids at t
            assert draws[t + 1].get(split, set()) <= draws[t].get(split, set()), (split, steps[t])
    # the same seed gives the same files; the independent default still redraws (and so brings uids back)
    again = tmp_path / "again"
    build_schedule(str(tic_splits), policy, 150, str(again), seed=4, buffer="nested")
    assert all(open(out / f, "rb").read() == open(again / f, "rb").read() for f in os.listdir(out) if f.endswith(".npy"))
    independent = tmp_path / "independent"
    build_schedule(str(tic_splits), policy, 150, str(independent), seed=4)
    loose = step_draws(independent)
    assert any(not loose[t + 1].get(s, set()) <= loose[t].get(s, set())
               for t in range(1, len(steps) - 1) for s in steps[:t])


def comeback_weights(step, steps, sizes):
    """2016 replayed at step 1, left out at step 2, asked for again at step 3."""
    return {0: {"2016": 1}, 1: {"2016": 1, "2017": 1}, 3: {"2016": 1, "2019": 1}}.get(step, {steps[step]: 1})


def test_nested_buffer_cli_and_refusal(tic_splits, tmp_path):
    from reinforge.curation.replay import ScheduleError
    with pytest.raises(ScheduleError, match=r"step 3: the policy draws 50 samples from split 2016, which left"):
        build_schedule(str(tic_splits), "test_reshard_datacomp:comeback_weights", 100, str(tmp_path / "c"),
                       buffer="nested")
    build_schedule(str(tic_splits), "test_reshard_datacomp:comeback_weights", 100, str(tmp_path / "d"))  # independent
    result = cli("schedule", str(tic_splits), "--policy", "cumulative-exp", "--budget", "150", "--out",
                 str(tmp_path / "s"), "--buffer", "nested")
    assert result.returncode == 0, result.output
    assert json.load(open(tmp_path / "s" / "schedule.json"))["buffer"] == "nested"
    result = cli("schedule", "--help")
    assert "nested" in result.output and "TiC-CLIP" in result.output
