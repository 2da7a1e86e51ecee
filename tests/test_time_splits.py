"""TiC-DataComp time splits, replay schedules and the DataComp resharder."""
from __future__ import annotations

import collections
import json
import os
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import manifest_nodes, shard_bytes, tree_state, two_node_cluster, write_shard
from pool_gen import metadata_table, random_uids, write_metadata, write_pool_shards

from reinforge.curation.replay import ScheduleError, allocate, build_schedule, policy_weights
from reinforge.products.reshard.pipeline import ReshardPipeline
from reinforge.products.reshard.pool import ReshardError
from reinforge.ops.rundir import run_status
from reinforge.runtime.runner import run_recipe
from reinforge.formats.sources import InputError
from reinforge.curation.time_splits import SplitError, SplitOptions, build_splits
from reinforge.products.registry import parse_recipe
from reinforge.formats.subset import (SubsetError, first_occurrence, isin, make_subset, parse_hex_uids, read_subset, uid_order, uids_hex, write_subset)
from reinforge.formats.wds import iter_samples

TIC = ["2016", "2017", "2018", "2019", "2020", "2021", "2022"]


def sorted_subset(hi, lo) -> np.ndarray:
    u = make_subset(hi, lo)
    u = u[uid_order(u["f0"], u["f1"])]
    return u[first_occurrence(u["f0"], u["f1"])]


def cli(*args: str):
    """In-process CLI call (a subprocess costs ~3 s of imports); exit code and stderr as a user sees them."""
    from click.testing import CliRunner

    from reinforge.cli.main import cli as main
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    result.returncode = result.exit_code
    return result


# ---------------------------------------------------------------- subset format

def test_subset_file_is_datacomps_format(tmp_path):
    uids = ["0123456789abcdef0123456789abcdef", "FFFFFFFFFFFFFFFF0000000000000001", "00000000000000000000000000000002"]
    hi, lo, status = parse_hex_uids(uids)
    assert status.tolist() == [0, 0, 0]
    assert [(int(h) << 64) | int(l) for h, l in zip(hi, lo)] == [int(u, 16) for u in uids]
    subset = sorted_subset(hi, lo)
    write_subset(str(tmp_path / "s.npy"), subset, np.array([1, 3, 2], np.uint32))
    raw = np.load(tmp_path / "s.npy")
    assert raw.dtype == np.dtype("u8,u8") and raw.tolist() == sorted(raw.tolist())
    assert uids_hex(raw) == sorted(u.lower() for u in uids)
    loaded = read_subset(str(tmp_path / "s.npy"))
    assert loaded.counts.tolist() == [1, 3, 2] and loaded.total == 6
    assert read_subset(str(tmp_path / "s.npy"), counts="none").total == 3
    with pytest.raises(SubsetError, match="not sorted"):
        write_subset(str(tmp_path / "bad.npy"), subset[::-1])
    np.save(tmp_path / "rep.npy", np.concatenate([subset, subset[:1]]))  # a repeat: folded into counts, reported
    rep = read_subset(str(tmp_path / "rep.npy"))
    assert rep.repeated_entries == 1 and rep.counts.tolist() == [2, 1, 1] and rep.notes
    np.save(tmp_path / "wrong.npy", np.zeros(3, np.uint64))
    with pytest.raises(SubsetError, match="u8,u8"):
        read_subset(str(tmp_path / "wrong.npy"))


def test_malformed_uid_strings_are_classified():
    _, _, status = parse_hex_uids(["a" * 32, None, "a" * 31, "g" * 32, "a" * 33, ""])
    assert status.tolist() == [0, 1, 2, 3, 2, 2]


# ---------------------------------------------------------------- time splits

@pytest.fixture(scope="module")
def pool_metadata(tmp_path_factory):
    """240k rows in two files, exponential growth 2014..2022, ~1% missing, 0.5% garbage, 0.5% out of range."""
    root = tmp_path_factory.mktemp("meta")
    tables = [metadata_table(120_000, seed=s) for s in (1, 2)]
    paths = []
    for i, t in enumerate(tables):
        write_metadata(root / f"part-{i}.parquet", t, row_group_size=25_000)
        paths.append(str(root / f"part-{i}.parquet"))
    table = pa.concat_tables(tables)
    hi, lo, _ = parse_hex_uids(table["uid"])
    rng = np.random.default_rng(3)
    eval_rows = rng.choice(len(hi), 1500, replace=False)
    _, ehi, elo = random_uids(100, rng)  # plus 100 eval uids that are not in the pool
    eval_uids = sorted_subset(np.r_[hi[eval_rows], ehi], np.r_[lo[eval_rows], elo])
    write_subset(str(root / "eval.npy"), eval_uids)
    return root, paths, table, eval_uids


def reference_buckets(table: pa.Table) -> dict[str, int]:
    """The same bucketing, written directly as a pyarrow group-by."""
    ts = table["timestamp"]
    valid = pc.fill_null(pc.less_equal(ts, 253402300799), False)
    year = pc.year(pc.cast(pc.if_else(valid, ts, 0), pa.timestamp("s")))
    named = pc.if_else(pc.less_equal(year, 2016), "2016", pc.cast(year, pa.string()))
    outside = pc.or_(pc.less(year, 2014), pc.greater(year, 2022))
    bucket = pc.if_else(valid, pc.if_else(outside, "out_of_range", named), "unknown")
    beyond = pc.fill_null(pc.greater(ts, 253402300799), False)  # 1e15 s: beyond any calendar
    bucket = pc.if_else(beyond, "out_of_range", bucket)
    counts = pa.table({"bucket": bucket}).group_by("bucket").aggregate([("bucket", "count")])
    return dict(zip(counts["bucket"].to_pylist(), counts["bucket_count"].to_pylist()))


@pytest.mark.parametrize("memory_rows", [64 << 20, 40_000], ids=["in_memory", "spilled"])
def test_splits_match_groupby_partition_the_pool_and_drop_eval(pool_metadata, tmp_path, memory_rows):
    root, paths, table, eval_uids = pool_metadata
    out = tmp_path / "splits"
    m = build_splits(paths, str(out), SplitOptions(eval_uids=[str(root / "eval.npy")], memory_rows=memory_rows))
    assert m["steps"] == TIC and m["rows"] == 240_000
    rows = {**{s: m["splits"][s]["rows"] for s in TIC}, "unknown": m["unknown"]["rows"],
            "out_of_range": m["out_of_range"]["rows"]}
    assert rows == reference_buckets(table)
    assert m["unknown"]["missing"] > 2000 and m["out_of_range"]["above"] > 1000 and m["out_of_range"]["below"] > 500
    sizes = [m["splits"][s]["rows"] for s in TIC]
    assert sizes[1] < sizes[2] < sizes[3] < sizes[4] < sizes[5] < sizes[6]  # the skew survived
    # every uid in exactly one output file, and the files hold exactly the pool minus eval uids
    files = {name: np.load(out / f"{name}.npy") for name in [*TIC, "unknown", "out_of_range"]}
    for name, arr in files.items():
        assert arr.dtype == np.dtype("u8,u8") and len(arr) == (m["sizes"].get(name) if name in TIC else m[name]["uids"])
        assert np.array_equal(arr[uid_order(arr["f0"], arr["f1"])], arr)  # sorted
        assert first_occurrence(arr["f0"], arr["f1"]).all()  # unique
    everything = np.concatenate(list(files.values()))
    everything = everything[uid_order(everything["f0"], everything["f1"])]
    assert first_occurrence(everything["f0"], everything["f1"]).all()  # no uid in two files
    hi, lo, _ = parse_hex_uids(table["uid"])
    pool = sorted_subset(hi, lo)
    expected = pool[~isin(pool["f0"], pool["f1"], eval_uids)]
    assert np.array_equal(np.sort(everything), np.sort(expected))
    for name in TIC:
        assert not isin(files[name]["f0"], files[name]["f1"], eval_uids).any()
    assert m["eval"]["removed"] == 1500 and m["eval"]["uids"] == 1600
    assert json.loads((out / "sizes.json").read_text()) == {s: len(files[s]) for s in TIC}


def test_spilled_and_in_memory_outputs_are_identical(pool_metadata, tmp_path):
    _, paths, _, _ = pool_metadata
    build_splits(paths[:1], str(tmp_path / "a"), SplitOptions(memory_rows=64 << 20))
    build_splits(paths[:1], str(tmp_path / "b"), SplitOptions(memory_rows=10_000))
    for name in [*TIC, "unknown", "out_of_range", "sizes"]:
        ext = ".json" if name == "sizes" else ".npy"
        assert (tmp_path / "a" / f"{name}{ext}").read_bytes() == (tmp_path / "b" / f"{name}{ext}").read_bytes()


def _mixed_inputs(root) -> tuple[list[str], str]:
    """Three metadata files (iso timestamps, malformed uids, unparseable and out-of-range times, uids repeated
    inside a file and across files, with other timestamps), a uid file, and eval uids from several files."""
    tables = [metadata_table(700, seed=s, fmt="iso", bad_uids=12, duplicates=9) for s in (21, 22, 23)]
    tables[1] = tables[1].set_column(0, "uid", pa.concat_arrays([tables[0]["uid"].combine_chunks()[:60],
                                                                 tables[1]["uid"].combine_chunks()[60:]]))
    tables[2] = tables[2].set_column(0, "uid", pa.concat_arrays([tables[1]["uid"].combine_chunks()[100:150],
                                                                 tables[2]["uid"].combine_chunks()[50:]]))
    paths = []
    for i, (t, group) in enumerate(zip(tables, (50, 33, 700))):
        write_metadata(root / f"m{i}.parquet", t, group)
        paths.append(str(root / f"m{i}.parquet"))
    hi, lo, status = parse_hex_uids(pa.concat_tables(tables)["uid"])
    hi, lo = hi[status == 0], lo[status == 0]
    np.save(root / "2019.npy", sorted_subset(np.r_[hi[5:40], random_uids(30, np.random.default_rng(4))[1]],
                                             np.r_[lo[5:40], random_uids(30, np.random.default_rng(4))[2]]))
    write_subset(str(root / "eval.npy"), sorted_subset(hi[::37], lo[::37]))
    return paths[:2] + [str(root / "2019.npy"), paths[2]], str(root / "eval.npy")


def test_units_and_workers_write_the_same_bytes(tmp_path):
    """Cut into tiny units (a few row groups, uid file row ranges) and run inline, on worker processes and as
    Ray tasks, `splits` writes the bytes of one unit per file, and leaves no work files."""
    inputs, eval_path = _mixed_inputs(tmp_path)
    outputs = {}
    for name, unit_rows, where in (("whole", 10**9, "inline"), ("units", 7, "inline"), ("units100", 100, "inline"),
                                   ("processes", 40, "processes"), ("ray", 100, "ray")):
        out = tmp_path / name
        options = SplitOptions(timestamp_format="iso", eval_uids=[eval_path], unit_rows=unit_rows)
        build_splits(inputs, str(out), options, where=where)
        assert not [p.name for p in out.iterdir() if "work" in p.name]
        manifest = json.loads((out / "splits.json").read_text())
        manifest.pop("seconds")
        outputs[name] = ({p.name: p.read_bytes() for p in out.iterdir() if p.name != "splits.json"}, manifest)
    whole, manifest = outputs["whole"]
    assert all(o == outputs["whole"] for o in outputs.values())
    assert len(whole) == 10 and manifest["rows"] == 2100 + 65
    assert manifest["duplicates"]["rows"] > 27 + 35 and manifest["duplicates"]["conflicting_bucket"] > 0
    assert manifest["eval"]["removed"] > 0 and manifest["malformed_uids"]["rows"] == 36
    assert manifest["unknown"]["uids"] > 0 and manifest["out_of_range"]["uids"] > 0
    # a bad input found inside a task is the same one-line error wherever the task ran
    pa.parquet.write_table(pa.table({"uid": ["a" * 32], "timestamp": [True]}), tmp_path / "bool.parquet")
    for where in ("inline", "processes", "ray"):
        with pytest.raises(SplitError, match="timestamp column has type bool"):
            build_splits([inputs[0], str(tmp_path / "bool.parquet")], str(tmp_path / "bad"), SplitOptions(
                timestamp_format="iso", unit_rows=100), where=where)
        assert not (tmp_path / "bad" / ".splits.work").exists()


def test_duplicates_malformed_and_garbage_are_counted(tmp_path):
    table = metadata_table(20_000, seed=5, fmt="iso", bad_uids=40, duplicates=25)
    write_metadata(tmp_path / "m.parquet", table, 5_000)
    m = build_splits([str(tmp_path / "m.parquet")], str(tmp_path / "out"), SplitOptions(timestamp_format="iso"))
    assert m["malformed_uids"]["rows"] == 40
    assert m["malformed_uids"]["by_reason"] == {"null": 10, "wrong_length": 10, "not_hex": 20}
    assert len(m["malformed_uids"]["sample"]) == 10 and m["malformed_uids"]["sample"][0]["row"] >= 0
    assert m["duplicates"]["rows"] == 25 and len(m["duplicates"]["sample"]) == 10
    assert m["unknown"]["unparseable"] > 0 and m["unknown"]["unparseable_sample"][0]["value"] == "not a date"
    assert m["unknown"]["rows"] == m["unknown"]["missing"] + m["unknown"]["unparseable"]
    assert m["out_of_range"]["rows"] == m["out_of_range"]["below"] + m["out_of_range"]["above"]
    written = sum(s["uids"] for s in m["splits"].values()) + m["unknown"]["uids"] + m["out_of_range"]["uids"]
    assert written + m["malformed_uids"]["rows"] + m["duplicates"]["rows"] == 20_000  # nothing vanishes


def test_timestamp_formats_and_bucketings(tmp_path):
    uids = [f"{i:032x}" for i in range(1, 11)]
    iso = ["2014-03-01", "2016-12-31T23:59:59Z", "2017-01-01 00:00", "2019-13-01", "", None, "2022-07", "2023-01-01",
           "junk", "2019-06-15T10:00:00+02:00"]
    pa.parquet.write_table(pa.table({"uid": uids, "created": iso}), tmp_path / "iso.parquet")
    m = build_splits([str(tmp_path / "iso.parquet")], str(tmp_path / "a"),
                     SplitOptions(timestamp_column="created", timestamp_format="iso"))
    assert {s: m["splits"][s]["rows"] for s in TIC} == {"2016": 2, "2017": 1, "2018": 0, "2019": 1, "2020": 0,
                                                       "2021": 0, "2022": 1}
    assert (m["unknown"]["missing"], m["unknown"]["unparseable"], m["out_of_range"]["above"]) == (2, 2, 1)
    yyyymm = pa.array([201401, 201912, 201913, None, 202006, 199912, 202101, 202012, 201906, 201907], pa.int64())
    pa.parquet.write_table(pa.table({"uid": uids, "ts": yyyymm}), tmp_path / "ym.parquet")
    m = build_splits([str(tmp_path / "ym.parquet")], str(tmp_path / "b"), SplitOptions(
        timestamp_column="ts", timestamp_format="yyyymm", by="boundaries", boundaries=["2014", "2019-07", "2021"]))
    assert m["steps"] == ["2014", "201907"] and m["sizes"] == {"2014": 2, "201907": 4}
    assert (m["unknown"]["uids"], m["out_of_range"]["below"], m["out_of_range"]["above"]) == (2, 1, 1)
    m = build_splits([str(tmp_path / "ym.parquet")], str(tmp_path / "c"),
                     SplitOptions(timestamp_column="ts", timestamp_format="yyyymm", by="month"))
    assert m["steps"][0] == "199912" and m["sizes"]["201906"] == 1 and sum(m["sizes"].values()) == 8


def test_tic_uid_files_merge_early_years(tmp_path):
    rng = np.random.default_rng(0)
    for year, n in (("2014", 30), ("2015", 40), ("2017", 50), ("201803", 5), ("2013", 7)):
        _, hi, lo = random_uids(n, rng)
        np.save(tmp_path / f"{year}.npy", sorted_subset(hi, lo))
    m = build_splits([str(tmp_path)], str(tmp_path / "out"), SplitOptions())
    assert m["sizes"] == {"2016": 70, "2017": 50, "2018": 5, "2019": 0, "2020": 0, "2021": 0, "2022": 0}
    assert m["out_of_range"]["below"] == 7
    with pytest.raises(SplitError, match="by month"):
        build_splits([str(tmp_path / "2017.npy")], str(tmp_path / "x"), SplitOptions(by="month"))


def test_split_errors_are_one_line_exit_2(pool_metadata, tmp_path):
    _, paths, _, _ = pool_metadata
    for args, message in [((paths[0], "--timestamp-column", "nope"), "no column 'nope'"),
                          ((paths[0], "--by", "decade"), "--by 'decade'"),
                          ((str(tmp_path / "missing.parquet"),), "no such file"),
                          ((paths[0], "--by", "boundaries", "--boundaries", "2019,2017"), "strictly increasing")]:
        result = cli("splits", *args, "--out", str(tmp_path / "o"))
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- replay schedules

def custom_weights(step, steps, sizes):
    """A user policy for the test: the newest split twice as likely as each older one."""
    return {s: (2.0 if i == step else 1.0) for i, s in enumerate(steps[:step + 1])}


@pytest.fixture(scope="module")
def small_splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    write_metadata(root / "m.parquet", metadata_table(30_000, seed=9), 10_000)
    build_splits([str(root / "m.parquet")], str(root / "splits"), SplitOptions())
    return root / "splits"


def test_cumulative_exp_halves_and_weights_are_exact():
    sizes = {s: 100 for s in TIC}
    w = policy_weights("cumulative-exp", 4, TIC, sizes)
    assert w == {"2016": Fraction(1, 16), "2017": Fraction(1, 16), "2018": Fraction(1, 8), "2019": Fraction(1, 4),
                 "2020": Fraction(1, 2)}
    assert allocate(w, 1600) == {"2016": 100, "2017": 100, "2018": 200, "2019": 400, "2020": 800}
    assert policy_weights("cumulative-equal", 2, TIC, sizes) == {"2016": Fraction(1, 4), "2017": Fraction(1, 4),
                                                                 "2018": Fraction(1, 2)}
    assert sum(allocate({"a": Fraction(1), "b": Fraction(1), "c": Fraction(1)}, 100).values()) == 100


@pytest.mark.parametrize("policy", ["sequential", "cumulative-all", "cumulative-exp", "cumulative-equal", "oracle",
                                    "test_time_splits:custom_weights"])
def test_every_step_draws_exactly_the_budget(small_splits, tmp_path, policy):
    budget = 8_192  # above some split sizes, so those splits are upsampled
    sched = build_schedule(str(small_splits), policy, budget, str(tmp_path), seed=1)
    manifest = json.loads((small_splits / "splits.json").read_text())
    assert [s["step"] for s in sched["steps"]] == TIC
    for t, step in enumerate(sched["steps"]):
        assert step["total"] == budget == sum(s["samples"] for s in step["sources"])
        uids = np.load(tmp_path / step["subset"])
        counts = np.load(tmp_path / step["counts"])
        assert counts.dtype == np.uint32 and len(counts) == len(uids) and counts.sum() == budget and counts.min() >= 1
        for source in step["sources"]:  # each split contributes exactly its share, multiplicities included
            split = np.load(small_splits / f"{source['split']}.npy")
            assert counts[isin(uids["f0"], uids["f1"], split)].sum() == source["samples"]
            assert source["upsampling_factor"] == pytest.approx(source["samples"] / manifest["sizes"][source["split"]])
        names = [s["split"] for s in step["sources"]]
        if policy == "sequential":
            assert names == [TIC[t]]
        if policy == "cumulative-exp" and t >= 2:
            got = {s["split"]: s["samples"] for s in step["sources"]}
            assert got[TIC[t]] == budget // 2 and got[TIC[t - 1]] == budget // 4 and got[TIC[t - 2]] in (
                budget // 8, budget // 4)
        if policy == "oracle":
            assert names == TIC


def test_schedule_shard_lists_and_size_check(small_splits, tmp_path):
    sizes = json.loads((small_splits / "sizes.json").read_text())
    for split, n in sizes.items():  # a resharded folder per split, like `reinforge reshard` writes
        folder = tmp_path / "runs" / split / "shards"
        folder.mkdir(parents=True)
        per = {f"{i:08d}.tar": n // 3 + (1 if i < n % 3 else 0) for i in range(3)}
        for name in per:
            (folder / name).write_bytes(b"")
        (folder / "sizes.json").write_text(json.dumps(per))
    sched = build_schedule(str(small_splits), "cumulative-all", 1000, str(tmp_path / "s"),
                           shards_template=str(tmp_path / "runs" / "{split}"), write_subsets=False)
    oc = sched["steps"][2]["open_clip"]
    assert oc["train_data"].split("::") == [str(tmp_path / "runs" / s / "shards" / "{00000000..00000002}.tar")
                                             for s in TIC[:3]]
    factors = [float(f) for f in oc["train_data_upsampling_factors"].split("::")]
    assert sum(f * sizes[s] for f, s in zip(factors, TIC[:3])) == pytest.approx(1000)
    (tmp_path / "runs" / "2018" / "shards" / "sizes.json").write_text(json.dumps(
        {"00000000.tar": 1, "00000001.tar": 1, "00000002.tar": 1}))
    with pytest.raises(ScheduleError, match="split 2018: shards in .* hold 3 samples"):
        build_schedule(str(small_splits), "sequential", 10, str(tmp_path / "s2"),
                       shards_template=str(tmp_path / "runs" / "{split}"))
    result = cli("schedule", str(small_splits), "--policy", "nosuch", "--budget", "10", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "expected one of sequential" in result.stderr


# ---------------------------------------------------------------- resharding

@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """6 pool shards x 80 samples, plus a shard with a sample without json, one with a bad uid, and a repeat."""
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(11)
    strings, hi, lo = random_uids(480, rng)
    hexes = strings.to_pylist()
    write_pool_shards(root / "pool", hexes, per_shard=80, payload=512)
    write_shard(root / "pool" / "00000006.tar", [
        ("000060000", {"jpg": b"x", "txt": b"no json"}),
        ("000060001", {"jpg": b"y", "json": b'{"uid": "not-a-uid"}'}),
        ("000060002", {"jpg": b"z", "txt": b"repeat", "json": json.dumps({"uid": hexes[5]}).encode()})])
    chosen = np.r_[5, rng.choice(np.arange(6, 480), 199, replace=False)]  # uid 5 is also the repeat in shard 6
    subset = sorted_subset(hi[chosen], lo[chosen])
    counts = rng.choice([1, 1, 2, 3], len(subset)).astype(np.uint32)
    write_subset(str(root / "subset.npy"), subset, counts)
    return root, subset, counts


def reshard_recipe(root, out, **extra) -> dict:
    return {"product": "reshard", "output": str(out), "subset": str(root / "subset.npy"),
            "input": {"path": str(root / "pool" / "*.tar")}, "samples_per_shard": 64, "seed": 3,
            "resources": {"cpus_per_actor": 1, "object_store_memory_mb": 256}, **extra}


def read_back(run) -> tuple[collections.Counter, list[list[str]]]:
    got, per_shard = collections.Counter(), []
    for name in sorted(os.listdir(run / "shards")):
        if name.endswith(".tar"):
            with open(run / "shards" / name, "rb") as f:
                samples = list(iter_samples(f))
            per_shard.append([json.loads(s["json"])["uid"] for s in samples])
            got.update(per_shard[-1])
            assert len({s["__key__"] for s in samples}) == len(samples)
    return got, per_shard


@pytest.fixture(scope="module")
def reshard_run(pool, tmp_path_factory, ray_local):
    import ray

    from reinforge.runtime.ray_session import start_local_ray
    if not ray.is_initialized():
        start_local_ray(num_cpus=2, object_store_memory_mb=256)
    root, _, _ = pool
    out = tmp_path_factory.mktemp("reshard") / "run"
    summary = run_recipe(parse_recipe(reshard_recipe(root, out)), progress=False)
    assert summary.ok, summary.failed
    return out, summary


@pytest.mark.ray
def test_reshard_writes_exactly_the_subset_with_multiplicities(pool, reshard_run):
    root, subset, counts = pool
    out, summary = reshard_run
    total = int(counts.sum())
    assert summary.samples == total and summary.tasks == -(-total // 64)
    got, per_shard = read_back(out)
    assert got == dict(zip(uids_hex(subset), counts.tolist()))
    for uids in per_shard:  # copies of one uid never next to each other
        assert all(a != b for a, b in zip(uids, uids[1:]))
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert sizes == {f"{i:08d}.tar": len(u) for i, u in enumerate(per_shard)}
    for i, uids in enumerate(per_shard):
        assert json.loads((out / "shards" / f"{i:08d}_stats.json").read_text())["successes"] == len(uids)
    meta = json.loads((out / "shards" / "reshard.json").read_text())  # meta.json is DataComp's (test_reshard_datacomp)
    assert meta["pool"]["samples_without_uid"] == {"no_json": 1, "malformed_uid": 1}
    assert meta["pool"]["duplicate_uids_requested"] == 1  # the first occurrence was used, not the repeat
    texts = [s["txt"] for name in sorted(os.listdir(out / "shards")) if name.endswith(".tar")
             for s in iter_samples(open(out / "shards" / name, "rb"))]
    assert b"repeat" not in texts
    with open(out / "shards" / "00000000.tar", "rb") as f:
        keys = [s["__key__"] for s in iter_samples(f)]
    assert all(len(k) == 32 or (len(k) > 34 and k[32:34] == "_r") for k in keys)
    before = tree_state(out)
    status = run_status(str(out))  # its tasks from the committed plan: never re-planned into the run
    assert len(status.done) == status.total == summary.tasks and not status.changed
    assert tree_state(out) == before


@pytest.mark.ray
def test_reshard_is_byte_identical_on_rerun(pool, reshard_run, tmp_path, local_ray):
    from reinforge.runtime.executor import TaskExecutor
    from reinforge.formats.loader_files import write_loader_files
    from reinforge.formats.recipe import config_digest
    from reinforge.io.manifest import RunLayout
    root, _, _ = pool
    out, _ = reshard_run
    again = run_recipe(parse_recipe(reshard_recipe(root, out)), progress=False)
    assert again.skipped == again.tasks and again.done == 0
    # a fresh run of every task, in this process and in reverse order, writes the same bytes
    recipe = parse_recipe(reshard_recipe(root, tmp_path / "run"))
    pipeline = ReshardPipeline(recipe)
    pipeline.prepare(RunLayout(recipe.output))
    tasks = pipeline.tasks()
    executor = TaskExecutor(pipeline, RunLayout(recipe.output), config_digest(recipe), 0.0)
    assert all(executor.run(t)["status"] == "done" for t in reversed(tasks))
    write_loader_files(RunLayout(recipe.output), config_digest(recipe))  # the runner's last step
    assert shard_bytes(tmp_path / "run") == shard_bytes(out)


@pytest.mark.ray
def test_reshard_two_nodes_is_byte_identical_to_one(pool, reshard_run, tmp_path):
    root, _, _ = pool
    out, _ = reshard_run
    with two_node_cluster() as address:
        summary = run_recipe(parse_recipe(reshard_recipe(root, tmp_path / "run")), address=address, progress=False)
    assert summary.ok
    assert len(manifest_nodes(tmp_path / "run")) == 2, "both nodes should have run tasks"
    assert shard_bytes(tmp_path / "run") == shard_bytes(out)


def test_reshard_missing_uids_fail_loudly_unless_allowed(pool, tmp_path):
    root, subset, counts = pool
    _, hi, lo = random_uids(7, np.random.default_rng(99))
    extra = sorted_subset(np.r_[subset["f0"], hi], np.r_[subset["f1"], lo])
    write_subset(str(tmp_path / "more.npy"), extra)
    recipe = reshard_recipe(root, tmp_path / "run", subset=str(tmp_path / "more.npy"))
    with pytest.raises(ReshardError, match=r"^7 of 207 subset uids are not in the pool \(7 shards, 483 samples\)"):
        refused = ReshardPipeline(parse_recipe(recipe))
        refused.prepare(refused.layout)
    pipeline = ReshardPipeline(parse_recipe({**recipe, "allow_missing": True}))
    pipeline.prepare(pipeline.layout)
    tasks = pipeline.tasks()
    committed = json.loads((tmp_path / "run" / "plan" / "plan.json").read_text())
    assert committed["meta"]["missing"]["uids"] == 7 and len(committed["meta"]["missing"]["sample"]) == 7
    assert len(np.load(tmp_path / "run" / "plan" / "missing_uids.npy")) == 7
    assert sum(committed["sizes"]) == 200 and len(tasks) == 4
    result = cli("reshard", str(tmp_path / "more.npy"), "--pool", str(root / "pool" / "*.tar"),
                 "--output", str(tmp_path / "cli"))
    assert result.returncode == 2 and result.stderr.startswith("error: 7 of 207 subset uids are not in the pool")
    assert len(result.stderr.strip().splitlines()) == 1


def test_reshard_pool_shard_gone_fails_the_task(pool, tmp_path):
    import shutil

    from reinforge.runtime.executor import TaskExecutor
    from reinforge.formats.recipe import config_digest
    from reinforge.io.manifest import RunLayout
    root, _, _ = pool
    shutil.copytree(root / "pool", tmp_path / "pool")
    recipe = parse_recipe({**reshard_recipe(root, tmp_path / "run"), "input": {"path": str(tmp_path / "pool/*.tar")}})
    pipeline = ReshardPipeline(recipe)
    pipeline.prepare(pipeline.layout)
    tasks = pipeline.tasks()
    os.remove(tmp_path / "pool" / "00000002.tar")
    executor = TaskExecutor(pipeline, RunLayout(recipe.output), config_digest(recipe), recipe.max_error_fraction)
    results = [executor.run(t) for t in tasks]
    failed = [r for r in results if r["status"] == "failed"]
    assert failed and all("00000002.tar" in r["reason"] for r in failed)
    assert not (tmp_path / "run" / "shards" / f"{failed[0]['task']}.tar").exists()
    with pytest.raises(InputError, match="no shard matches"):
        ReshardPipeline(parse_recipe({**reshard_recipe(root, tmp_path / "r2"),
                                      "input": {"path": str(tmp_path / "pool/{00000000..00000009}.tar")}})
                        ).prepare(RunLayout(str(tmp_path / "r2")))
