"""The cheap paths of resharding: one-task jobs without Ray, the shared uid index cache, the vectorised
indexer and the template tar writer. Each must give exactly the bytes of the path it shortcuts."""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import tarfile

import numpy as np
import pytest
from conftest import shard_bytes, tree_state
from pool_gen import random_uids, write_pool_shards

from reinforge.formats import uid_index
from reinforge.formats.shard_spans import SPARSE_HEADERS
from reinforge.products.reshard.pipeline import ReshardPipeline
from reinforge.runtime.runner import run_recipe, runs_in_process
from reinforge.products.registry import parse_recipe
from reinforge.formats.subset import make_subset, uid_order, write_subset
from reinforge.formats.wds import ShardReadError, ShardWriter


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory):
    """3 pool shards x 40 samples; a subset of 70 uids, some twice or three times (121 samples)."""
    root = tmp_path_factory.mktemp("cost-pool")
    rng = np.random.default_rng(5)
    strings, hi, lo = random_uids(120, rng)
    write_pool_shards(root / "pool", strings.to_pylist(), per_shard=40, payload=300)
    chosen = rng.choice(120, 70, replace=False)
    subset = make_subset(hi[chosen], lo[chosen])
    order = uid_order(subset["f0"], subset["f1"])
    counts = rng.choice([1, 1, 2, 3], 70).astype(np.uint32)
    write_subset(str(root / "subset.npy"), subset[order], counts[order])
    return root


def recipe(root, out, runner="auto", pool=None, **extra):
    return parse_recipe({"product": "reshard", "output": str(out), "subset": str(root / "subset.npy"),
                         "input": {"path": str(pool or root / "pool") + "/*.tar"}, "seed": 1,
                         "samples_per_shard": extra.pop("samples_per_shard", 32),
                         "resources": {"cpus_per_actor": 1, "object_store_memory_mb": 256, "runner": runner},
                         **extra})


def tree_bytes(folder) -> dict[str, bytes]:
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def manifest_facts(run) -> dict:
    """The manifests without what differs by placement and time: timings, worker, the run's own path and
    the plan file's mtime (input_fingerprint)."""
    facts = {}
    for name in sorted(os.listdir(run / "manifests")):
        m = json.loads((run / "manifests" / name).read_text())
        for key in ("started_at", "seconds", "worker", "input_fingerprint"):
            m.pop(key)
        for stage in m["stages"].values():
            stage.pop("seconds")
        m["inputs"] = [os.path.relpath(i, run) for i in m["inputs"]]
        facts[name] = m
    return facts


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    cache = tmp_path / "index-cache"
    monkeypatch.setenv(uid_index.INDEX_CACHE_ENV, str(cache))
    return cache


# ---------------------------------------------------------------- in process or on Ray

def test_runner_rule():
    auto = parse_recipe({"product": "reshard", "output": "x", "subset": "s.npy", "input": {"path": "p/*.tar"}})
    assert auto.resources.runner == "auto"
    import ray
    if not ray.is_initialized():  # the rule reads whether this process already has a Ray
        assert runs_in_process(auto, None, 1)
    assert not runs_in_process(auto, None, 2)
    assert not runs_in_process(auto, "ray://head:10001", 1)
    gpu = auto.model_copy(update={"resources": auto.resources.model_copy(update={"gpus_per_actor": 1})})
    assert not runs_in_process(gpu, None, 1)
    for mode, expected in (("local", True), ("ray", False)):
        forced = auto.model_copy(update={"resources": auto.resources.model_copy(update={"runner": mode})})
        assert runs_in_process(forced, None, 1) is expected and runs_in_process(forced, "auto", 7) is expected


@pytest.mark.ray
@pytest.mark.parametrize("per_shard, tasks", [(32, 4), (200, 1)])  # worker processes / the driver's own
def test_run_without_ray_writes_the_bytes_of_a_ray_run(small_pool, tmp_path, private_cache, local_ray,
                                                        per_shard, tasks):
    on_ray = run_recipe(recipe(small_pool, tmp_path / "ray", runner="ray", samples_per_shard=per_shard), progress=False)
    local = run_recipe(recipe(small_pool, tmp_path / "local", runner="local", samples_per_shard=per_shard),
                       progress=False)
    assert on_ray.ok and local.ok and on_ray.tasks == local.tasks == tasks  # 121 samples
    assert on_ray.samples == local.samples == 121
    assert shard_bytes(tmp_path / "local") == shard_bytes(tmp_path / "ray")  # tars, stats, sizes.json, meta.json
    assert tree_bytes(tmp_path / "local" / "plan") == tree_bytes(tmp_path / "ray" / "plan")
    assert manifest_facts(tmp_path / "local") == manifest_facts(tmp_path / "ray")
    workers = {run: [json.loads(p.read_text())["worker"] for p in (tmp_path / run / "manifests").iterdir()]
               for run in ("ray", "local")}
    assert all("node_id" in w and w["pid"] != os.getpid() for w in workers["ray"])
    if tasks == 1:
        assert [w["pid"] for w in workers["local"]] == [os.getpid()]
    else:  # spawned worker processes, no Ray in them
        assert all("node_id" not in w and w["pid"] != os.getpid() for w in workers["local"])


def test_in_process_run_resumes_like_ray(small_pool, tmp_path, private_cache):
    out = tmp_path / "run"
    first = run_recipe(recipe(small_pool, out, runner="local"), progress=False)
    assert first.ok and first.done == 4
    before = shard_bytes(out)
    os.remove(out / "manifests" / "00000002.json")  # as if the run stopped before committing task 2
    os.remove(out / "shards" / "00000002.tar")
    prepared = tree_state(out / "plan")
    again = run_recipe(recipe(small_pool, out, runner="local"), progress=False)
    assert again.ok and again.done == 1 and again.skipped == 3
    assert shard_bytes(out) == before
    assert tree_state(out / "plan") == prepared, "prepare() of unchanged inputs rewrites no plan file"
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and status["tasks"]["done"] == 4


# ---------------------------------------------------------------- the uid index cache

def prepare(recipe) -> None:
    """The run's prepare step alone (index, assignment, plan/): what the runner does before any task."""
    pipeline = ReshardPipeline(recipe)
    pipeline.prepare(pipeline.layout)


def cache_entries(cache) -> dict[str, int]:
    return {name: os.stat(cache / name).st_mtime_ns for name in sorted(os.listdir(cache))}


def test_cached_index_gives_the_same_plan(small_pool, tmp_path, private_cache, monkeypatch):
    prepare(recipe(small_pool, tmp_path / "a"))
    entries = cache_entries(private_cache)
    assert len(entries) == 3 and not (tmp_path / "a" / "index").exists()
    prepare(recipe(small_pool, tmp_path / "b"))
    assert cache_entries(private_cache) == entries, "the second run read the entries, wrote none"
    monkeypatch.setenv(uid_index.INDEX_CACHE_ENV, "off")  # no shared cache: the run's own index/ folder
    prepare(recipe(small_pool, tmp_path / "c"))
    assert len(os.listdir(tmp_path / "c" / "index")) == 3
    plans = [tree_bytes(tmp_path / run / "plan") for run in "abc"]
    assert plans[0] == plans[1] == plans[2] and len(plans[0]) == 6  # plan.json, inputs.json + 4 task plans


def test_changed_shard_is_indexed_again(small_pool, tmp_path, private_cache, monkeypatch):
    pool = tmp_path / "pool"
    shutil.copytree(small_pool / "pool", pool)
    prepare(recipe(small_pool, tmp_path / "a", pool=pool))
    entries = cache_entries(private_cache)
    # the same samples in reverse order: same size, other byte ranges
    shard = pool / "00000001.tar"
    with open(shard, "rb") as f:
        from reinforge.formats.wds import iter_samples
        samples = list(iter_samples(f))
    stat = os.stat(shard)
    with open(shard, "wb") as f, ShardWriter(f) as writer:
        for s in reversed(samples):
            writer.write(s.pop("__key__"), s)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert os.path.getsize(shard) == stat.st_size
    prepare(recipe(small_pool, tmp_path / "b", pool=pool))
    now = cache_entries(private_cache)
    assert len(now) == 4 and all(now[k] == v for k, v in entries.items()), "one new entry, old ones untouched"
    monkeypatch.setenv(uid_index.INDEX_CACHE_ENV, "off")
    prepare(recipe(small_pool, tmp_path / "fresh", pool=pool))
    assert tree_bytes(tmp_path / "b" / "plan") == tree_bytes(tmp_path / "fresh" / "plan")
    assert tree_bytes(tmp_path / "b" / "plan") != tree_bytes(tmp_path / "a" / "plan")
    run_recipe(recipe(small_pool, tmp_path / "b", pool=pool, runner="local"), progress=False)
    run_recipe(recipe(small_pool, tmp_path / "a2", runner="local"), progress=False)  # the original pool
    # the same samples in the same output shards, found at their new places (read in pool order)
    assert shard_samples(tmp_path / "b") == shard_samples(tmp_path / "a2")


def shard_samples(run) -> dict[str, list]:
    from reinforge.formats.wds import iter_samples
    out = {}
    for name in sorted(os.listdir(run / "shards")):
        if name.endswith(".tar"):
            with open(run / "shards" / name, "rb") as f:
                out[name] = sorted(sorted(s.items()) for s in iter_samples(f))
    return out


def test_unreadable_cache_entry_is_rebuilt(small_pool, tmp_path, private_cache):
    prepare(recipe(small_pool, tmp_path / "a"))
    name = sorted(os.listdir(private_cache))[0]
    (private_cache / name).write_bytes(b"not parquet")
    prepare(recipe(small_pool, tmp_path / "b"))
    assert (private_cache / name).read_bytes()[:4] == b"PAR1"
    assert tree_bytes(tmp_path / "a" / "plan") == tree_bytes(tmp_path / "b" / "plan")


# ---------------------------------------------------------------- the indexer decides as json.loads does

def reference_index(path, uid_field="uid") -> list[tuple]:
    """(key, offset, length, uid text or None, status) per sample: tarfile + json.loads, one by one."""
    rows = []
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rpartition("/")[2]
            if "." not in base or not base.partition(".")[2]:
                continue
            key = info.name[:len(info.name) - len(base)] + base.partition(".")[0]
            end = info.offset_data + -(-info.size // 512) * 512
            if not rows or rows[-1][0] != key:
                rows.append([key, info.offset, end, None, 1])
            rows[-1][2] = end
            if base.partition(".")[2] == "json":
                try:
                    meta = json.loads(tar.extractfile(info).read())
                except ValueError:
                    rows[-1][3:] = [None, 4]
                    continue
                if not isinstance(meta, dict) or uid_field not in meta:
                    rows[-1][3:] = [None, 2]
                else:
                    value = meta[uid_field]
                    ok = isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdefABCDEF" for c in value)
                    rows[-1][3:] = [value.lower() if ok else None, 0 if ok else 3]
    return [(k, a, b - a, u, s) for k, a, b, u, s in rows]


def index_rows(path) -> list[tuple]:
    t = uid_index.index_shard(str(path)).to_pydict()
    uids = [f"{h:016x}{l:016x}" if s == 0 else None for h, l, s in zip(t["uid_hi"], t["uid_lo"], t["status"])]
    return list(zip(t["key"], t["offset"], t["length"], uids, t["status"]))


UID = "0123456789abcdef" * 2
ODD_JSON = [b'{"uid": "%s"}' % UID.encode(), b'{"uid": null}', b'{"uid": 5}', b'{"uid": ["x"]}',
            b'{"uid": "%s", "uid": "%s"}' % (UID.encode(), UID.upper().encode()),  # json.loads keeps the last
            b'{\n "uid": "%s"\n}' % UID.encode(), b"", b"   ", b'{"uid": "%s", "x": "\xff"}' % UID.encode(),
            b"[1, 2]", b'{"x": 1}', b'{"uid": "zz"}', b'{"uid": "%s"}{"uid": "%s"}' % (UID.encode(), UID.encode()),
            b'{"uid": "%s", "n": NaN}' % UID.encode(), b'\xef\xbb\xbf{"uid": "%s"}' % UID.encode(),
            b'{"a": {"uid": "%s"}}' % UID.encode(), b'{"uid": "%s"}\r' % UID.encode(), b'{"uid": "a\tb"}']


def odd_members():
    members = [(f"s{i:02d}.json", data) for i, data in enumerate(ODD_JSON)]
    members += [("img.jpg", b"x" * 700), ("img.json", json.dumps({"uid": UID}).encode()), ("noext", b"q"),
                ("dir", None), ("sub/m.n.json", json.dumps({"uid": UID}).encode()), ("sub/m.n.txt", b"t"),
                ("\u00e9t\u00e9.json", json.dumps({"uid": UID}).encode()), ("dup.json", b'{"uid": "%s"}' % UID.encode()),
                ("dup.json", b'{"uid": "bad"}'), ("dot.", b"x"), ("empty.jpg", b"")]
    return members


def write_tar(path, members, fmt=tarfile.USTAR_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt", ["ustar", "pax", "long_prefix"])
def test_index_decides_as_tarfile_and_json_loads(tmp_path, fmt):
    members = odd_members()
    if fmt == "long_prefix":  # a name that needs ustar's prefix field: the fast walk hands it to tarfile
        members.append(("d" * 90 + "/" + "e" * 60 + ".json", json.dumps({"uid": UID}).encode()))
    if fmt == "pax":
        members.append(("x" * 120 + ".json", json.dumps({"uid": UID}).encode()))
    write_tar(tmp_path / "odd.tar", members, tarfile.PAX_FORMAT if fmt == "pax" else tarfile.USTAR_FORMAT)
    expected = reference_index(tmp_path / "odd.tar")
    assert index_rows(tmp_path / "odd.tar") == expected
    statuses = [s for *_, s in expected]
    assert {0, 1, 2, 3, 4} <= set(statuses)


def test_index_refuses_damaged_shards(tmp_path):
    write_tar(tmp_path / "ok.tar", odd_members())
    data = (tmp_path / "ok.tar").read_bytes()
    damaged = bytearray(data)
    damaged[1024 + 10] ^= 1  # a name byte of the second header: its checksum no longer matches
    for name, content in (("bad.tar", bytes(damaged)), ("cut.tar", data[:1500])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ShardReadError, match="cannot index pool shard"):
            uid_index.index_shard(str(tmp_path / name))


def test_index_reads_mapped_and_pread_shards_alike(tmp_path):
    """Dense headers are read through a memory map, sparse ones (large images) by pread: same table."""
    strings, _, _ = random_uids(30, np.random.default_rng(2))
    small = write_pool_shards(tmp_path / "small", strings.to_pylist(), 30, payload=200)[0]
    large = write_pool_shards(tmp_path / "large", strings.to_pylist(), 30, payload=SPARSE_HEADERS * 2)[0]
    a, b = uid_index.index_shard(small), uid_index.index_shard(large)
    assert a.column("uid_hi").equals(b.column("uid_hi")) and a.column("key").equals(b.column("key"))
    assert index_rows(small) == reference_index(small) and index_rows(large) == reference_index(large)


# ---------------------------------------------------------------- the writer writes tarfile's bytes

def tarfile_bytes(samples) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = \
                    len(data), 0, 0o444, 0, 0, "", ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def writer_bytes(samples) -> bytes:
    buf = io.BytesIO()
    with ShardWriter(buf) as writer:
        for key, members in samples:
            writer.write(key, members)
    return buf.getvalue()


def test_shard_writer_writes_tarfiles_bytes():
    rng = random.Random(0)
    cases = [[], [("a", {"jpg": b""})], [("k" * 95, {"json": b"x" * 513})], [("k" * 96, {"jpg": b"1"})],
             [("d" * 80 + "/" + "e" * 40, {"txt": b"y"})], [("\u00e9t\u00e9", {"txt": b"z" * 1024})],
             [("a\udcff", {"txt": b"q"})]]
    for _ in range(40):
        cases.append([(f"{rng.getrandbits(128):032x}" + (f"_r{rng.randint(1, 9)}" if rng.random() < .3 else ""),
                       {e: rng.randbytes(rng.randint(0, 3000)) for e in rng.sample(["jpg", "txt", "json", "syn.json"], 3)})
                      for _ in range(rng.randint(1, 25))])
    for samples in cases:
        assert writer_bytes(samples) == tarfile_bytes(samples)
    with pytest.raises(ValueError, match="too long"):  # tarfile's own refusal, unchanged
        writer_bytes([("n" * 300, {"jpg": b"x"})])


def test_shard_writer_hands_large_output_on_in_chunks():
    rng = random.Random(1)
    samples = [(f"{i:032x}", {"jpg": rng.randbytes(300_000), "txt": b"t" * i}) for i in range(9)]  # ~2.7 MB
    assert writer_bytes(samples) == tarfile_bytes(samples)


# ---------------------------------------------------------------- walks without a Python step per member

def tar_bytes(members, fmt=tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def patched_header(data: bytes, header: int, field: slice, value: bytes) -> bytes:
    """`data` with one header field replaced and that header's checksum made right again."""
    out = bytearray(data)
    block = slice(header, header + 512)
    out[header + field.start:header + field.stop] = value
    out[header + 148:header + 156] = b" " * 8
    out[header + 148:header + 155] = b"%06o\0" % sum(out[block])
    return bytes(out)


def test_ustar_chain_is_the_walk_or_declines():
    """shard_spans._ustar_chain (mapped shards) takes the blocks with the ustar magic as the headers: only
    when they are exactly what _walk_headers visits; anything it cannot vouch for is left to the walk."""
    from reinforge.formats.shard_spans import _ustar_chain, _walk_headers
    from reinforge.formats.tarscan import Corrupt
    rng = random.Random(3)
    plain = tar_bytes([(f"k{i}.{ext}", rng.randbytes(rng.randint(0, 1500))) for i in range(20) for ext in ("jpg", "json")])
    inner = tar_bytes([("in.txt", b"x" * 600)])  # a member holding a tar: its blocks carry the magic too
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        in_data = next(info.offset_data + 1 for info in tar.getmembers()[5:] if info.size > 1)
    cases = {"plain": plain, "gnu": tar_bytes([("a.jpg", b"1" * 700), ("a.txt", b"2")], tarfile.GNU_FORMAT),
             "tar in a member": tar_bytes([("a.tar", inner), ("a.txt", b"t")]),
             "no end blocks": plain[:len(plain) - 1024 * 10].rstrip(b"\0") + bytes(-len(plain.rstrip(b"\0")) % 512),
             "cut in data": plain[:in_data], "cut in a header": plain[:1024 + 100], "garbage after": plain + b"junk" * 300,
             "v7 header": patched_header(plain, 0, slice(257, 265), bytes(8)),
             "spaced size": patched_header(plain, 0, slice(124, 136), b" %010o\0" % len(rng.randbytes(0))),
             "empty": b""}
    took = set()
    for name, data in cases.items():
        chain = _ustar_chain(data)
        try:
            headers, sizes = _walk_headers(data)
        except Corrupt:
            assert chain is None, name
            continue
        if chain is not None:
            took.add(name)
            rows = np.frombuffer(b"".join(headers), np.uint8).reshape(-1, 512)
            assert np.array_equal(chain[0], rows) and chain[1].tolist() == sizes, name
    assert {"plain", "gnu", "cut in data"} <= took and "tar in a member" not in took and "v7 header" not in took


def test_fetch_many_reads_what_fetch_reads(tmp_path, monkeypatch):
    """PoolReader.fetch_many (reshard tasks: nearby ranges read together, headers checked together) gives
    for every range exactly what fetch gives: samples, and the same refusals for damaged ones."""
    from reinforge.formats import pool_reader
    from reinforge.formats.limits import Limits
    members = []
    for i in range(12):
        members += [(f"s{i:02d}.jpg", bytes([i]) * (300 + 200 * i)), (f"s{i:02d}.json", b'{"uid": "%d"}' % i)]
    members += [("x" * 120 + ".jpg", b"pax"), ("x" * 120 + ".json", b"{}")]  # a pax header: tarfile reads it
    members += [("../up.jpg", b"u"), ("../up.json", b"{}"), ("big.jpg", b"b" * (2 << 20)), ("d/k.jpg", b"d"), ("d/k.txt", b"e")]
    data = bytearray(tar_bytes(members, tarfile.PAX_FORMAT))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        infos = tar.getmembers()
    start = {info.name: info.offset for info in infos}
    end = {info.name: info.offset_data + -(-info.size // 512) * 512 for info in infos}
    data[start["s03.json"] + 5] ^= 1  # a damaged header: its checksum no longer matches
    data = patched_header(bytes(data), start["s05.jpg"], slice(124, 136), b" %010o\0" % (300 + 200 * 5))
    (tmp_path / "pool.tar").write_bytes(data)
    url = str(tmp_path / "pool.tar")

    def span(first, last=None):
        return start[first], end[last or first.replace(".jpg", ".json")] - start[first]
    spans = [span(f"s{i:02d}.jpg") for i in range(12)]
    spans += [span("x" * 120 + ".jpg"), span("../up.jpg"), span("big.jpg", "big.jpg"), span("d/k.jpg", "d/k.txt"),
              span("s06.jpg", "s07.json"),  # two samples in one range
              (start["s08.jpg"], 4096 * 8),  # past the last member, into the end blocks and beyond the file
              (start["s09.jpg"] + 512, 1024), span("s01.jpg"), span("s00.jpg"), (len(data) - 512, 1024)]
    for gap, most in ((64 << 10, 16 << 20), (0, 16 << 20), (1 << 20, 3000), (0, 1)):
        monkeypatch.setattr(pool_reader, "MERGE_GAP", gap)
        monkeypatch.setattr(pool_reader, "MAX_READ", most)
        for limits in (Limits.default(), Limits(0, 0, 0)):  # the latter: samples over 2 MiB are refused
            reader = pool_reader.PoolReader(open_limit=1, limits=limits)
            expected = [reader.fetch(url, *s) for s in spans]
            assert list(reader.fetch_many(url, spans)) == expected
            reader.close()
            reasons = {s.get("__error__", ("ok",))[0] for s in expected}
    assert reasons == {"ok", "bad_range", "bad_key", "member_too_large"}, reasons
